"""Where the rich stage-1 descriptor's time goes, block by block, on a dataset's first images (CPU).

    python benchmarks/profile_rich_blocks.py --data-dir DIR [--images 320] [--batch-size 64] [--bank auto|whole]

Runs :class:`villa.encoders.rich.RichRegionFeatures` of the ``default`` encoder the way preprocessing does
(batches from ``iter_region_batches``, preloaded so that decoding is not timed) and prints the seconds of each
step of its forward: the tower's stem and layers, the reference head, the pooled and pixel blocks, the
convolution bank (:meth:`~villa.encoders.rich.RichRegionFeatures._bank_crops`) and its pooling, the
projections. ``--bank whole`` times the bank on whole response maps
(:meth:`~villa.encoders.rich.RichRegionFeatures._bank_full_maps`) even where the per-region windows would
run. Checks that the timed steps give the module's own output. A diagnosis, not a before/after
benchmark.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from bench_preprocess import preload

from villa.datasets import read_annotations
from villa.encoders import get_encoder
from villa.encoders.ops import roi_align_boxes
from villa.encoders.rich import BANK_GRID, BLOCKS, PIXEL_SIZE, POOL_SIZE, RichRegionFeatures


def timed_forward(rich: RichRegionFeatures, images, boxes, seconds: dict, bank: str = "auto") -> torch.Tensor:
    """:meth:`RichRegionFeatures._forward`, step by step, adding each step's seconds to ``seconds``."""

    def step(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] += time.perf_counter() - start
        return out

    tower, v, width = rich.tower, rich.tower.visual, images.shape[-1]
    x = images.contiguous(memory_format=torch.channels_last)
    maps = [step("tower stem", lambda: v.stem(x))]
    for name, layer in (("tower layer1", v.layer1), ("tower layer2", v.layer2), ("tower layer3", v.layer3)):
        maps.append(step(name, lambda layer=layer: layer(maps[-1])))
    reference = step("reference head", lambda: tower.head(tower.region_features(maps[-1], boxes, width)))

    def pooled_block():
        out = []
        for fmap in maps:
            r = roi_align_boxes(fmap, boxes, width, POOL_SIZE)
            out += [r.mean((2, 3)), r.amax((2, 3))]
        return torch.cat(out, 1)

    pooled = step("pooled block", pooled_block)
    pixels = step("pixels block", lambda: roi_align_boxes(images, boxes, width, PIXEL_SIZE).flatten(1))
    bank_fn = rich._bank_full_maps if bank == "whole" else rich._bank_crops
    bank = step("convolution bank", lambda: bank_fn(images, boxes, width))
    bank = step(
        "bank pooling",
        lambda: torch.cat([F.adaptive_avg_pool2d(bank, BANK_GRID).flatten(1), bank.amax((2, 3))], 1),
    )
    blocks = {"reference": reference, "pooled": pooled, "pixels": pixels, "conv_bank": bank}
    return step(
        "projections", lambda: torch.cat([blocks[n].float() @ getattr(rich, f"proj_{n}") for n in BLOCKS], 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bank", choices=("auto", "whole"), default="auto")
    args = parser.parse_args()
    frame = read_annotations(args.data_dir).iloc[: args.images]
    batches = preload(frame, args.data_dir, args.batch_size)
    encoder = get_encoder("default")
    rich = RichRegionFeatures(encoder.build_image_model(), encoder.dim).eval()
    seconds: dict = defaultdict(float)
    with torch.inference_mode():
        module = [rich(images, boxes) for images, boxes in batches]  # also warms the kernels up
        steps = [timed_forward(rich, images, boxes, seconds, args.bank) for images, boxes in batches]
    worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(steps, module))
    regions = sum(len(boxes) for _, boxes in batches)
    print(
        f"{len(frame)} images, {regions} regions, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"float32, bank {args.bank}; steps vs module: largest difference {worst:.1e} of the largest entry"
    )
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {name:18s} {value:7.2f} s")
    print(f"  {'total':18s} {sum(seconds.values()):7.2f} s")


if __name__ == "__main__":
    main()

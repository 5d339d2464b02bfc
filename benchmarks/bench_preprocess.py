"""Benchmark region-embedding preprocessing.

Prints, for the ``default`` encoder and for the RN50 architecture (random weights):

* regions/s batched (many images per forward, one RoIAlign call, single-query attention pool),
  next to a same-process baseline that embeds one image per forward pass with open_clip's stock
  attention pool (the reference's way);
* for the default encoder, a whole ``preprocess_dataset`` run on the dataset (all splits, its default
  ``region_features="rich"``) and its ratio to the bare forward time of the same model (the rich
  descriptor) on the same batches (goal <= 1.15), plus the bare forward of the reference recipe alone
  (what the rich blocks add).

The run writes into a scratch copy (annotations + a link to the images), never into the dataset.

    .venv/bin/python benchmarks/bench_preprocess.py                      # data/docmnist_30000_15.2
    .venv/bin/python benchmarks/bench_preprocess.py --data_dir=/tmp/ds --rn50_images=32
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from villa.datasets import Dataset, read_annotations
from villa.encoders import get_encoder
from villa.encoders.clip_resnet import RegionImageEncoder, build_modified_resnet
from villa.encoders.rich import RichRegionFeatures
from villa.features.preprocess import iter_region_batches, preprocess_dataset, to_model_input
from villa.storage.errors import exit_on_error
from villa.storage.paths import resolve_dataset_dir


def scratch_copy(dataset_dir: Path, into: Path) -> Path:
    """A dataset folder with ``dataset_dir``'s annotation files copied and its outputs of its own: images read
    from the same place (a link to ``images/``, unless ``dataset.json`` names an ``image_root`` elsewhere)."""
    target = into / dataset_dir.name
    target.mkdir(parents=True)
    for name in ("annotations.feather", "attributes.yaml", "dataset.json"):
        if (dataset_dir / name).exists():
            shutil.copy2(dataset_dir / name, target / name)
    manifest = dataset_dir / "dataset.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("image_root")):
        (target / "images").symlink_to(dataset_dir / "images", target_is_directory=True)
    return target


def preload(frame, dataset_dir, batch_size):
    """All batches as (float images [B, 3, H, W], boxes [M, 5]) tensors in memory."""
    return [
        (to_model_input(b.images, torch.device("cpu")), torch.from_numpy(b.boxes))
        for b in iter_region_batches(frame, Dataset.open(dataset_dir), batch_size)
    ]


def stock_forward(model: RegionImageEncoder, images, boxes):
    """The reference head: open_clip's AttentionPool2d over all 50 tokens."""
    rois = model.region_features(model.feature_map(images), boxes, images.shape[-1])
    return model.visual.attnpool(model.visual.layer4(rois))


@torch.inference_mode()
def time_forward(model, batches, fn=None) -> tuple[float, int]:
    """Seconds for the forward passes over ``batches`` and the number of regions embedded."""
    fn = fn or model
    fn(*batches[0]) if len(batches[0][1]) else None  # warm-up (allocator, kernels)
    start = time.perf_counter()
    regions = 0
    for images, boxes in batches:
        regions += len(fn(images, boxes))
    return time.perf_counter() - start, regions


def one_image_batches(batches, limit: int):
    """Split preloaded batches into single-image batches (first ``limit`` images)."""
    out = []
    for images, boxes in batches:
        for i in range(len(images)):
            mine = boxes[boxes[:, 0] == i].clone()
            mine[:, 0] = 0
            out.append((images[i : i + 1], mine))
            if len(out) == limit:
                return out
    return out


def bench_architecture(label, model, batches, baseline_images) -> dict:
    batched_s, regions = time_forward(model, batches)
    stock_s, _ = time_forward(model, batches, lambda i, b: stock_forward(model, i, b))
    singles = one_image_batches(batches, baseline_images)
    single_s, single_regions = time_forward(model, singles, lambda i, b: stock_forward(model, i, b))
    row = {
        "encoder": label,
        "batched_regions_per_s": regions / batched_s,
        "batched_stock_pool_regions_per_s": regions / stock_s,
        "one_image_regions_per_s": single_regions / single_s,
        "one_image_s_per_image": single_s / len(singles),
        "speedup_vs_one_image": (regions / batched_s) / (single_regions / single_s),
    }
    print(
        f"{label:>10}: batched {row['batched_regions_per_s']:8.1f} regions/s | batched, stock attnpool "
        f"{row['batched_stock_pool_regions_per_s']:8.1f} | one image/forward (reference way) "
        f"{row['one_image_regions_per_s']:8.1f} regions/s ({row['one_image_s_per_image']:.3f} s/image) "
        f"| speed-up x{row['speedup_vs_one_image']:.1f}",
        flush=True,
    )
    return row


@exit_on_error
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", default="docmnist_30000_15.2")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rn50_images", type=int, default=64, help="images for the RN50 measurement")
    parser.add_argument(
        "--baseline_images", type=int, default=200, help="images for the default one-image baseline"
    )
    parser.add_argument("--rn50_baseline_images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="whole runs / bare passes (best kept)")
    parser.add_argument("--skip_full_run", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dataset_dir = resolve_dataset_dir(args.data_dir)
    frame = read_annotations(dataset_dir)
    print(
        f"dataset {dataset_dir.name}: {len(frame)} images, {int(frame['num_regions'].sum())} regions; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results: dict = {}

    if not args.skip_full_run:
        # interleave whole runs and bare passes and keep each one's best: other processes share the CPU
        enc = get_encoder("default")
        reference = enc.build_image_model()
        model = RichRegionFeatures(enc.build_image_model(), enc.dim)
        runs, bares, refs = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
                copy = scratch_copy(dataset_dir, Path(tmp))
                cpu0 = time.process_time()
                summary = preprocess_dataset(copy, device="cpu", batch_size=args.batch_size, progress=False)
                runs.append({**summary, "cpu_seconds": time.process_time() - cpu0})
            loaded = preload(frame, dataset_dir, args.batch_size)
            cpu0 = time.process_time()
            bare_s, _ = time_forward(model, loaded)
            bares.append((bare_s, time.process_time() - cpu0))
            refs.append(time_forward(reference, loaded)[0])
            del loaded
        run = min(runs, key=lambda r: r["seconds"])
        bare_s, bare_cpu = min(bares)
        results["full_run"] = {
            **run,
            "bare_forward_seconds": bare_s,
            "bare_forward_cpu_seconds": bare_cpu,
            "reference_forward_seconds": min(refs),
        }
        print(
            f"default full run (all splits, best of {args.repeats}): {run['seconds']:.1f} s wall "
            f"({run['cpu_seconds']:.1f} s CPU), region phase {run['region_seconds']:.1f} s "
            f"({run['regions_per_s']:.0f} regions/s), text {run['text_seconds']:.1f} s",
            flush=True,
        )
        print(
            f"bare forward on the same batches: {bare_s:.1f} s wall ({bare_cpu:.1f} s CPU) -> whole run / bare "
            f"forward = {run['seconds'] / bare_s:.3f} wall, {run['cpu_seconds'] / bare_cpu:.3f} CPU; "
            f"region phase / bare forward = {run['region_seconds'] / bare_s:.3f} wall",
            flush=True,
        )
        print(
            f"reference recipe alone (region_features=reference) on the same batches: {min(refs):.1f} s wall",
            flush=True,
        )

    default_model = get_encoder("default").build_image_model()
    batches = preload(
        frame.iloc[: max(args.baseline_images, 4 * args.batch_size)], dataset_dir, args.batch_size
    )
    results["default"] = bench_architecture("default", default_model, batches, args.baseline_images)

    rn50 = RegionImageEncoder(build_modified_resnet((3, 4, 6, 3), 64, 1024)).eval()
    batches = preload(frame.iloc[: args.rn50_images], dataset_dir, min(args.batch_size, args.rn50_images))
    results["rn50"] = bench_architecture("RN50", rn50, batches, args.rn50_baseline_images)
    print(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()

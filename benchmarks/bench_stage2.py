"""Stage-2 training throughput: images/s and the share of step time spent waiting for data.

Compares the in-memory loader of :mod:`villa.vlm.data` (images decoded once, flat pair tensors,
batched ``__getitems__``) with a naive same-process baseline (per-item PIL decode + DataFrame row
indexing + per-item text lookup), both feeding the same model, loss and optimiser.

    .venv/bin/python benchmarks/bench_stage2.py --data-dir docmnist_30000_15.2 --steps 8 --batch-size 64

Pairs come from the stage-1 mapping when ``--stage-1-ckpt-dir`` has one; otherwise from ground truth
(every region with its true attributes' sentences), which is fine for timing but nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from villa.datasets import Dataset, read_annotations
from villa.features.embeddings import TextEmbeddingCache
from villa.storage.errors import exit_on_error
from villa.storage.paths import checkpoint_root, resolve_dataset_dir
from villa.vlm.data import build_dataset, build_pairs, collate_region_text, text_embeddings
from villa.vlm.run import DEFAULT_OPTIMIZER, RegionTextLoss


def ground_truth_assigned_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Timing-only stand-in for a stage-1 mapping: each region gets its true attributes' sentences."""
    frame = frame.copy()
    texts = []
    for caption, regions in zip(frame["text"], frame["reg_to_attr"]):
        sentences = [s.strip() for s in caption.split(".") if len(s.strip()) > 3]
        texts.append(
            [" . ".join(next(s for s in sentences if f" {a}" in s) for a in attrs) for attrs in regions]
        )
    frame["assigned_text"] = texts
    return frame


class NaiveDataset(torch.utils.data.Dataset):
    """Baseline: decode the PNG and index the DataFrame for every item, every epoch."""

    def __init__(self, dataset_dir: Path, frame: pd.DataFrame, mode: str, text_of: dict[str, torch.Tensor]):
        self.dataset_dir, self.frame, self.mode, self.text_of = dataset_dir, frame, mode, text_of

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        row = self.frame.iloc[i]
        with Image.open(self.dataset_dir / row["image_filepath"]) as img:
            image = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)
        h, w = row["image_size"]
        boxes, texts = [[0, 0, w - 1, h - 1]], [row["text"]]
        if self.mode == "villa":
            for box, text in zip(row["region_coord"], row["assigned_text"]):
                if text:
                    boxes.append(list(box))
                    texts.append(text)
        boxes = torch.tensor(boxes, dtype=torch.float32)
        return {
            "images": image[None],
            "boxes": torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1),
            "text": torch.stack([self.text_of[t] for t in texts]),
        }


def time_training(model, loader, steps: int, loss_fn, optimizer) -> dict:
    """Run ``steps`` training steps; time spent in ``next(loader)`` counts as waiting for data."""
    model.train()
    wait = compute = 0.0
    images = 0
    it = iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
        images += len(batch["images"])
    total = wait + compute
    return {"images_per_s": images / total, "wait_share": wait / total, "step_s": total / steps}


def time_loader_only(loader) -> float:
    """Images/s of one full epoch of ``loader`` with no model attached."""
    t0 = time.perf_counter()
    images = sum(len(batch["images"]) for batch in loader)
    return images / (time.perf_counter() - t0)


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="docmnist_30000_15.2")
    parser.add_argument("--stage-1-ckpt-dir", default=str(checkpoint_root() / "docmnist_stage1"))
    parser.add_argument("--pairs", default="villa", choices=("villa", "clip"))
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from villa.encoders import get_encoder
    from villa.mapping.schema import mapping_path, read_mapping

    dataset_dir = resolve_dataset_dir(args.data_dir)
    enc = get_encoder(args.encoder, device="cpu")
    cache = TextEmbeddingCache.open(dataset_dir, expected_encoder=enc.name)
    if args.pairs == "villa" and mapping_path(args.stage_1_ckpt_dir, "train").is_file():
        frame, source = read_mapping(args.stage_1_ckpt_dir, "train"), "stage-1 mapping"
    else:
        frame = ground_truth_assigned_text(read_annotations(dataset_dir, "train"))
        source = "ground truth (timing only)" if args.pairs == "villa" else "whole pairs"

    t0 = time.perf_counter()
    fast = build_dataset(Dataset.open(dataset_dir), frame, cache, args.pairs)
    setup_s = time.perf_counter() - t0
    _, _, texts = build_pairs(frame, args.pairs)
    text_of = dict(zip(texts, text_embeddings(texts, cache)))
    naive = NaiveDataset(dataset_dir, frame, args.pairs, text_of)
    print(
        f"{len(fast)} train images, {fast.num_pairs} pairs ({source}); encoder {enc.name}; "
        f"batch {args.batch_size}; {args.steps} steps; {args.threads} threads; num_workers {args.num_workers}"
    )
    print(f"fast loader setup (decode all images once + text embeddings): {setup_s:.2f} s")

    results = {}
    for name, dataset in (("naive", naive), ("villa", fast)):
        gen = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate_region_text,
            num_workers=args.num_workers,
        )
        loader_ips = time_loader_only(loader)
        torch.manual_seed(0)
        model = enc.build_image_model()
        optimizer = DEFAULT_OPTIMIZER(model.parameters())
        time_training(model, loader, 1, RegionTextLoss(), optimizer)  # warm-up
        res = time_training(model, loader, args.steps, RegionTextLoss(), optimizer)
        results[name] = res
        print(
            f"{name:>6} loader: {loader_ips:8.0f} images/s alone (full epoch) | training {res['images_per_s']:6.1f} images/s, "
            f"{res['step_s']:.2f} s/step, waiting for data {100 * res['wait_share']:5.1f}% of step time"
        )
    speedup = results["villa"]["images_per_s"] / results["naive"]["images_per_s"]
    print(f"training speed-up over the naive loader: {speedup:.2f}x")


if __name__ == "__main__":
    main()

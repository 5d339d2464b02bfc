"""Stage-1 speed: seconds per training epoch and mapping images/s, against same-process baselines.

Baselines (what a straightforward port does): training projects with a Python loop over the K heads
(a ModuleList of nn.Sequential) and fetches/collates the batch item by item; mapping runs the model
and the assignment image by image (batch size 1) with per-image sentence choice.

    .venv/bin/python benchmarks/bench_stage1.py                       # synthetic DocMNIST-sized data
    .venv/bin/python benchmarks/bench_stage1.py --data-dir data/docmnist_30000_15.2
    python benchmarks/bench_stage1.py --data-dir DIR --device cuda    # both sides on the GPU

Goals (issue 4): >= 3x per epoch, >= 20x on mapping.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from villa.device import resolve_device
from villa.docmnist.vocabulary import ATTRIBUTES
from villa.mapping.assign import assign_regions, map_split
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import MappingLoss, mapping_loss
from villa.mapping.model import MappingModel
from villa.text import split_sentences


def synthetic(n_images: int, dim: int, seed: int = 0):
    """DocMNIST-like shapes: regions drawn as DocMNIST does for target complexity 16 (2 or 4 pairs each,
    at most 9), 20 attributes, texts with one sentence per attribute."""
    rng = np.random.default_rng(seed)
    pairs = np.where(rng.random((n_images, 9)) < 2 / 3, 4, 2).cumsum(1)
    counts = np.maximum((pairs <= 16).sum(1), 1)
    r_max = int(counts.max())
    regions = torch.from_numpy(rng.normal(size=(n_images, r_max, dim)).astype(np.float32))
    mask = torch.arange(r_max)[None] < torch.from_numpy(counts)[:, None]
    multi_hot = torch.from_numpy(rng.random((n_images, len(ATTRIBUTES))) < 0.5)
    attrs = [[a for a, on in zip(ATTRIBUTES, row) if on] for row in multi_hot.numpy()]
    frame = pd.DataFrame(
        {
            "image_id": np.arange(n_images),
            "num_regions": counts,
            "attributes": attrs,
            "text": [" . ".join(f"the value is {a}" for a in row) for row in attrs],
        }
    )
    attr_embs = F.normalize(
        torch.randn(len(ATTRIBUTES), dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return frame, Stage1Dataset(regions, mask, multi_hot), attr_embs


def real(data_dir: str):
    from villa.annotations import read_annotations

    from villa.embeddings import RegionEmbeddings, load_attr_embs

    frame = read_annotations(data_dir, "train")
    dataset = Stage1Dataset.from_frame(frame, RegionEmbeddings.open(data_dir), ATTRIBUTES)
    return frame, dataset, load_attr_embs(data_dir, ATTRIBUTES)[1]


class LoopHeads(nn.Module):
    """Baseline model: K separate heads, run one after the other."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(k)
        )

    def forward(self, regions, head_index):
        return torch.stack([self.heads[k](regions) for k in head_index.tolist()], dim=2)


def _batches(n: int, batch_size: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def padded_loss(attr_embs):
    """Baseline loss: projections of every (padded) region slot, as the reference computes them."""

    def loss_fn(model, batch):
        heads = batch["multi_hot"].any(0).nonzero().squeeze(1)
        present = batch["multi_hot"][:, heads]
        return mapping_loss(model(batch["regions"], heads), attr_embs[heads], batch["mask"], present)

    return loss_fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, dataset, loss_fn, batch_size, per_item: bool, seed: int = 0) -> float:
    # the baseline uses the reference's plain AdamW; villa's config sets fused=True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not per_item)
    device = dataset.regions.device
    _sync(device)
    start = time.perf_counter()
    for idx in _batches(len(dataset), batch_size, seed):
        batch = (
            collate_stage1([dataset[i] for i in idx])
            if per_item
            else collate_stage1(dataset.__getitems__(idx))
        )
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def map_per_image(model, frame, dataset, attr_embs, epsilon=0.2, seed=0) -> float:
    """Baseline mapping: one image at a time through the (loop-over-heads) model, assignment and sentences."""
    rng = np.random.default_rng(seed)
    heads = torch.arange(len(attr_embs))
    embs = F.normalize(attr_embs, dim=-1)
    device = embs.device
    heads = heads.to(device)
    model.eval()
    _sync(device)
    start = time.perf_counter()
    out_attrs, out_texts = [], []
    for i, (n, text, attrs) in enumerate(zip(frame["num_regions"], frame["text"], frame["attributes"])):
        proj = F.normalize(model(dataset.regions[i : i + 1, :n], heads), dim=-1)
        cos = torch.einsum("brkd,kd->brk", proj, embs)
        present = dataset.multi_hot[i : i + 1]
        assigned = assign_regions(cos, torch.ones(1, n, dtype=torch.bool, device=device), present, epsilon)
        assigned = assigned[0].cpu()
        sentences = split_sentences(text)
        chosen = {a: rng.choice([s for s in sentences if " " + a in s]) for a in attrs}
        names = [[ATTRIBUTES[k] for k in row.nonzero().flatten().tolist()] for row in assigned]
        out_attrs.append(names)
        out_texts.append([" . ".join(chosen[a] for a in region) for region in names])
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="a preprocessed dataset (default: synthetic data)")
    parser.add_argument("--images", type=int, default=1967, help="synthetic train images")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per variant (best is reported)")
    parser.add_argument(
        "--map-images", type=int, default=400, help="images for the per-image mapping baseline"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (both sides run there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    frame, cpu_dataset, attr_embs = real(args.data_dir) if args.data_dir else synthetic(args.images, args.dim)
    dataset = Stage1Dataset(
        *(t.to(device) for t in (cpu_dataset.regions, cpu_dataset.mask, cpu_dataset.multi_hot))
    )
    attr_embs = attr_embs.to(device)
    dim, k = dataset.regions.shape[-1], len(ATTRIBUTES)
    print(
        f"data: {len(dataset)} images, {int(dataset.mask.sum())} regions, dim {dim}, "
        f"threads {args.threads}, device {device}"
    )

    fast_model, slow_model = MappingModel(dim, k, seed=0).to(device), LoopHeads(dim, k).to(device)
    fast = min(
        train_epoch(fast_model, dataset, MappingLoss(attr_embs), args.batch_size, False, r)
        for r in range(args.repeats)
    )
    slow = min(
        train_epoch(slow_model, dataset, padded_loss(attr_embs), args.batch_size, True, r)
        for r in range(args.repeats)
    )
    print(f"train epoch   baseline (loop over heads, padded per-item batches, AdamW) {slow:8.3f} s")
    print(
        f"train epoch   villa    (batched heads, packed regions, arg-max backward on the cached forward, "
        f"fused AdamW) {fast:8.3f} s"
        f"   speed-up {slow / fast:.1f}x"
    )

    n_map = min(args.map_images, len(frame))
    sub = frame.iloc[:n_map].reset_index(drop=True)
    sub_set = Stage1Dataset(dataset.regions[:n_map], dataset.mask[:n_map], dataset.multi_hot[:n_map])
    slow_s = map_per_image(slow_model, sub, sub_set, attr_embs)
    _sync(device)
    start = time.perf_counter()
    map_split(
        fast_model,
        frame,
        cpu_dataset.regions,
        cpu_dataset.mask,
        attr_embs.cpu(),
        ATTRIBUTES,
        seed=0,
        device=device,
    )
    _sync(device)
    fast_s = time.perf_counter() - start
    slow_rate, fast_rate = n_map / slow_s, len(frame) / fast_s
    print(f"mapping       baseline (batch size 1, {n_map} images)        {slow_rate:8.0f} images/s")
    print(
        f"mapping       villa    (text's heads only, chunked, {len(frame)} images) {fast_rate:8.0f} images/s   "
        f"speed-up {fast_rate / slow_rate:6.1f}x"
    )


if __name__ == "__main__":
    main()

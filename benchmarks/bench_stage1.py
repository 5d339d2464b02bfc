"""Stage-1 speed: seconds per training epoch and mapping images/s, against the published code's work.

    python benchmarks/bench_stage1.py                                  # synthetic DocMNIST-sized data
    python benchmarks/bench_stage1.py --data-dir data/docmnist_30000_15.2
    python benchmarks/bench_stage1.py --data-dir DIR --device cuda     # both sides on the GPU

The baseline is our own re-implementation of what the published ViLLA stage-1 code does (docs/method.md section 4;
github.com/StanfordMIMI/villa: ``Stage1_RN50``, ``Stage1_Loss``, ``utils/train.py``, ``utils/mapping.py``),
step for step, run in the same process on the same data as villa's side:

* training (:func:`reference_train_epoch`): shuffled batches of 48 images with the last partial batch
  dropped (its DataLoader's ``drop_last=True``); a batch is its images' REAL regions concatenated into
  one ``[M, D]`` tensor plus each image's region count (its ``collate_grouped``: no padding); the model
  is a ModuleList of the K heads ``Linear -> ReLU -> Linear`` (20 on DocMNIST), run one after the other
  on all ``M`` regions, all K at every step (its forward does not skip absent attributes); the loss normalises the
  projections, scores every region against the attributes present in the batch, takes each image's max
  with one ``max`` per image over ``torch.split`` of the regions, and builds the InfoNCE terms with its
  exp/log formula (which includes the exp(0) quirk); ``torch.optim.AdamW(lr=1e-4)`` with torch's
  defaults (weight decay 0.01, not fused). On CUDA the forward runs under float16 autocast with a
  GradScaler, as the published loop does; on a CPU that autocast is off, so the baseline is float32.
  Not timed: the published loader's per-item pandas lookups, which run in its 8 DataLoader workers.
* mapping (:func:`reference_map`): one image at a time, which is the published way: its mapping loop
  reads ``sample["image_id"][0]`` and ``sample["attr_labels"].squeeze()``, so it is only correct with a
  batch of one image. Per image: all K heads on its regions, then for each attribute of its text the
  region cosines as a Python list; then, image by image, each attribute goes to the regions scoring
  above ``max - epsilon`` (numpy), the caption is split into sentences and one sentence containing the
  attribute is drawn for each attribute, and each region's sentences are joined. Not timed: writing
  the feather file and the metrics (villa's side does neither here).

villa's side is the package's own code: packed real regions, the K heads as one batched op, the
arg-max backward on the cached forward (``MappingLoss``), fused AdamW (villa's config), and
``map_split`` (text's heads only, chunked). Neither side reads region ground truth.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from villa.docmnist.vocabulary import ATTRIBUTES, docmnist_vocabulary
from villa.engine.device import resolve_device
from villa.mapping.assign import map_split
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import TEMPERATURE, MappingLoss
from villa.mapping.model import MappingModel

#: the published stage-1 hyper-parameters (docmnist_stage1.yaml)
REFERENCE_BATCH_SIZE = 48
REFERENCE_LR = 1e-4
EPSILON = 0.2


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
    return frame, Stage1Dataset.from_padded(regions, mask, multi_hot), attr_embs


def real(data_dir: str):
    from villa.datasets import Dataset
    from villa.features.embeddings import RegionEmbeddings, load_attr_embs

    dataset = Dataset.open(data_dir)
    frame = dataset.annotations("train")
    stage1 = Stage1Dataset.from_frame(frame, RegionEmbeddings.open(dataset.root), dataset.vocabulary)
    return frame, stage1, load_attr_embs(dataset.root, dataset.vocabulary.names)[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the published algorithm (baseline)


class ReferenceHeads(nn.Module):
    """The published stage-1 model: K separate heads ``Linear(D, D) -> ReLU -> Linear(D, D)``."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(k)
        )

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """``regions [M, D]`` (a batch's real regions, concatenated) -> ``[M, K, D]``, every head."""
        return torch.stack([head(regions) for head in self.heads], dim=1)


def reference_loss(
    projections: torch.Tensor,
    attr_embs: torch.Tensor,
    counts: Sequence[int],
    multi_hot: torch.Tensor,
    tau: float = TEMPERATURE,
) -> torch.Tensor:
    """The published stage-1 loss.

    Args:
        projections: ``[M, K, D]`` for the batch's concatenated regions; attr_embs: ``[K, D]``
            (L2-normalised, as preprocessing writes them); counts: the B images' region counts (sum M);
        multi_hot: ``[B, K]`` float, the attributes of each image's text (on the CPU, like the
            published batch: picking the present attributes needs no device sync).

    Returns:
        The mean over (image, attribute in its text) of
        ``-log(exp S / (exp S + sum over images of exp(S * [image lacks a])))``: every image that has
        the attribute adds exp(0) = 1 to the denominator (the quirk ``loss.reference_quirk`` keeps).
    """
    proj = F.normalize(projections.float(), dim=2)
    attr_ids = multi_hot.sum(0).nonzero().flatten().tolist()  # the attributes present in the batch
    sim = (proj[:, attr_ids] * attr_embs[attr_ids].unsqueeze(0)).sum(2) / tau  # [M, Kp]
    # each image's score: the max over its own regions, one max per image
    scores = torch.stack([part.max(0).values for part in torch.split(sim, list(counts))])  # [B, Kp]
    present = multi_hot[:, attr_ids].to(scores.device)
    denominator = scores.exp() + (scores * (1 - present)).exp().sum(0, keepdim=True)
    return (-(scores.exp() / denominator).log() * present).sum() / present.sum()


def reference_train_epoch(
    model: ReferenceHeads,
    regions: Sequence[torch.Tensor],
    multi_hot: torch.Tensor,
    attr_embs: torch.Tensor,
    batch_size: int = REFERENCE_BATCH_SIZE,
    seed: int = 0,
) -> float:
    """One epoch of the published training loop; returns its wall seconds.

    Args:
        regions: per image, its real regions ``[R_i, D]`` on the device (the published dataset keeps
            one array per image); multi_hot: ``[N, K]`` float on the CPU.
    """
    device = attr_embs.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=REFERENCE_LR)  # torch defaults: wd 0.01, not fused
    amp = device.type == "cuda"  # the published loop's torch.cuda.amp.autocast is a no-op without CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    order = torch.randperm(len(regions), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(order) - batch_size + 1, batch_size):  # drop_last=True
        idx = order[first : first + batch_size]
        batch = torch.cat([regions[i] for i in idx])  # [M, D], no padding
        counts = [len(regions[i]) for i in idx]
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            projections = model(batch)
        loss = reference_loss(projections, attr_embs, counts, multi_hot[idx])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return time.perf_counter() - start


def _reference_sentence(sentences: list[str], attribute: str, rng: np.random.Generator) -> str:
    """One sentence of the caption that mentions ``attribute`` (lower-cased match on " " + attribute)."""
    candidates = [j for j, s in enumerate(sentences) if f" {attribute}" in s.lower()]
    return sentences[rng.choice(candidates)]


@torch.no_grad()
def reference_map(
    model: ReferenceHeads,
    frame: pd.DataFrame,
    regions: Sequence[torch.Tensor],
    multi_hot: torch.Tensor,
    attr_embs: torch.Tensor,
    vocabulary: Sequence[str] = ATTRIBUTES,
    epsilon: float = EPSILON,
    seed: int = 0,
) -> tuple[list[list[list[str]]], list[list[str]]]:
    """The published mapping, one image at a time.

    Args:
        frame: the split's rows (``text``, ``attributes``, ``num_regions``), in the order of ``regions``
            (per image ``[R_i, D]``); multi_hot: ``[N, K]`` on the CPU.

    Returns:
        Per image, per region: its assigned attributes and its assigned text.
    """
    model.eval()
    # pass 1 (the published `mapping`): the model on one image, cosines per attribute of its text
    cosines = []
    for image_regions, present in zip(regions, multi_hot):
        proj = F.normalize(model(image_regions).float(), dim=2)  # [R, K, D]
        cosines.append(
            {
                vocabulary[a]: (proj[:, a] @ attr_embs[a]).tolist()
                for a in present.nonzero().flatten().tolist()
            }
        )
    # pass 2 (the published `save_reg_attr_maps`): threshold, sentences, texts, image by image
    rng = np.random.default_rng(seed)
    all_attributes, all_texts = [], []
    for scores, text, attributes, n in zip(cosines, frame["text"], frame["attributes"], frame["num_regions"]):
        assigned: list[list[str]] = [[] for _ in range(n)]
        for a in attributes:
            cos = np.array(scores[a])
            for r in np.where(cos > cos.max() - epsilon)[0]:
                assigned[r].append(a)
        sentences = [s.strip() for s in text.split(".") if len(s) > 3]
        sentence_of = {a: _reference_sentence(sentences, a, rng) for a in attributes}
        all_attributes.append(assigned)
        all_texts.append([" . ".join(sentence_of[a] for a in region) for region in assigned])
    return all_attributes, all_texts


# ---------------------------------------------------------------- villa's side


def _batches(n: int, batch_size: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def villa_train_epoch(model, dataset, loss_fn, batch_size, seed: int = 0) -> float:
    """One epoch of villa's batches (no drop_last) with its fused AdamW; returns wall seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=REFERENCE_LR, fused=True)  # villa's config
    device = dataset.regions.device
    _sync(device)
    start = time.perf_counter()
    for idx in _batches(len(dataset), batch_size, seed):
        loss, _ = loss_fn(model, collate_stage1(dataset.__getitems__(idx)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="a preprocessed dataset (default: synthetic data)")
    parser.add_argument("--images", type=int, default=1967, help="synthetic train images")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=REFERENCE_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per side (the best is reported)")
    parser.add_argument(
        "--map-images", type=int, default=0, help="images mapped by the baseline (0: the whole split)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (both sides run there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    frame, cpu_dataset, attr_embs = real(args.data_dir) if args.data_dir else synthetic(args.images, args.dim)
    dataset = cpu_dataset.to(device)
    attr_embs = attr_embs.to(device)
    dim, k = dataset.regions.shape[-1], len(ATTRIBUTES)
    counts = cpu_dataset.counts.tolist()
    per_image = list(torch.split(dataset.regions, counts))  # the baseline's per-image arrays
    multi_hot = cpu_dataset.multi_hot.float()
    print(
        f"data: {len(dataset)} images, {sum(counts)} regions, dim {dim}, threads {args.threads}, "
        f"device {device}, load average {os.getloadavg()[0]:.1f}"
    )

    torch.manual_seed(0)
    villa_model, reference_model = MappingModel(dim, k, seed=0).to(device), ReferenceHeads(dim, k).to(device)
    villa_loss = MappingLoss(attr_embs, reference_quirk=True)  # villa's default loss
    fast = min(
        villa_train_epoch(villa_model, dataset, villa_loss, args.batch_size, r) for r in range(args.repeats)
    )
    slow = min(
        reference_train_epoch(reference_model, per_image, multi_hot, attr_embs, args.batch_size, r)
        for r in range(args.repeats)
    )
    amp = " + fp16 autocast" if device.type == "cuda" else ""
    print(
        f"train epoch   baseline (published: real regions concatenated, loop over {k} heads, "
        f"AdamW{amp}) {slow:8.3f} s"
    )
    print(
        f"train epoch   villa    (batched heads, packed regions, arg-max backward on the cached forward, "
        f"fused AdamW) {fast:8.3f} s   speed-up {slow / fast:.1f}x"
    )

    n_map = len(frame) if args.map_images <= 0 else min(args.map_images, len(frame))
    _sync(device)
    start = time.perf_counter()
    reference_map(reference_model, frame.iloc[:n_map], per_image[:n_map], multi_hot[:n_map], attr_embs)
    _sync(device)
    slow_s = time.perf_counter() - start
    start = time.perf_counter()
    map_split(
        villa_model,
        frame,
        cpu_dataset.regions,
        cpu_dataset.counts,
        attr_embs.cpu(),
        docmnist_vocabulary(),
        seed=0,
        device=device,
    )
    _sync(device)
    fast_s = time.perf_counter() - start
    slow_rate, fast_rate = n_map / slow_s, len(frame) / fast_s
    print(
        f"mapping       baseline (published: one image at a time, {n_map} images) {slow_rate:8.0f} images/s"
    )
    print(
        f"mapping       villa    (text's heads only, chunked, {len(frame)} images) {fast_rate:8.0f} images/s   "
        f"speed-up {fast_rate / slow_rate:6.1f}x"
    )
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

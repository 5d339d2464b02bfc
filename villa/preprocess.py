"""Precompute a dataset's embeddings (SPEC section 3): attribute, region and sentence embeddings.

Writes into the dataset folder, through :mod:`villa.embeddings` (the schema owner):

* ``attr_embs.pth``: per attribute, the mean of its prompts' text embeddings, L2-normalised;
* ``region_embs/``: one vector per region of every image of every split, with the encoder's name,
  dimension, config and ``region_features`` option in the manifest. ``region_features="reference"``
  is the reference recipe (:class:`villa.encoders.RegionImageEncoder`); ``"rich"`` (the default of
  the untrained ``default`` encoder) is :class:`villa.encoders.rich.RichRegionFeatures`: untrained
  multi-block features standardised with TRAIN-split region statistics (no labels) and projected to
  the text dimension. Only these precomputed stage-1 embeddings change; the stage-2 image tower
  (``Encoder.build_image_model()``) is always the reference recipe;
* ``text_embs/``: every distinct caption sentence and attribute prompt, each encoded once.

Images are read as uint8 RGB and scaled to [0, 1]; like the reference we apply no CLIP mean/std
normalisation. Many images go through one forward pass, all their boxes through one RoIAlign call.

Multi-process (torchrun): with ``torch.distributed`` initialised, rank r embeds images
``r::world_size``; rank 0 gathers the parts and writes everything. Without it nothing changes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from villa import distributed
from villa.datasets import Dataset, Vocabulary, region_boxes, region_offsets
from villa.datasets.contract import annotations_path
from villa.device import autocast, resolve_device
from villa.embeddings import RegionEmbeddingWriter, TextEmbeddingCache, file_sha256, save_attr_embs
from villa.encoders.rich import REGION_FEATURES, RichRegionFeatures
from villa.errors import VillaError
from villa.images import NO_RESIZE, ResizePolicy, decode_many, pad_batch, scale_boxes, size_sorted_batches
from villa.text import split_sentences

IMAGE_PREPROCESSING = (
    "RGB uint8 / 255, no mean/std normalisation (reference recipe; a tower may normalise inside), "
    "resized by the encoder's policy (villa/images.py)"
)
#: rows per region shard: large enough that shards stay few, small enough to stream big datasets
SHARD_ROWS = 1 << 16


# --------------------------------------------------------------------------- images
def to_model_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1] on ``device`` (converted there)."""
    tensor = torch.as_tensor(images)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    # cast after the transfer: 4x fewer bytes over PCIe
    return tensor.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


class RegionBatch(collections.namedtuple("RegionBatch", "image_ids counts images boxes")):
    """``image_ids`` [B], ``counts`` [B] regions per image, ``images`` uint8 [B, H, W, 3] (resized by the
    encoder's policy, zero-padded to the batch's largest), ``boxes`` float32 [M, 5] rows
    (batch_index, x0, y0, x1, y1) in resized pixels, with M = counts.sum()."""


def iter_region_batches(
    frame: pd.DataFrame,
    dataset: Dataset,
    batch_size: int,
    policy: ResizePolicy = NO_RESIZE,
    prefetch: int = 2,
) -> Iterator[RegionBatch]:
    """Yield :class:`RegionBatch` es over ``frame``'s images (similar sizes batched together), decoding the
    next ones in a thread while the current batch runs."""
    boxes_all = region_boxes(frame)
    offsets = region_offsets(frame)
    ids = frame["image_id"].to_numpy(dtype=np.int64)
    counts_all = frame["num_regions"].to_numpy(dtype=np.int64)
    paths = dataset.image_paths(frame["image_filepath"].tolist())
    sizes = np.asarray(frame["image_size"].tolist(), dtype=np.int64).reshape(-1, 2)
    scales = policy.box_scales(sizes)
    hint = dataset.rebuild_hint

    def make(positions: np.ndarray) -> RegionBatch:
        counts = counts_all[positions]
        # global region rows of these images: each image's start repeated, plus 0..count-1
        first = np.repeat(offsets[positions] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        rows = first + np.arange(counts.sum())
        scaled = scale_boxes(boxes_all[rows], np.repeat(scales[positions], counts, axis=0))
        boxes = np.concatenate(
            [np.repeat(np.arange(len(positions)), counts)[:, None].astype(np.float32), scaled], axis=1
        )
        decoded = decode_many(
            [paths[i] for i in positions.tolist()], policy, sizes[positions], hint, threads=1
        )
        return RegionBatch(ids[positions], counts, pad_batch(decoded), boxes)

    # decoding releases the GIL, so one thread hides it behind the forward passes
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending: collections.deque = collections.deque()
        for positions in size_sorted_batches(policy.output_sizes(sizes), batch_size):
            pending.append(pool.submit(make, positions))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------- region embeddings
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embed_regions(
    model: torch.nn.Module,
    frame: pd.DataFrame,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 64,
    progress: bool = True,
    amp: bool = False,
    timings: dict | None = None,
    policy: ResizePolicy = NO_RESIZE,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Embed all regions of ``frame``'s images; yields ``(image_ids [B], counts [B], embs [M, D])``.

    ``model`` is a region tower (``model(images [B, 3, H, W] in [0, 1], boxes [M, 5]) -> [M, D]``) already
    on ``device`` in eval mode; images are resized by ``policy``. Batches come in image-size order, not
    ``frame`` order. If ``timings`` is given, ``timings["forward_seconds"]`` accumulates the model time alone.
    """
    total = int(frame["num_regions"].sum())
    bar = tqdm(total=total, unit="region", desc="region embeddings", disable=not progress)
    forward = 0.0
    with bar, torch.inference_mode():
        for batch in iter_region_batches(frame, dataset, batch_size, policy):
            _sync(device)
            start = time.perf_counter()
            images = to_model_input(batch.images, device)
            boxes = torch.from_numpy(batch.boxes).to(device)
            with autocast(device, enabled=amp):
                embs = model(images, boxes)
            embs = embs.float().cpu().numpy()
            forward += time.perf_counter() - start
            bar.update(len(embs))
            yield batch.image_ids, batch.counts, embs
    if timings is not None:
        timings["forward_seconds"] = timings.get("forward_seconds", 0.0) + forward


def shard_frame(frame: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """The images rank ``rank`` of ``world_size`` embeds: rows ``rank::world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return frame.iloc[rank::world_size].reset_index(drop=True)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world_size): explicit, else from torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None or world_size is None:
        return (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    if world_size > 1 and not initialised:
        raise VillaError(
            f"world_size={world_size} needs torch.distributed to be initialised (run under torchrun)"
        )
    return rank, world_size


def _concat_parts(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dim: int):
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids, counts, embs = zip(*parts)
    return np.concatenate(ids), np.concatenate(counts), np.concatenate(embs)


# --------------------------------------------------------------------------- text embeddings
def distinct_sentences(texts: Sequence[str], vocabulary: Vocabulary) -> list[str]:
    """Every attribute prompt (vocabulary order) then every caption sentence, each once, first-seen order."""
    prompts = [p for attr in vocabulary.attributes for p in attr.prompts]
    captions = [s for text in pd.unique(pd.Series(list(texts), dtype=object)) for s in split_sentences(text)]
    return list(dict.fromkeys(prompts + captions))


def attribute_embeddings(
    sentences: Sequence[str], embs: torch.Tensor, vocabulary: Vocabulary
) -> dict[str, torch.Tensor]:
    """attribute -> L2-normalised mean of its prompts' embeddings ``[D]`` (rows of ``embs`` [n, D])."""
    index = {s: i for i, s in enumerate(sentences)}
    out = {}
    for attr in vocabulary.attributes:
        mean = embs[[index[p] for p in attr.prompts]].float().mean(0)
        out[attr.name] = mean / mean.norm().clamp(min=1e-12)
    return out


# --------------------------------------------------------------------------- the whole run
def preprocess_dataset(
    data_dir: str | os.PathLike,
    encoder: str = "default",
    clip_weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    progress: bool = True,
    amp: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    region_features: str | None = None,
) -> dict:
    """Write ``attr_embs.pth``, ``region_embs/`` and ``text_embs/`` for every split of a dataset.

    Args:
        data_dir: dataset folder, or its name under the data root.
        encoder: registered encoder name (``default``, ``clip_rn50``, ``hf:<folder>``).
        clip_weights: weights file for ``clip_rn50``.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        batch_size: images per forward pass.
        amp: run the image tower under CUDA autocast (bf16/fp16). Off by default: the embeddings are a
            one-off artifact, and stage 1 z-scores them, which turns bf16 rounding of a large common
            component into large errors (an H100 run gave a relative error of 0.52 against the CPU).
        rank, world_size: this process's share of the images; default: from ``torch.distributed``
            when initialised, else a single process.
        region_features: ``rich`` | ``reference`` | None (the encoder's ``default_region_features``:
            ``rich`` for the untrained ``default``/``hf:`` towers, ``reference`` for ``clip_rn50``).
    Returns:
        summary dict (num_images, num_regions, seconds, regions_per_s, and a timing breakdown);
        on ranks other than 0 it describes only that rank's share and nothing is written.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise VillaError(f"batch_size must be >= 1, got {batch_size}")
    if region_features is not None and region_features not in REGION_FEATURES:
        raise VillaError(
            f"region_features must be one of {', '.join(REGION_FEATURES)}, got '{region_features}'"
        )
    dataset = Dataset.open(data_dir)
    frame = dataset.annotations()
    device = resolve_device(device)
    # under torchrun, join the process group here unless the caller already did (and then leave it again)
    created_group = rank is None and distributed.launched_by_torchrun() and not distributed.context().enabled
    if created_group:
        distributed.init_distributed(device)
    try:
        rank, world_size = _rank_world(rank, world_size)
        return _preprocess(
            dataset,
            frame,
            encoder=encoder,
            clip_weights=clip_weights,
            device=device,
            batch_size=batch_size,
            progress=progress,
            amp=amp,
            rank=rank,
            world_size=world_size,
            started=started,
            region_features=region_features,
        )
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _preprocess(
    dataset,
    frame,
    *,
    encoder,
    clip_weights,
    device,
    batch_size,
    progress,
    amp,
    rank,
    world_size,
    started,
    region_features=None,
):
    from villa.encoders import get_encoder

    dataset_dir = dataset.root
    part = shard_frame(frame, rank, world_size)
    missing = [p for p in dataset.image_paths(part["image_filepath"].tolist()) if not p.is_file()]
    if missing:
        raise VillaError(
            f"{len(missing)} images listed in the annotations are missing, e.g. {missing[0]}: "
            f"{dataset.rebuild_hint}"
        )
    enc = get_encoder(encoder, clip_weights=clip_weights, device=device)
    policy = ResizePolicy.of(enc)
    if not enc.has_text_tower:
        raise VillaError(
            f"encoder '{encoder}' has no text tower with these weights: cannot write text embeddings"
        )

    # text first: cheap, and a failure here must not leave new region embeddings behind
    t0 = time.perf_counter()
    sentences, sentence_embs = [], None
    if rank == 0:
        sentences = distinct_sentences(frame["text"], dataset.vocabulary)
        sentence_embs = enc.encode_text(sentences)
    text_seconds = time.perf_counter() - t0

    region_features = region_features or enc.default_region_features
    model = enc.build_image_model()
    rich = None
    if region_features == "rich":
        model = rich = RichRegionFeatures(model, enc.dim)
    model = model.to(device).eval()
    timings: dict = {}
    t0 = time.perf_counter()
    batches = embed_regions(
        model, part, dataset, device, batch_size, progress and rank == 0, amp, timings, policy
    )
    extra = {
        "encoder_config": enc.config,
        "dataset_path": str(dataset_dir),
        "image_preprocessing": IMAGE_PREPROCESSING,
        # lets a later stage notice embeddings older than a regenerated annotation table
        "annotations_sha256": file_sha256(annotations_path(dataset_dir)),
        "splits": sorted(frame["split"].unique().tolist()),
        "region_features": region_features,
        "image_policy": {"min_side": policy.min_side, "max_side": policy.max_side},
    }
    extra["encoder_config"]["region_features"] = region_features
    if rich is not None:
        extra["region_features_config"] = rich.config
        finish = _rich_finisher(rich, frame, extra)
        mine = _concat_parts(list(batches), rich.raw_dim)
        if world_size == 1:
            with RegionEmbeddingWriter(dataset_dir, encoder=enc.name, dim=enc.dim, extra=extra) as writer:
                writer.add(*finish([mine]))
        else:
            _gather_and_write(dataset_dir, enc, extra, mine, rank, world_size, finish)
    elif world_size == 1:
        with RegionEmbeddingWriter(dataset_dir, encoder=enc.name, dim=enc.dim, extra=extra) as writer:
            _stream_into(writer, batches, enc.dim)
    else:
        _gather_and_write(dataset_dir, enc, extra, _concat_parts(list(batches), enc.dim), rank, world_size)
    region_seconds = time.perf_counter() - t0

    if rank == 0:
        save_attr_embs(dataset_dir, attribute_embeddings(sentences, sentence_embs, dataset.vocabulary))
        TextEmbeddingCache.write(dataset_dir, enc.name, sentences, sentence_embs, encoder_config=enc.config)
    seconds = time.perf_counter() - started
    num_regions = int(part["num_regions"].sum())
    return {
        "dataset_dir": str(dataset_dir),
        "encoder": enc.name,
        "dim": enc.dim,
        "device": str(device),
        "num_images": len(part),
        "num_regions": num_regions,
        "num_sentences": len(sentences),
        "seconds": round(seconds, 3),
        "region_seconds": round(region_seconds, 3),
        "forward_seconds": round(timings.get("forward_seconds", 0.0), 3),
        "text_seconds": round(text_seconds, 3),
        "regions_per_s": round(num_regions / max(region_seconds, 1e-9), 1),
        "rank": rank,
        "world_size": world_size,
    }


def _stream_into(writer: RegionEmbeddingWriter, batches, dim: int) -> None:
    """Append batches to ``writer`` in shards of about :data:`SHARD_ROWS` rows."""
    buffer, rows, written = [], 0, 0
    for ids, counts, embs in batches:
        buffer.append((ids, counts, embs))
        rows += len(embs)
        if rows >= SHARD_ROWS:
            writer.add(*_concat_parts(buffer, dim))
            buffer, rows, written = [], 0, written + 1
    if buffer or not written:
        writer.add(*_concat_parts(buffer, dim))


def _gather_and_write(
    dataset_dir: Path, enc, extra: dict, mine, rank: int, world_size: int, finish=None
) -> None:
    """Rank 0 gathers every rank's ``(ids, counts, embs)`` and writes one shard per rank.

    With ``finish`` (parts -> one ``(ids, counts, embs)``), rank 0 writes ``finish(parts)`` instead:
    rich features need every rank's train regions for their statistics.
    """
    import torch.distributed as dist

    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank == 0:
        with RegionEmbeddingWriter(dataset_dir, encoder=enc.name, dim=enc.dim, extra=extra) as writer:
            for ids, counts, embs in [finish(parts)] if finish is not None else parts:
                writer.add(ids, counts, embs)
    dist.barrier()


def rich_stats_rows(frame: pd.DataFrame, image_ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, str]:
    """Bool ``[sum counts]``: region rows whose image is in the train split, and the split name used.

    Falls back to every region (``"all"``) when the dataset has no train split (e.g. a test-only set).
    """
    split = pd.Series(frame["split"].to_numpy(), index=frame["image_id"].to_numpy())
    train_images = split.reindex(image_ids).to_numpy() == "train"
    rows = np.repeat(train_images, counts)
    if rows.any():
        return rows, "train"
    return np.ones(len(rows), bool), "all"


def _rich_finisher(rich: RichRegionFeatures, frame: pd.DataFrame, extra: dict):
    """parts of raw rich blocks -> ``(ids, counts, embs [M, D])``: train-split statistics, then projection.

    Records the statistics' provenance in ``extra`` (it is written into the manifest afterwards).
    """

    def finish(parts):
        ids, counts, raw = _concat_parts([p for p in parts if len(p[0])], rich.raw_dim)
        rows, used = rich_stats_rows(frame, ids, counts)
        raw = torch.from_numpy(raw)
        mean, std = rich.fit_stats(raw[torch.from_numpy(rows)])
        extra["region_features_config"]["stats_split"] = used
        extra["region_features_config"]["stats_num_regions"] = int(rows.sum())
        with torch.inference_mode():
            embs = rich.cpu().finalize(raw, mean, std)
        return ids, counts, embs.numpy()

    return finish


# --------------------------------------------------------------------------- command line
def build_parser():
    """The arguments of ``preprocess/preprocess_dataset.py`` (and its alias ``preprocess_docmnist.py``)."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message: str):
            raise VillaError(f"{self.prog}: {message}")

    parser = OneLineParser(
        prog="preprocess_dataset.py",
        description="Write attr_embs.pth, region_embs/ and text_embs/ into a dataset folder.",
    )
    parser.add_argument("--data_dir", required=True, help="dataset folder, or its name under the data root")
    parser.add_argument(
        "--encoder", default="default",
        help="default | clip_rn50 | mobilenet_v2 | hf:<folder> (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--clip_weights", default=None, help="CLIP RN50 weights file (OpenAI RN50.pt or a state dict)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    parser.add_argument(
        "--batch_size", type=int, default=64, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--region_features",
        choices=REGION_FEATURES,
        default=None,
        help="stage-1 region embeddings: rich (untrained multi-block descriptor, default for the "
        "untrained default encoder) | reference (SPEC recipe, default for pretrained towers)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="CUDA mixed precision for the image tower (faster, less exact; the rich stage-1 "
        "features always run in float32)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def cli_main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, preprocess, print the summary as JSON. Errors are one line and exit code 2."""
    import json

    from villa.errors import exit_on_error

    @exit_on_error
    def run() -> dict:
        args = build_parser().parse_args(argv)
        summary = preprocess_dataset(
            args.data_dir,
            encoder=args.encoder,
            clip_weights=args.clip_weights,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            amp=args.amp,
            region_features=args.region_features,
        )
        print(json.dumps(summary, indent=2))
        return summary

    return run()

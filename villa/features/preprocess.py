"""Precompute a dataset's embeddings (docs/method.md section 3): attribute, region and sentence embeddings.

Writes into the dataset folder, through :mod:`villa.features.embeddings` (the schema owner):

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
normalisation. Many images go through one forward pass (at most ``batch_size`` images and
:data:`MAX_BATCH_PIXELS` padded pixels), all their boxes through one RoIAlign call; the next batch is decoded
in a thread meanwhile.

**Memory does not grow with the dataset.** Region rows are written shard by shard (about
:data:`WORK_SHARD_BYTES` each) into the work folder ``region_embs.partial/`` (:class:`villa.features.embeddings.RegionWork`).
For rich features these are the raw blocks, and each shard also records the float64 moments (count, mean, m2)
of its train-split rows (:class:`~villa.encoders.rich.RunningMoments`); a second pass merges the moments into
the train statistics, standardises and projects every shard, and writes ``region_embs/`` through
:class:`~villa.features.embeddings.RegionEmbeddingWriter` (published atomically, with its validation manifest). The
result equals the in-memory recipe (all raw blocks, ``fit_stats``, ``finalize``) to float tolerance. The peak
is one batch's activations plus one shard: about 1.1 GB for the libraries and models, plus up to ~0.7 GB
for a full batch of the rich descriptor.

**Resumable.** A run that is killed or fails (a damaged image, Ctrl-C) keeps its completed shards; the next
run with the same encoder, encoder config, region features, annotations (sha256) and image policy skips the
images they cover and prints one line saying so. Any of those changed, or a damaged shard, discards the work
folder (one printed line) and starts again. The work folder is deleted once ``region_embs/`` is published.

Multi-process (torchrun): with ``torch.distributed`` initialised, rank r embeds images ``r::world_size``
(those no completed shard covers); ranks send each finished shard to rank 0, which alone writes the work
folder and publishes (rank 0 holds one shard per rank at a time). Without it nothing changes.
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

from villa.datasets import Dataset, Vocabulary, region_boxes, region_offsets
from villa.datasets.contract import annotations_path
from villa.datasets.images import (
    NO_RESIZE,
    ResizePolicy,
    decode_many,
    pad_batch,
    scale_boxes,
    size_sorted_batches,
)
from villa.datasets.text import split_sentences
from villa.encoders.rich import REGION_FEATURES, RichRegionFeatures, RunningMoments
from villa.engine import distributed
from villa.engine.device import amp_dtype, autocast, configure_threads, release_freed_memory, resolve_device
from villa.features.embeddings import (
    RegionEmbeddingWriter,
    RegionWork,
    TextEmbeddingCache,
    file_sha256,
    save_attr_embs,
)
from villa.storage.errors import VillaError

IMAGE_PREPROCESSING = (
    "RGB uint8 / 255, no mean/std normalisation (reference recipe; a tower may normalise inside), "
    "resized by the encoder's policy (villa/datasets/images.py)"
)
#: rows per ``region_embs`` shard: large enough that shards stay few, small enough to stream big datasets
SHARD_ROWS = 1 << 16
#: bytes of rows per shard of the work folder (``region_embs.partial/``): what one process keeps in memory
#: between writes (rank 0 of a torchrun job: one per rank) and the most work a killed run loses
WORK_SHARD_BYTES = 64 << 20
#: padded pixels per forward pass at most (besides ``batch_size`` images): the rich descriptor's
#: full-resolution maps take about 0.6 KB a pixel, so the peak follows this, not the image size
#: (DocMNIST's 64 x 84 x 84 fit; 200 x 150 images go 34 to a batch, COCO's 640 x 480 three)
MAX_BATCH_PIXELS = 1 << 20


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
    max_pixels: int | None = None,
) -> Iterator[RegionBatch]:
    """Yield :class:`RegionBatch` es over ``frame``'s images (similar sizes batched together, at most
    ``batch_size`` images and ``max_pixels`` padded pixels each), decoding the next ones in a thread while the
    current batch runs."""
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
        for positions in size_sorted_batches(policy.output_sizes(sizes), batch_size, max_pixels):
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
    max_pixels: int | None = None,
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
        for batch in iter_region_batches(frame, dataset, batch_size, policy, max_pixels=max_pixels):
            _sync(device)
            start = time.perf_counter()
            images = to_model_input(batch.images, device)
            boxes = torch.from_numpy(batch.boxes).to(device)
            with autocast(device, enabled=amp):
                embs = model(images, boxes)
            embs = embs.float().cpu().numpy()
            del images, boxes
            forward += time.perf_counter() - start
            release_freed_memory()
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
    max_batch_pixels: int | None = MAX_BATCH_PIXELS,
) -> dict:
    """Write ``attr_embs.pth``, ``region_embs/`` and ``text_embs/`` for every split of a dataset.

    Args:
        data_dir: dataset folder, or its name under the data root.
        encoder: registered encoder name (``default``, ``clip_rn50``, ``hf:<folder>``).
        clip_weights: weights file for ``clip_rn50``.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        batch_size: images per forward pass.
        max_batch_pixels: padded pixels per forward pass at most (None: no cap); bounds the memory of
            datasets of large images.
        amp: run the image tower under autocast (:func:`villa.engine.device.amp_dtype`: bf16/fp16 on CUDA, bf16 on
            a CPU with native bf16; the rich descriptor always runs in float32). Off by default: the embeddings are a
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
            max_batch_pixels=max_batch_pixels,
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
    max_batch_pixels=MAX_BATCH_PIXELS,
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
    stats_images, stats_split = None, None
    if rich is not None:
        extra["region_features_config"] = rich.config
        stats_images, stats_split = rich_stats_images(frame)
    row_dim = rich.raw_dim if rich is not None else enc.dim
    # everything the stored rows depend on: other values discard the partial work of an earlier run
    autocast_dtype = amp_dtype(device) if amp else None  # what autocast really runs in (None: float32)
    key = {
        "encoder": enc.name,
        "dim": row_dim,
        "amp": None if autocast_dtype is None else str(autocast_dtype),
        "stats_split": stats_split,
        **{k: extra[k] for k in ("encoder_config", "annotations_sha256", "region_features", "image_policy")},
        "region_features_config": extra.get("region_features_config"),
    }

    timings: dict = {}
    t0 = time.perf_counter()
    # rank 0 owns the work folder; every rank skips the images its completed shards already cover
    work = RegionWork.open(dataset_dir, key) if rank == 0 else None
    covered = distributed.broadcast_object(work.covered_ids() if work is not None else None)
    todo = part[~part["image_id"].isin(covered)].reset_index(drop=True) if len(covered) else part
    batches = embed_regions(
        model,
        todo,
        dataset,
        device,
        batch_size,
        progress and rank == 0,
        amp,
        timings,
        policy,
        max_batch_pixels,
    )
    shards = group_shards(batches, row_dim, max(1, WORK_SHARD_BYTES // (4 * row_dim)), stats_images)
    if world_size == 1:
        for shard in shards:
            work.add(*shard)
    else:
        _gather_shards(work, shards, rank, world_size)
    if rank == 0:
        _publish(work, dataset_dir, enc, extra, rich, stats_split)
    if world_size > 1:
        distributed.barrier()
    region_seconds = time.perf_counter() - t0

    if rank == 0:
        save_attr_embs(dataset_dir, attribute_embeddings(sentences, sentence_embs, dataset.vocabulary))
        TextEmbeddingCache.write(dataset_dir, enc.name, sentences, sentence_embs, encoder_config=enc.config)
    seconds = time.perf_counter() - started
    num_regions = int(todo["num_regions"].sum())
    return {
        "dataset_dir": str(dataset_dir),
        "encoder": enc.name,
        "dim": enc.dim,
        "device": str(device),
        "num_images": len(part),
        "num_regions": int(part["num_regions"].sum()),
        "num_images_resumed": len(part) - len(todo),
        "num_sentences": len(sentences),
        "seconds": round(seconds, 3),
        "region_seconds": round(region_seconds, 3),
        "forward_seconds": round(timings.get("forward_seconds", 0.0), 3),
        "text_seconds": round(text_seconds, 3),
        "regions_per_s": round(num_regions / max(region_seconds, 1e-9), 1),
        "rank": rank,
        "world_size": world_size,
    }


def rich_stats_images(frame: pd.DataFrame) -> tuple[pd.Series, str]:
    """Which images' regions the rich statistics use: bool Series by ``image_id``, and the split's name.

    The train split's images; every image (``"all"``) when the train split has no region (e.g. a test-only
    set).
    """
    train = frame["split"].to_numpy() == "train"
    if frame["num_regions"].to_numpy()[train].sum() > 0:
        return pd.Series(train, index=frame["image_id"].to_numpy()), "train"
    return pd.Series(np.ones(len(frame), bool), index=frame["image_id"].to_numpy()), "all"


def group_shards(
    batches, dim: int, shard_rows: int, stats_images: pd.Series | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, np.ndarray] | None]]:
    """Group ``(ids, counts, rows [m, dim])`` batches into shards of at least ``shard_rows`` rows (whole batches).

    Yields ``(ids, counts, rows, moments)``; with ``stats_images`` (bool by image_id), ``moments`` is
    ``(count, float64 [2, dim] mean and m2)`` of the rows of the images it marks (see
    :class:`~villa.encoders.rich.RunningMoments`), accumulated batch by batch; else None.
    """
    buffer, rows, moments = [], 0, None
    for ids, counts, embs in batches:
        buffer.append((ids, counts, embs))
        rows += len(embs)
        if stats_images is not None:
            keep = np.repeat(stats_images.reindex(ids).to_numpy(dtype=bool), counts)
            moments = (moments or RunningMoments(dim)).merge(RunningMoments.of(embs[keep]))
        if rows >= shard_rows:
            yield (
                *_concat_parts(buffer, dim),
                None if moments is None else (moments.count, moments.arrays()),
            )
            buffer, rows, moments = [], 0, None
    if buffer:
        yield (*_concat_parts(buffer, dim), None if moments is None else (moments.count, moments.arrays()))


def _gather_shards(work: RegionWork | None, shards, rank: int, world_size: int) -> None:
    """torchrun: every rank sends its next shard to rank 0, which records them, until every rank is done.

    Rank 0 holds at most one shard per rank; the other ranks write nothing.
    """
    import torch.distributed as dist

    mine = iter(shards)
    while True:
        shard = next(mine, None)
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object(shard, parts, dst=0)
        if rank == 0:
            for part in parts:
                if part is not None:
                    work.add(*part)
        more = distributed.broadcast_object(rank == 0 and any(p is not None for p in parts))
        if not more:
            return


def _publish(work: RegionWork, dataset_dir: Path, enc, extra: dict, rich, stats_split) -> None:
    """Second pass (rank 0): the work folder's shards -> ``region_embs/``, published atomically.

    Rich rows are standardised with the statistics merged over every shard, then projected; shards are
    regrouped into ``region_embs`` shards of about :data:`SHARD_ROWS` rows. The work folder goes afterwards.
    """
    finish = None
    if rich is not None:
        total = RunningMoments(rich.raw_dim)
        for *_, moments in work.shards():
            total.merge(RunningMoments.from_arrays(*moments))
        extra["region_features_config"].update(stats_split=stats_split, stats_num_regions=int(total.count))
        mean, std = total.mean_std()
        rich = rich.cpu()

        def finish(raw: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return rich.finalize(torch.from_numpy(np.array(raw)), mean, std).numpy()

    def finished():
        for ids, counts, rows, _ in work.shards():
            # (the memory-mapped rows as they are: regrouping into shards copies them once)
            yield ids, counts, rows if finish is None else finish(rows)

    with RegionEmbeddingWriter(dataset_dir, encoder=enc.name, dim=enc.dim, extra=extra) as writer:
        _stream_into(writer, finished(), enc.dim)
    work.remove()


def _stream_into(writer: RegionEmbeddingWriter, batches, dim: int) -> None:
    """Append batches to ``writer`` in shards of about :data:`SHARD_ROWS` rows (one empty shard if none)."""
    written = False
    for ids, counts, rows, _ in group_shards(batches, dim, SHARD_ROWS):
        writer.add(ids, counts, rows)
        written = True
    if not written:
        writer.add(*_concat_parts([], dim))


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
        "untrained default encoder) | reference (the reference recipe, default for pretrained towers)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision for the image tower: CUDA, or a CPU with native bf16 (faster, less exact; the "
        "rich stage-1 features always run in float32)",
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads: auto (the usable cores, divided among torchrun's processes on this machine) or N",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def cli_main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, preprocess, print the summary as JSON. Errors are one line and exit code 2."""
    import json

    from villa.storage.errors import exit_on_error

    @exit_on_error
    def run() -> dict:
        args = build_parser().parse_args(argv)
        configure_threads(args.threads)
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

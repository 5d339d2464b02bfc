"""Stage-2 training data: region-text pairs over images served by :class:`villa.images.ImageStore`.

A dataset item is an *image* with all its pairs: the whole image with the whole caption, plus (ViLLA)
every region whose stage-1 assigned text is non-empty. Pairs are stored flat with per-image offsets,
so a batch is gathered with a few tensor index operations (no per-item DataFrame access). Images are kept
decoded in memory when they fit the ``image_cache_mb`` budget, else decoded per batch (in DataLoader workers
when ``num_workers > 0``), resized by the encoder's policy; boxes are scaled to match.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from villa.datasets import Dataset, region_boxes
from villa.embeddings import TextEmbeddingCache
from villa.errors import VillaError
from villa.images import DEFAULT_CACHE_MB, NO_RESIZE, ImageStore, ResizePolicy
from villa.text import split_sentences

PAIR_MODES = ("villa", "clip")


def build_pairs(frame: pd.DataFrame, mode: str = "villa") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training pairs of every image of ``frame``, grouped by image (whole image first).

    ``frame``: annotation rows (``image_size``, ``region_coord``, ``num_regions``, ``text``) and, for
    ``mode="villa"``, the stage-1 column ``assigned_text``. ``mode="clip"``: whole image only.
    Returns (offsets int64 ``[N+1]``, boxes float32 ``[P, 4]`` as x1, y1, x2, y2 in pixels, texts [P]);
    the pairs of image i are ``offsets[i]:offsets[i+1]``.
    """
    if mode not in PAIR_MODES:
        raise VillaError(f"unknown pair mode '{mode}': use one of {', '.join(PAIR_MODES)}")
    n = len(frame)
    sizes = np.asarray(frame["image_size"].tolist(), dtype=np.float32).reshape(n, 2)  # [H, W]
    whole_boxes = np.zeros((n, 4), dtype=np.float32)
    whole_boxes[:, 2] = sizes[:, 1] - 1
    whole_boxes[:, 3] = sizes[:, 0] - 1
    whole_texts = np.asarray(frame["text"].tolist(), dtype=object)
    if mode == "clip":
        return np.arange(n + 1, dtype=np.int64), whole_boxes, whole_texts.tolist()

    if "assigned_text" not in frame.columns:
        raise VillaError("the stage-2 frame has no 'assigned_text' column: read it with villa.mapping.schema")
    counts = frame["num_regions"].to_numpy(dtype=np.int64)
    reg_texts = np.asarray([t for texts in frame["assigned_text"] for t in texts], dtype=object)
    reg_boxes = region_boxes(frame)
    if len(reg_texts) != counts.sum() or len(reg_boxes) != counts.sum():
        raise VillaError("stage-1 mapping does not have one assigned text per region: re-run stage 1")
    keep = np.asarray([len(t) > 0 for t in reg_texts], dtype=bool)
    reg_image = np.repeat(np.arange(n), counts)[keep]

    image_of = np.concatenate([np.arange(n), reg_image])
    order = np.argsort(image_of, kind="stable")  # stable: each image's whole pair stays first
    boxes = np.concatenate([whole_boxes, reg_boxes[keep]])[order]
    texts = np.concatenate([whole_texts, reg_texts[keep]])[order].tolist()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(image_of, minlength=n))]).astype(np.int64)
    return offsets, boxes, texts


def text_embeddings(texts: Sequence[str], cache: TextEmbeddingCache) -> torch.Tensor:
    """Embedding of each text ``[len(texts), D]``: mean of its sentences' (normalised) embeddings, L2-normalised.

    Every distinct text and every distinct sentence is handled once.
    """
    codes, uniques = pd.factorize(pd.Series(list(texts), dtype=object))
    sentence_lists = [split_sentences(t) for t in uniques]
    empty = [t for t, s in zip(uniques, sentence_lists) if not s]
    if empty:
        raise VillaError(f"text without any sentence (longer than 3 characters): '{empty[0]}'")
    flat = [s for sents in sentence_lists for s in sents]
    owner = torch.from_numpy(np.repeat(np.arange(len(uniques)), [len(s) for s in sentence_lists]))
    sent_codes, sent_uniques = pd.factorize(pd.Series(flat, dtype=object))
    sent_embs = torch.from_numpy(np.asarray(cache.lookup(list(sent_uniques)), dtype=np.float32))
    sums = torch.zeros(len(uniques), sent_embs.shape[1]).index_add_(
        0, owner, sent_embs[torch.from_numpy(sent_codes)]
    )
    return torch.nn.functional.normalize(sums, dim=1)[torch.from_numpy(codes)]


class RegionTextDataset(torch.utils.data.Dataset):
    """One item per image: its uint8 image, its pair boxes and the pairs' text embeddings.

    images: an :class:`~villa.images.ImageStore` of N images (or a uint8 tensor ``[N, 3, H, W]``);
    offsets int64 ``[N+1]``; boxes float32 ``[P, 4]`` in STORED pixels (scaled here by the store's resize
    factors); text float32 ``[P, D]``. ``__getitems__`` gathers a whole batch at once and returns the collated
    dict (see :func:`collate_region_text`).
    """

    def __init__(self, images: ImageStore | torch.Tensor, offsets, boxes, text: torch.Tensor):
        self.images = images if isinstance(images, ImageStore) else ImageStore.from_array(images)
        self.offsets = torch.as_tensor(offsets, dtype=torch.int64)
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        self.text = text.float().contiguous()
        if len(self.offsets) != len(self.images) + 1 or not int(self.offsets[-1]) == len(boxes) == len(text):
            raise ValueError("images, offsets, boxes and text embeddings disagree in length")
        owner = torch.repeat_interleave(torch.arange(len(self.images)), self.offsets.diff())
        scales = torch.as_tensor(self.images.scales, dtype=torch.float32)[owner]  # [P, 2] (sy, sx)
        self.boxes = boxes * scales[:, [1, 0, 1, 0]]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_pairs(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Batch of images ``indices``: images uint8 [B,3,H,W], boxes [M,5] (batch index, x1,y1,x2,y2), text [M,D]."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        counts = ends - starts
        batch_of = torch.repeat_interleave(torch.arange(len(idx)), counts)
        first = torch.cumsum(counts, 0) - counts
        rows = starts[batch_of] + torch.arange(int(counts.sum())) - first[batch_of]
        boxes = torch.cat([batch_of[:, None].float(), self.boxes[rows]], dim=1)
        # numpy gathers are single-threaded memcpy: torch's parallel indexing stalls for tens of ms when
        # its second thread is descheduled on a busy 2-core machine
        return {
            "images": self.images.batch(idx.numpy()),
            "boxes": boxes,
            "text": torch.from_numpy(self.text.numpy()[rows.numpy()]),
        }


def collate_region_text(batch) -> dict[str, torch.Tensor]:
    """Collate for :class:`RegionTextDataset`: passes a gathered batch through, merges a list of items."""
    if isinstance(batch, dict):
        return batch
    boxes = []
    for b, item in enumerate(batch):
        item_boxes = item["boxes"].clone()
        item_boxes[:, 0] = b
        boxes.append(item_boxes)
    return {
        "images": torch.cat([item["images"] for item in batch]),
        "boxes": torch.cat(boxes),
        "text": torch.cat([item["text"] for item in batch]),
    }


def image_store(
    dataset: Dataset,
    frame: pd.DataFrame,
    policy: ResizePolicy = NO_RESIZE,
    cache_mb: float = DEFAULT_CACHE_MB,
    progress: bool = True,
    desc: str = "decode",
) -> ImageStore:
    """The :class:`ImageStore` of ``frame``'s images (stored sizes from ``image_size``)."""
    return ImageStore(
        dataset.image_paths(frame["image_filepath"].tolist()),
        np.asarray(frame["image_size"].tolist(), dtype=np.int64).reshape(-1, 2),
        policy,
        cache_mb=cache_mb,
        hint=dataset.rebuild_hint,
        progress=progress,
        desc=desc,
    )


def build_dataset(
    dataset: Dataset,
    frame: pd.DataFrame,
    cache: TextEmbeddingCache,
    mode: str = "villa",
    policy: ResizePolicy = NO_RESIZE,
    cache_mb: float = DEFAULT_CACHE_MB,
    progress: bool = True,
) -> RegionTextDataset:
    """Stage-2 dataset for the rows of ``frame`` (a stage-1 mapping frame, or annotations for ``clip``)."""
    offsets, boxes, texts = build_pairs(frame, mode)
    images = image_store(dataset, frame, policy, cache_mb, progress)
    return RegionTextDataset(images, offsets, boxes, text_embeddings(texts, cache))

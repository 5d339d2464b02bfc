"""Stage-2 training data: region-text pairs over images served by :class:`villa.datasets.images.ImageStore`.

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

from villa.datasets import Dataset, Vocabulary, attribute_multi_hot, region_boxes, whole_image_boxes
from villa.datasets.images import DEFAULT_CACHE_MB, NO_RESIZE, ImageStore, ResizePolicy
from villa.datasets.text import split_sentences
from villa.features.embeddings import TextEmbeddingCache
from villa.storage.errors import VillaError

PAIR_MODES = ("villa", "clip", "all_regions", "random_mapping", "oracle")


def build_pairs(
    frame: pd.DataFrame,
    mode: str = "villa",
    *,
    vocabulary: Vocabulary | None = None,
    seed: int | Sequence[int] = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training pairs of every image of ``frame``, grouped by image (whole image first).

    Every mode pairs the whole image with the whole text; the modes differ in the region pairs they add:

    ================ =========================================================================================
    ``villa``        each region with its stage-1 ``assigned_text`` (regions with an empty text left out)
    ``clip``         none (the CLIP baseline)
    ``all_regions``  every region with the whole text: region-level training without any mapping
    ``random_mapping`` stage 1's (region, attribute) pairs of each image with every attribute moved to as many
                     distinct regions of the same image, drawn at random (``seed``): the same attributes,
                     sentences and pair counts as stage 1, at random places
    ``oracle``       each region with the sentences of its ground-truth attributes (``reg_to_attr``, those
                     the text mentions), chosen by :func:`villa.mapping.assign.choose_sentences` with
                     ``seed``: the pairs a perfect stage 1 would write
    ================ =========================================================================================

    ``frame``: annotation rows (``image_size``, ``region_coord``, ``num_regions``, ``text``); ``villa`` and
    ``random_mapping`` also need stage 1's ``assigned_attributes``/``assigned_text``, ``oracle`` needs
    ``reg_to_attr``. ``vocabulary``: the dataset's (``random_mapping``, ``oracle``). ``seed``: an int or a
    sequence of ints for :func:`numpy.random.default_rng` (the stage-2 runner passes ``[seed, split index]``,
    the seeds stage 1 chose its sentences with).
    Returns (offsets int64 ``[N+1]``, boxes float32 ``[P, 4]`` as x1, y1, x2, y2 in pixels, texts [P]);
    the pairs of image i are ``offsets[i]:offsets[i+1]``.
    """
    if mode not in PAIR_MODES:
        raise VillaError(f"unknown pair mode '{mode}': use one of {', '.join(PAIR_MODES)}")
    n = len(frame)
    whole_boxes = whole_image_boxes(frame)
    whole_texts = np.asarray(frame["text"].tolist(), dtype=object)
    if mode == "clip":
        return np.arange(n + 1, dtype=np.int64), whole_boxes, whole_texts.tolist()

    counts = frame["num_regions"].to_numpy(dtype=np.int64)
    needed = {"villa": ("assigned_text",), "random_mapping": ("assigned_attributes", "assigned_text")}
    for column in needed.get(mode, ()):
        if column not in frame.columns:
            raise VillaError(f"the stage-2 frame has no '{column}' column: read it with villa.mapping.schema")
    if mode in ("random_mapping", "oracle") and vocabulary is None:
        raise ValueError(f"pair mode '{mode}' needs the dataset's vocabulary")
    if mode == "villa":
        reg_texts = np.asarray([t for texts in frame["assigned_text"] for t in texts], dtype=object)
    elif mode == "all_regions":
        reg_texts = np.repeat(whole_texts, counts)
    elif mode == "random_mapping":
        region, attr, sentence = random_mapping_pairs(frame, vocabulary, seed)
        reg_texts = _join_per_region(int(counts.sum()), region, attr, sentence)
    else:
        region, attr, sentence = oracle_pairs(frame, vocabulary, seed)
        reg_texts = _join_per_region(int(counts.sum()), region, attr, sentence)
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


def _join_per_region(
    num_regions: int, region: np.ndarray, attr: np.ndarray, sentence: np.ndarray
) -> np.ndarray:
    """Each region's text from its (region, attribute, sentence) pairs, as stage 1 writes ``assigned_text``:
    the non-empty sentences in vocabulary order joined with " . " (``""`` for a region without any).

    region, attr: int ``[P]``; sentence: object ``[P]``. Returns object ``[num_regions]``.
    """
    from villa.mapping.assign import SENTENCE_SEPARATOR

    order = np.lexsort((attr, region))
    region, sentence = region[order], sentence[order].tolist()
    bounds = np.searchsorted(region, np.arange(num_regions + 1)).tolist()
    joined = [SENTENCE_SEPARATOR.join(filter(None, sentence[s:e])) for s, e in zip(bounds[:-1], bounds[1:])]
    return np.asarray(joined, dtype=object)


def oracle_pairs(
    frame: pd.DataFrame, vocabulary: Vocabulary, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ground-truth (region, attribute, sentence) pairs of ``frame``: each region's ``reg_to_attr``
    attributes that the text mentions, each with the sentence :func:`~villa.mapping.assign.choose_sentences`
    picks for the image and attribute (``seed``: the same seed as stage 1 gives the same sentences).

    Returns region int64 ``[P]`` (index over the frame's regions, in row order), attr int64 ``[P]``
    (vocabulary index), sentence object ``[P]`` (``""`` when no sentence of the text matches).
    """
    from villa.mapping.assign import choose_sentences

    if "reg_to_attr" not in frame.columns or frame["reg_to_attr"].isna().any():
        raise VillaError(
            "pairs=oracle needs ground-truth region labels (reg_to_attr) and this dataset has none: "
            "use pairs=villa, all_regions or random_mapping"
        )
    names = vocabulary.names
    texts = frame["text"].tolist()
    present = vocabulary.match_matrix(texts)  # [N, K], as stage 1 reads it
    truth = attribute_multi_hot([a for regions in frame["reg_to_attr"] for a in regions], names)  # [M, K]
    counts = frame["num_regions"].to_numpy(dtype=np.int64)
    image_of_region = np.repeat(np.arange(len(frame)), counts)
    truth &= present[image_of_region]  # only what the text mentions: the pairs a mapping could find
    mentioned = [[names[k] for k in np.flatnonzero(row)] for row in present]
    sentences = choose_sentences(texts, mentioned, vocabulary, seed)  # [N, K]
    region, attr = np.nonzero(truth)
    return region, attr, sentences[image_of_region[region], attr]


def random_mapping_pairs(
    frame: pd.DataFrame, vocabulary: Vocabulary, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1's (region, attribute, sentence) pairs of ``frame`` with the regions drawn at random.

    An attribute that stage 1 gave to ``c`` regions of an image goes to ``c`` distinct regions of that image
    drawn uniformly (``numpy.random.default_rng(seed)``: same seed, same pairs), with the sentence stage 1
    gave it. So the images, attributes, sentences and pair counts (per image and per attribute) are stage 1's;
    only where they land is random. Returns region int64 ``[P]`` (index over the frame's regions), attr
    int64 ``[P]`` (vocabulary index), sentence object ``[P]``, sorted by image then attribute.
    """
    index = {name: k for k, name in enumerate(vocabulary.names)}
    counts = frame["num_regions"].to_numpy(dtype=np.int64)
    region_attrs = [attrs for regions in frame["assigned_attributes"] for attrs in regions]
    region_texts = [t for texts in frame["assigned_text"] for t in texts]
    if len(region_attrs) != counts.sum() or len(region_texts) != counts.sum():
        raise VillaError("stage-1 mapping does not have one assigned text per region: re-run stage 1")
    unknown = {a for attrs in region_attrs for a in attrs} - index.keys()
    if unknown:
        raise VillaError(
            f"the stage-1 mapping assigns attribute {sorted(unknown)[0]!r}, which is not in the dataset's "
            f"vocabulary: re-run stage 1"
        )
    image_of_region = np.repeat(np.arange(len(frame)), counts)
    per_region = np.fromiter(map(len, region_attrs), dtype=np.int64, count=len(region_attrs))
    pair_region = np.repeat(np.arange(len(region_attrs)), per_region)
    pair_attr = np.fromiter(
        (index[a] for attrs in region_attrs for a in attrs), np.int64, int(per_region.sum())
    )
    pair_sentence = _stage1_pair_sentences(frame, region_attrs, region_texts, image_of_region, vocabulary)

    # one group per (image, attribute): stage 1 gave it group_count[g] regions, all with one sentence
    pair_image = image_of_region[pair_region]
    k = len(index)
    groups, first, group_count = np.unique(pair_image * k + pair_attr, return_index=True, return_counts=True)
    group_image, group_attr = groups // k, groups % k
    available = counts[group_image]  # [G] regions of the group's image
    group_count = np.minimum(group_count, available)
    # c distinct regions uniformly: the c smallest of one uniform key per region (padding keys sort last)
    keys = np.random.default_rng(seed).random((len(groups), int(counts.max(initial=1))))
    keys[np.arange(keys.shape[1])[None, :] >= available[:, None]] = 2.0
    ranks = np.argsort(keys, axis=1, kind="stable")
    take = np.arange(keys.shape[1])[None, :] < group_count[:, None]  # [G, Rmax]
    group_of_pair, local = np.nonzero(take)
    region_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    region = region_start[group_image[group_of_pair]] + ranks[group_of_pair, local]
    return region, group_attr[group_of_pair], pair_sentence[first][group_of_pair]


def _stage1_pair_sentences(frame, region_attrs, region_texts, image_of_region, vocabulary) -> np.ndarray:
    """The sentence stage 1 gave each of its (region, attribute) pairs (object ``[P]``, region-major).

    Stage 1 writes a region's text as the sentences of its attributes, in vocabulary order, joined with
    " . ", leaving out an attribute for which no sentence of the image's text matched (the matcher can find
    an attribute in a sentence of three characters or fewer, which :func:`split_sentences` drops). So a
    region's sentences line up with its attributes, except those without a sentence; those are found with
    the matcher, for the (rare) regions whose counts differ.
    """
    sentences = [split_sentences(t) for t in region_texts]
    n_attrs = np.fromiter(map(len, region_attrs), dtype=np.int64, count=len(region_attrs))
    n_sents = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    aligned = n_attrs == n_sents
    out = np.full(int(n_attrs.sum()), "", dtype=object)
    pair_aligned = np.repeat(aligned, n_attrs)
    out[pair_aligned] = [s for sents, ok in zip(sentences, aligned) if ok for s in sents]
    starts = np.concatenate([[0], np.cumsum(n_attrs)[:-1]])
    texts = frame["text"].tolist()
    for r in np.flatnonzero(~aligned).tolist():
        image_sentences = split_sentences(texts[image_of_region[r]])
        # the sentences choose_sentences could have picked
        matched = vocabulary.affirmed_matrix(image_sentences).any(axis=0) if image_sentences else None
        has = [matched is not None and bool(matched[vocabulary.index(a)]) for a in region_attrs[r]]
        if sum(has) != n_sents[r]:
            raise VillaError("a stage-1 assigned text does not match its assigned attributes: re-run stage 1")
        slots = starts[r] + np.flatnonzero(has)
        out[slots] = sentences[r]
    return out


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

    images: an :class:`~villa.datasets.images.ImageStore` of N images (or a uint8 tensor ``[N, 3, H, W]``);
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
    seed: int | Sequence[int] = 0,
) -> RegionTextDataset:
    """Stage-2 dataset for the rows of ``frame`` (a stage-1 mapping frame for ``villa`` and ``random_mapping``,
    else annotations); ``seed`` goes to :func:`build_pairs`."""
    offsets, boxes, texts = build_pairs(frame, mode, vocabulary=dataset.vocabulary, seed=seed)
    images = image_store(dataset, frame, policy, cache_mb, progress)
    return RegionTextDataset(images, offsets, boxes, text_embeddings(texts, cache))

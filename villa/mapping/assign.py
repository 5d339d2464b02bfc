"""Region-attribute assignment (docs/method.md sections 4.5-4.6) and each region's assigned text, vectorised over a split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from villa.datasets import Vocabulary, attribute_multi_hot
from villa.datasets.text import split_sentences
from villa.storage.errors import VillaError

EPSILON = 0.2
SENTENCE_SEPARATOR = " . "


@torch.no_grad()
def score_regions(
    model: torch.nn.Module,
    regions: torch.Tensor,
    counts: torch.Tensor,
    attr_embs: torch.Tensor,
    present: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Cosine of ``proj_a(region)`` and ``attr_emb(a)`` for every region and the attributes asked for.

    Args:
        regions: ``[M, D]`` packed real regions, image by image; counts: ``[N]`` long, regions per image;
        attr_embs: ``[K, D]``; present: ``[N, K]`` bool, the attributes to score per image (None: all K).
            The assignment only looks at the attributes of an image's text, so mapping projects each
            region with those heads alone (about half the work on DocMNIST).

    Returns:
        ``[M, K]`` float32 on CPU, ``-inf`` on attributes not asked for (not projected). Images are
        processed ``chunk_size`` at a time; a chunk's (region, attribute) pairs are sorted by attribute so
        that each head is one GEMM over all of its regions (:meth:`MappingModel.project_grouped`).
    """
    device = torch.device(device)
    counts = torch.as_tensor(counts).long()
    n, k = len(counts), len(attr_embs)
    present = torch.ones(n, k, dtype=torch.bool) if present is None else present.bool()
    ends = torch.cumsum(counts, 0).tolist()
    was_training = model.training
    model.eval()
    embs = F.normalize(attr_embs.float(), dim=-1).to(device)
    heads = torch.arange(k, device=device)
    out = torch.full((len(regions), k), float("-inf"))
    for start in tqdm(range(0, n, chunk_size), desc="mapping", disable=not progress, leave=False):
        stop = min(start + chunk_size, n)
        row0, row1 = (ends[start - 1] if start else 0), (ends[stop - 1] if stop else 0)
        packed = regions[row0:row1].float()  # [m, D] the chunk's regions, image by image
        image = torch.repeat_interleave(counts[start:stop])  # [m] the chunk image of each region
        pairs = present[start:stop][image]  # [m, K]: (region, attribute) pairs to score
        # sorted by attribute, then region: head k's regions are one block of counts[k] rows
        attr, row = pairs.t().nonzero(as_tuple=True)
        packed = packed.to(device, non_blocking=True)
        proj = model.project_grouped(packed, row.to(device), heads, pairs.sum(0).to(device))  # [P, D]
        # (this einsum sums as forward's "mkd,kd->mk" does: the cosines equal the all-heads ones bit for bit)
        cos = torch.einsum("pd,pd->p", F.normalize(proj.float(), dim=-1), embs[attr.to(device)])  # [P]
        # (flat index: cheaper than a 2-d index_put)
        out[row0:row1].view(-1).index_copy_(0, row * k + attr, cos.cpu())
    model.train(was_training)
    return out


def assign_regions(
    cosine: torch.Tensor, counts: torch.Tensor, present: torch.Tensor, epsilon: float = EPSILON
) -> torch.Tensor:
    """The assignment rule: attribute ``a`` of an image goes to every region scoring > max - epsilon.

    The image's best region(s) for ``a`` are always assigned: with ``epsilon = 0`` exactly the regions
    whose score equals the maximum (ties all included); with ``epsilon > 0`` also those within epsilon.

    Args:
        cosine: ``[M, K]`` packed regions' scores, image by image; counts: ``[N]`` long, regions per image;
        present: ``[N, K]`` bool (attribute mentioned by the image's text).

    Returns:
        ``[M, K]`` bool; False on attributes the text does not mention.
    """
    if not epsilon >= 0:
        raise VillaError(f"mapping epsilon must be >= 0, got {epsilon}")
    counts = torch.as_tensor(counts).long()
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [M]
    k = cosine.shape[1]
    # each image's best score per attribute: a max over its own rows only ([N, K], never [N, R, K])
    best = cosine.new_full((len(counts), k), float("-inf"))
    best.scatter_reduce_(0, image.unsqueeze(1).expand(-1, k), cosine, "amax")
    best = best[image]  # [M, K]
    within = (cosine > best - epsilon) | (cosine >= best)
    return within & present.bool()[image]


def choose_sentences(
    texts: Sequence[str],
    attribute_lists: Sequence[Sequence[str]],
    vocabulary: Vocabulary,
    seed: int | Sequence[int],
) -> np.ndarray:
    """For each image and each attribute of its text, one sentence of the text that mentions the attribute.

    "Mentions" is the vocabulary's matcher (whole word or phrase, any of its ``match`` forms) as
    :meth:`~villa.datasets.Vocabulary.affirmed_matrix` reads it: a sentence that denies the attribute ("no
    star") is never chosen, whatever the policy, so no region is paired with a sentence denying it. On DocMNIST
    this is the reference's test for ``" " + attribute`` in the lower-cased sentence. The choice among several
    candidate sentences is uniform, from ``numpy.random.default_rng(seed)`` (same seed, same choice).
    Sentences come from :func:`villa.datasets.text.split_sentences`.

    Returns:
        object array ``[N, K]`` of sentences; ``""`` where the attribute is absent or no sentence matches.
    """
    sentences = [split_sentences(t) for t in texts]
    counts = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    flat = [s for group in sentences for s in group]
    n, k = len(sentences), len(vocabulary)
    chosen = np.full((n, k), "", dtype=object)
    if len(flat) == 0:
        return chosen
    match = vocabulary.affirmed_matrix(flat)
    # a random key per (sentence, attribute); the best-keyed matching sentence of each image wins
    keys = np.random.default_rng(seed).random((len(flat), k))
    keys[~match] = -1.0
    image = np.repeat(np.arange(n), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    position = np.arange(len(flat)) - offsets[image]
    padded = np.full((n, int(counts.max()), k), -1.0)
    padded[image, position] = keys
    best = padded.argmax(axis=1)  # [N, K]
    found = padded.max(axis=1) >= 0
    found &= attribute_multi_hot(attribute_lists, vocabulary.names)
    rows, cols = np.nonzero(found)
    chosen[rows, cols] = np.asarray(flat, dtype=object)[offsets[rows] + best[rows, cols]]
    return chosen


def assigned_columns(
    assigned: torch.Tensor | np.ndarray,
    counts: torch.Tensor | np.ndarray,
    sentences: np.ndarray,
    vocabulary: Sequence[str],
) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Turn the assignment into the output columns.

    Args:
        assigned: ``[M, K]`` bool over the packed regions, image by image; counts: ``[N]`` regions per image;
        sentences: ``[N, K]`` from :func:`choose_sentences`.

    Returns:
        ``assigned_attributes`` (per image, per region, attribute names in vocabulary order) and
        ``assigned_text`` (per image, per region, the attributes' sentences joined with " . ").
    """
    flat = np.asarray(assigned, dtype=bool)  # [M, K], regions in image order then region order
    counts_per_image = np.asarray(counts, dtype=np.int64)
    image_of_region = np.repeat(np.arange(len(counts_per_image)), counts_per_image)
    region, attr = np.nonzero(flat)  # sorted by region, then vocabulary order
    names = np.asarray(list(vocabulary), dtype=object)[attr].tolist()
    texts = sentences[image_of_region[region], attr].tolist()
    # (list slices: one np.split array per region cost more than the rest of this function)
    ends = np.cumsum(flat.sum(1)).tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    region_attrs = [names[s:e] for s, e in bounds]
    region_texts = [SENTENCE_SEPARATOR.join(filter(None, texts[s:e])) for s, e in bounds]
    image_ends = np.cumsum(counts_per_image).tolist()
    image_bounds = list(zip([0] + image_ends[:-1], image_ends))
    return [region_attrs[s:e] for s, e in image_bounds], [region_texts[s:e] for s, e in image_bounds]


def map_split(
    model: torch.nn.Module,
    frame: pd.DataFrame,
    regions: torch.Tensor,
    counts: torch.Tensor,
    attr_embs: torch.Tensor,
    vocabulary: Vocabulary,
    *,
    epsilon: float = EPSILON,
    seed: int | Sequence[int] = 0,
    device: torch.device | str = "cpu",
    chunk_size: int = 256,
    progress: bool = False,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Assign the attributes of every image of one split to its regions.

    The split is mapped ``chunk_size`` images at a time (scores, assignment, sentence choice and output
    columns), so what memory the mapping needs beyond its output follows one chunk, whatever the split's
    size or vocabulary. The result does not depend on ``chunk_size``: the sentences are drawn from one
    seeded generator in image order.

    Args:
        frame: the split's annotation rows (N); regions ``[M, D]`` packed real regions, image by image, and
            counts ``[N]`` regions per image, in the frame's order.

    Returns:
        (frame + ``assigned_attributes`` + ``assigned_text``, flat assignment ``[M, K]`` bool over the
        split's M regions, for the metrics).
    """
    if not epsilon >= 0:
        raise VillaError(f"mapping epsilon must be >= 0, got {epsilon}")
    counts = torch.as_tensor(counts).long()
    texts, names = frame["text"].tolist(), vocabulary.names
    ends = np.cumsum(counts.numpy()).tolist()
    rng = np.random.default_rng(seed)  # one stream over the chunks: the choice of one whole-split draw
    assigned = np.zeros((len(regions), len(names)), dtype=bool)
    attrs: list = []
    region_texts: list = []
    for start in tqdm(range(0, len(frame), chunk_size), desc="mapping", disable=not progress, leave=False):
        stop = min(start + chunk_size, len(frame))
        row0, row1 = (ends[start - 1] if start else 0), ends[stop - 1]
        chunk_counts = counts[start:stop]
        # the attributes each image's TEXT mentions: the only ones the mapping may assign
        present = torch.from_numpy(vocabulary.match_matrix(texts[start:stop]))
        cosine = score_regions(
            model, regions[row0:row1], chunk_counts, attr_embs, present, chunk_size=chunk_size, device=device
        )
        chunk_assigned = assign_regions(cosine, chunk_counts, present, epsilon).numpy()
        mentioned = [[names[c] for c in np.flatnonzero(row)] for row in present.numpy()]
        sentences = choose_sentences(texts[start:stop], mentioned, vocabulary, rng)
        chunk_attrs, chunk_texts = assigned_columns(chunk_assigned, chunk_counts, sentences, names)
        assigned[row0:row1] = chunk_assigned
        attrs += chunk_attrs
        region_texts += chunk_texts
    out = frame.copy()
    out["assigned_attributes"] = attrs
    out["assigned_text"] = region_texts
    return out, assigned

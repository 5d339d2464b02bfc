"""Region-attribute assignment (SPEC section 4) and each region's assigned text, vectorised over a split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from villa.datasets import Vocabulary, attribute_multi_hot
from villa.errors import VillaError
from villa.text import split_sentences

EPSILON = 0.2
SENTENCE_SEPARATOR = " . "


@torch.no_grad()
def score_regions(
    model: torch.nn.Module,
    regions: torch.Tensor,
    attr_embs: torch.Tensor,
    mask: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Cosine of ``proj_a(region)`` and ``attr_emb(a)`` for every real region and the attributes asked for.

    Args:
        regions: ``[N, R, D]``; attr_embs: ``[K, D]``; mask: ``[N, R]`` bool (None: all regions real);
        present: ``[N, K]`` bool, the attributes to score per image (None: all K). The assignment
            only looks at the attributes of an image's text, so mapping projects each region with
            those heads alone (about half the work on DocMNIST).

    Returns:
        ``[N, R, K]`` float32 on CPU, ``-inf`` on padding and on attributes not asked for (neither is
        projected). Images are processed ``chunk_size`` at a time; a chunk's (region, attribute) pairs
        are sorted by attribute so that each head is one GEMM over all of its regions
        (:meth:`MappingModel.project_grouped`).
    """
    device = torch.device(device)
    n, r = regions.shape[:2]
    mask = torch.ones(n, r, dtype=torch.bool) if mask is None else mask.bool()
    k = len(attr_embs)
    present = torch.ones(n, k, dtype=torch.bool) if present is None else present.bool()
    was_training = model.training
    model.eval()
    embs = F.normalize(attr_embs.float(), dim=-1).to(device)
    heads = torch.arange(k, device=device)
    out = torch.full((n, r, k), float("-inf"))
    for start in tqdm(range(0, n, chunk_size), desc="mapping", disable=not progress, leave=False):
        chunk = slice(start, start + chunk_size)
        packed = regions[chunk][mask[chunk]].float()  # [m, D] real regions, image by image
        image = mask[chunk].nonzero()[:, 0]  # [m] the chunk image of each packed region
        pairs = present[chunk][image]  # [m, K]: (region, attribute) pairs to score
        # sorted by attribute, then region: head k's regions are one block of counts[k] rows
        attr, row = pairs.t().nonzero(as_tuple=True)
        packed = packed.to(device, non_blocking=True)
        proj = model.project_grouped(packed, row.to(device), heads, pairs.sum(0).to(device))  # [P, D]
        # (this einsum sums as forward's "mkd,kd->mk" does: the cosines equal the all-heads ones bit for bit)
        cos = torch.einsum("pd,pd->p", F.normalize(proj.float(), dim=-1), embs[attr.to(device)])  # [P]
        scores = torch.full((len(packed) * k,), float("-inf"))
        scores.index_copy_(0, row * k + attr, cos.cpu())  # (flat index: cheaper than a 2-d index_put)
        out[chunk][mask[chunk]] = scores.view(-1, k)
    model.train(was_training)
    return out


def assign_regions(
    cosine: torch.Tensor, mask: torch.Tensor, present: torch.Tensor, epsilon: float = EPSILON
) -> torch.Tensor:
    """The assignment rule: attribute ``a`` of an image goes to every real region scoring > max - epsilon.

    The image's best region(s) for ``a`` are always assigned: with ``epsilon = 0`` exactly the regions
    whose score equals the maximum (ties all included); with ``epsilon > 0`` also those within epsilon.

    Args:
        cosine: ``[N, R, K]``; mask: ``[N, R]`` bool (True = real region); present: ``[N, K]`` bool
            (attribute mentioned by the image's text).

    Returns:
        ``[N, R, K]`` bool; False on padding and on attributes the text does not mention.
    """
    if not epsilon >= 0:
        raise VillaError(f"mapping epsilon must be >= 0, got {epsilon}")
    mask3 = mask.bool().unsqueeze(-1)
    best = cosine.masked_fill(~mask3, float("-inf")).amax(dim=1, keepdim=True)  # [N, 1, K]
    within = (cosine > best - epsilon) | (cosine >= best)
    return within & mask3 & present.bool().unsqueeze(1)


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
    Sentences come from :func:`villa.text.split_sentences`.

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
    mask: torch.Tensor | np.ndarray,
    sentences: np.ndarray,
    vocabulary: Sequence[str],
) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Turn the assignment into the output columns.

    Args:
        assigned: ``[N, R, K]`` bool; mask: ``[N, R]`` bool; sentences: ``[N, K]`` from :func:`choose_sentences`.

    Returns:
        ``assigned_attributes`` (per image, per region, attribute names in vocabulary order) and
        ``assigned_text`` (per image, per region, the attributes' sentences joined with " . ").
    """
    assigned, mask = np.asarray(assigned, dtype=bool), np.asarray(mask, dtype=bool)
    flat = assigned[mask]  # [M, K], regions in image order then region order
    counts_per_image = mask.sum(1)
    image_of_region = np.repeat(np.arange(len(mask)), counts_per_image)
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
    mask: torch.Tensor,
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

    Args:
        frame: the split's annotation rows (N); regions ``[N, R, D]`` / mask ``[N, R]`` in the same order.

    Returns:
        (frame + ``assigned_attributes`` + ``assigned_text``, flat assignment ``[M, K]`` bool over the
        split's M real regions, for the metrics).
    """
    if not epsilon >= 0:
        raise VillaError(f"mapping epsilon must be >= 0, got {epsilon}")
    # the attributes each image's TEXT mentions: the only ones the mapping may assign
    present = torch.from_numpy(vocabulary.match_matrix(frame["text"].tolist()))
    cosine = score_regions(
        model, regions, attr_embs, mask, present, chunk_size=chunk_size, device=device, progress=progress
    )
    assigned = assign_regions(cosine, mask, present, epsilon).numpy()
    names = vocabulary.names
    mentioned = [[names[c] for c in np.flatnonzero(row)] for row in present.numpy()]
    sentences = choose_sentences(frame["text"].tolist(), mentioned, vocabulary, seed)
    attrs, texts = assigned_columns(assigned, mask.numpy(), sentences, names)
    out = frame.copy()
    out["assigned_attributes"] = attrs
    out["assigned_text"] = texts
    return out, assigned[mask.numpy().astype(bool)]

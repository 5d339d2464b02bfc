"""Retrieval metrics between regions and attribute texts (SPEC section 6), vectorised in torch.

All functions take cosine similarities (or any scores) and boolean ground truth; nothing loops over
regions or attributes in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PRECISION_KS = (1, 5, 10)


def _ranked_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cumulative number of relevant items in each row's ranking.

    scores ``[Q, N]`` (higher = better), labels bool ``[Q, N]`` -> int64 ``[Q, N]``: entry ``[q, j]``
    counts relevant items among row q's top ``j + 1``. Ties keep the original item order (stable sort),
    so results are deterministic.
    """
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return torch.cumsum(labels.gather(1, order).long(), dim=1)


def r_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-query R-Precision ``[Q]`` in [0, 1]; R = number of relevant items; NaN where R = 0.

    scores ``[Q, N]``, labels bool ``[Q, N]``.
    """
    labels = labels.bool()
    hits = _ranked_hits(scores, labels)
    r = labels.sum(dim=1)
    at_r = hits.gather(1, (r - 1).clamp(min=0)[:, None]).squeeze(1).double()
    return torch.where(r > 0, at_r / r.clamp(min=1).double(), torch.full_like(at_r, float("nan")))


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query precision among the top ``k`` ``[Q]`` (k capped at N); NaN where a query has no relevant item."""
    labels = labels.bool()
    k = min(int(k), scores.shape[1])
    hits = _ranked_hits(scores, labels)[:, k - 1].double() / k
    return torch.where(labels.any(dim=1), hits, torch.full_like(hits, float("nan")))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row ROC AUC ``[Q]`` in [0, 1] from ranks (Mann-Whitney U); tied scores get their average rank.

    scores ``[Q, N]``, labels bool ``[Q, N]``; NaN for rows without both positives and negatives.
    """
    labels = labels.bool()
    scores = scores.double()
    sorted_scores = torch.sort(scores, dim=1).values
    low = torch.searchsorted(sorted_scores, scores, side="left")
    high = torch.searchsorted(sorted_scores, scores, side="right")
    ranks = (low + high + 1).double() / 2  # 1-based average rank of each tie group
    pos = labels.sum(dim=1).double()
    neg = labels.shape[1] - pos
    rank_sum = (ranks * labels).sum(dim=1)
    auc = (rank_sum - pos * (pos + 1) / 2) / (pos * neg).clamp(min=1)
    return torch.where((pos > 0) & (neg > 0), auc, torch.full_like(auc, float("nan")))


def _nanmean_percent(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean() * 100) if len(valid) else float("nan")


def retrieval_metrics(
    region_embs: torch.Tensor,
    attr_embs: torch.Tensor,
    labels: torch.Tensor,
    attribute_names: Sequence[str],
) -> dict:
    """All evaluation metrics, in percent.

    region_embs ``[M, D]`` and attr_embs ``[K, D]`` (normalised here, so scores are cosines);
    labels bool ``[M, K]``: region m truly carries attribute k.

    Text->region: every attribute ranks all M regions (R-Precision, precision@1/5/10), macro over
    attributes carried by at least one region. Region->text: every region ranks the K attributes
    (R-Precision), mean over regions with at least one attribute. Zero-shot AUROC per attribute, macro.
    """
    regions = torch.nn.functional.normalize(region_embs.double(), dim=1)
    attrs = torch.nn.functional.normalize(attr_embs.double().to(regions.device), dim=1)
    labels = labels.bool().to(regions.device)
    if labels.shape != (regions.shape[0], attrs.shape[0]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match {regions.shape[0]} x {attrs.shape[0]}")
    sims = regions @ attrs.T  # [M, K]
    t2r = sims.T.contiguous()
    t2r_labels = labels.T.contiguous()

    per_rp = r_precision(t2r, t2r_labels)
    per_pk = {k: precision_at_k(t2r, t2r_labels, k) for k in PRECISION_KS}
    per_auc = auroc(t2r, t2r_labels)
    r2t = r_precision(sims, labels)
    counts = t2r_labels.sum(dim=1)

    def pct(x: torch.Tensor) -> float | None:
        return None if torch.isnan(x) else float(x * 100)

    per_attribute = {
        name: {
            "r_precision": pct(per_rp[k]),
            "auroc": pct(per_auc[k]),
            **{f"precision_at_{p}": pct(per_pk[p][k]) for p in PRECISION_KS},
            "num_regions": int(counts[k]),
        }
        for k, name in enumerate(attribute_names)
    }
    return {
        "text_to_region_r_precision": _nanmean_percent(per_rp),
        "region_to_text_r_precision": _nanmean_percent(r2t),
        **{f"precision_at_{p}": _nanmean_percent(per_pk[p]) for p in PRECISION_KS},
        "zero_shot_auroc": _nanmean_percent(per_auc),
        "num_regions": int(regions.shape[0]),
        "num_attributes_present": int((counts > 0).sum()),
        "per_attribute": per_attribute,
    }

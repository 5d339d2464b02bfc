"""Retrieval metrics between regions and attribute texts (docs/method.md section 6.1), vectorised in torch.

All functions take cosine similarities (or any scores) and boolean ground truth; nothing loops over
regions or attributes in Python.

A summary metric without a value (no query with a relevant item, no attribute with both positive and
negative regions) is None: ``null`` in ``metrics.json``, "n/a" when printed. :func:`retrieval_metrics` also
lists the metrics that are ``trivial`` on the data (the same value whatever the model: region->text
R-Precision with one attribute), and :func:`metric_warnings` turns those, the undefined ones and a small
split into one-line warnings.
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


#: a split with fewer images gets the ``small_split`` flag and a warning
SMALL_SPLIT_IMAGES = 20


def _nanmean_percent(values: torch.Tensor) -> float | None:
    valid = values[~torch.isnan(values)]
    return float(valid.mean() * 100) if len(valid) else None


def _all_relevant(labels: torch.Tensor) -> bool:
    """Whether every query of ``labels [Q, N]`` that has a relevant item has only relevant items (its
    ranking cannot be wrong), with at least one such query."""
    counted = labels.any(dim=1)
    return bool(counted.any()) and bool(labels[counted].all())


def retrieval_metrics(
    region_embs: torch.Tensor,
    attr_embs: torch.Tensor,
    labels: torch.Tensor,
    attribute_names: Sequence[str],
) -> dict:
    """All evaluation metrics, in percent, of the cosines of ``region_embs`` with ``attr_embs``.

    region_embs ``[M, D]`` and attr_embs ``[K, D]`` (normalised here, so scores are cosines);
    labels bool ``[M, K]``: region m truly carries attribute k. See :func:`retrieval_metrics_from_scores`.
    """
    regions = torch.nn.functional.normalize(region_embs.double(), dim=1)
    attrs = torch.nn.functional.normalize(attr_embs.double().to(regions.device), dim=1)
    if labels.shape != (regions.shape[0], attrs.shape[0]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match {regions.shape[0]} x {attrs.shape[0]}")
    return retrieval_metrics_from_scores(regions @ attrs.T, labels, attribute_names)


def retrieval_metrics_from_scores(
    sims: torch.Tensor, labels: torch.Tensor, attribute_names: Sequence[str]
) -> dict:
    """All evaluation metrics, in percent, of scores ``sims [M, K]`` (higher: unit m more likely shows
    attribute k; cosines, or an image's best cosine over its regions); labels bool ``[M, K]``.

    Text->region: every attribute ranks all M regions (R-Precision, precision@1/5/10), macro over
    attributes carried by at least one region. Region->text: every region ranks the K attributes
    (R-Precision), mean over regions with at least one attribute. Zero-shot AUROC per attribute, macro.
    A summary without any query to average is None. ``trivial`` lists the summary keys whose every query
    has only relevant items, so the score is 100 whatever the embeddings (region->text with one
    attribute, or when every region carries every attribute; text->region when every region carries every
    attribute, e.g. a single region).
    """
    sims = sims.double()
    labels = labels.bool().to(sims.device)
    if labels.shape != sims.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match scores {tuple(sims.shape)}")
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
    trivial = []
    if _all_relevant(t2r_labels):
        trivial += ["text_to_region_r_precision", *(f"precision_at_{p}" for p in PRECISION_KS)]
    if _all_relevant(labels):
        trivial.append("region_to_text_r_precision")
    return {
        "text_to_region_r_precision": _nanmean_percent(per_rp),
        "region_to_text_r_precision": _nanmean_percent(r2t),
        **{f"precision_at_{p}": _nanmean_percent(per_pk[p]) for p in PRECISION_KS},
        "zero_shot_auroc": _nanmean_percent(per_auc),
        "num_regions": int(sims.shape[0]),
        "num_attributes_present": int((counts > 0).sum()),
        "per_attribute": per_attribute,
        "trivial": trivial,
    }


def metric_warnings(metrics: dict, keys: Sequence[str], num_images: int, unit: str = "region") -> list[str]:
    """One-line warnings about the summary ``keys`` of ``metrics`` (a :func:`retrieval_metrics` dict whose
    ``trivial`` names keys among ``keys``): a split under :data:`SMALL_SPLIT_IMAGES` images, the trivial
    metrics (one line per reason) and the metrics without a value. ``unit``: what was ranked, ``region`` or
    ``image``."""
    out = []
    if num_images < SMALL_SPLIT_IMAGES:
        out.append(
            f"only {num_images} image{'' if num_images == 1 else 's'} in this split (under {SMALL_SPLIT_IMAGES}): "
            "every figure rests on very few examples"
        )
    trivial = [k for k in keys if k in metrics.get("trivial", ())]
    ranking_texts = [k for k in trivial if k.startswith(f"{unit}_to_text")]
    ranking_units = [k for k in trivial if k not in ranking_texts]
    for group, why in (
        (ranking_units, f"every {unit} carries every attribute present (e.g. a single {unit})"),
        (ranking_texts, f"every {unit} carries every attribute it ranks (e.g. a single attribute)"),
    ):
        if group:
            out.append(f"trivial here, 100 whatever the model: {', '.join(group)} ({why})")
    undefined = [k for k in keys if k not in trivial and metrics.get(k) is None]
    if undefined:
        out.append(f"undefined here (n/a): {', '.join(undefined)} (no attribute or {unit} could be scored)")
    return out

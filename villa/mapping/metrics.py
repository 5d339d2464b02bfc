"""Mapping quality against the ground truth ``reg_to_attr`` (evaluation only; never used in training).

The truth is :func:`villa.datasets.region_truth`: each region's labelled attributes that its image's text
mentions (the pairs a mapping can find; all of them on DocMNIST).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _prf(assigned: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp, n_assigned, n_true = int((assigned & truth).sum()), int(assigned.sum()), int(truth.sum())
    precision = 100.0 * tp / n_assigned if n_assigned else 0.0
    recall = 100.0 * tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def mapping_metrics(
    assigned: np.ndarray,
    truth: np.ndarray,
    vocabulary: Sequence[str],
    attribute_kind: Mapping[str, str] | None = None,
) -> dict:
    """Precision, recall and F1 (percent) of assigned region-attribute pairs, overall and per kind.

    precision = correct pairs / assigned pairs, recall = correct pairs / true pairs (SPEC section 4);
    0 where a denominator is 0.

    Args:
        assigned, truth: ``[M, K]`` bool over the same M regions and K = len(vocabulary) attributes.
        attribute_kind: attribute -> kind; per_kind holds one {precision, recall, f1} per kind.

    Returns:
        ``{"precision", "recall", "f1", "per_kind": {kind: {"precision", "recall", "f1"}}}``.
    """
    assigned, truth = np.asarray(assigned, dtype=bool), np.asarray(truth, dtype=bool)
    if assigned.shape != truth.shape or assigned.shape[1] != len(vocabulary):
        raise ValueError(
            f"assignment {assigned.shape} and truth {truth.shape} do not match {len(vocabulary)}"
        )
    out: dict = _prf(assigned, truth)
    out["per_kind"] = {}
    if attribute_kind is not None:
        kinds = np.asarray([attribute_kind[a] for a in vocabulary])
        for kind in dict.fromkeys(kinds.tolist()):
            cols = kinds == kind
            out["per_kind"][kind] = _prf(assigned[:, cols], truth[:, cols])
    return out


def format_metrics_table(metrics: Mapping[str, Mapping]) -> str:
    """A fixed-width table: one line per split with P / R / F1 and the F1 of each kind."""
    kinds = list(dict.fromkeys(k for m in metrics.values() for k in m.get("per_kind", {})))
    header = f"{'split':<6} {'precision':>9} {'recall':>7} {'F1':>6}" + "".join(
        f" {k + ' F1':>9}" for k in kinds
    )
    lines = [header]
    for split, m in metrics.items():
        per_kind = "".join(f" {m['per_kind'][k]['f1']:>9.1f}" for k in kinds)
        lines.append(f"{split:<6} {m['precision']:>9.1f} {m['recall']:>7.1f} {m['f1']:>6.1f}" + per_kind)
    return "\n".join(lines)

"""Mapping quality against the ground truth ``reg_to_attr`` (evaluation only; never used in training).

The truth is :func:`villa.datasets.region_truth`: each region's labelled attributes that its image's text
mentions (the pairs a mapping can find; all of them on DocMNIST).

A figure without a value is None (``null`` in ``mapping_metrics.json``, "n/a" in the table): precision when
nothing was assigned, recall and F1 when there is no true pair (a kind that no region of the split carries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from villa.evaluation.report import fmt


def _prf(assigned: np.ndarray, truth: np.ndarray) -> dict[str, float | int | None]:
    """P / R / F1 in percent and the two denominators; None where a figure is 0/0.

    F1 is None when recall is (no true pair: nothing to find); when nothing was assigned but there are
    true pairs, precision is None and F1 is 0 (nothing was found), as ``2 * correct / (assigned + true)``.
    """
    tp, n_assigned, n_true = int((assigned & truth).sum()), int(assigned.sum()), int(truth.sum())
    precision = 100.0 * tp / n_assigned if n_assigned else None
    recall = 100.0 * tp / n_true if n_true else None
    if recall is None:
        f1 = None
    elif precision is None or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "num_assigned": n_assigned,
        "num_true": n_true,
    }


def mapping_metrics(
    assigned: np.ndarray,
    truth: np.ndarray,
    vocabulary: Sequence[str],
    attribute_kind: Mapping[str, str] | None = None,
) -> dict:
    """Precision, recall and F1 (percent) of assigned region-attribute pairs, overall and per kind.

    precision = correct pairs / assigned pairs, recall = correct pairs / true pairs (docs/method.md section 4.7);
    None where a denominator is 0 (see the module docstring); ``num_assigned`` / ``num_true`` are the
    denominators.

    Args:
        assigned, truth: ``[M, K]`` bool over the same M regions and K = len(vocabulary) attributes.
        attribute_kind: attribute -> kind; per_kind holds one {precision, recall, f1} per kind.

    Returns:
        ``{"precision", "recall", "f1", "num_assigned", "num_true", "per_kind": {kind: {same keys}}}``.
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
    """A fixed-width table: one line per split with P / R / F1 and the F1 of each kind ("n/a": no value)."""
    kinds = list(dict.fromkeys(k for m in metrics.values() for k in m.get("per_kind", {})))
    header = f"{'split':<6} {'precision':>9} {'recall':>7} {'F1':>6}" + "".join(
        f" {k + ' F1':>9}" for k in kinds
    )
    lines = [header]
    for split, m in metrics.items():
        per_kind = "".join(f" {fmt(m['per_kind'].get(k, {}).get('f1'), '>9.1f')}" for k in kinds)
        lines.append(
            f"{split:<6} {fmt(m['precision'], '>9.1f')} {fmt(m['recall'], '>7.1f')} {fmt(m['f1'], '>6.1f')}"
            + per_kind
        )
    return "\n".join(lines)

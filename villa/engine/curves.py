"""``curves.png``: a training run's loss and learning-rate curves, drawn from its per-epoch history.

Two panels against the epoch: the train and val loss (the best epoch, the lowest monitored loss, marked with
a star and a dotted line), and the learning rate (log scale when it changes). :func:`villa.engine.training.fit`
draws it at the end of training (a resumed run redraws it) from the rows of ``metrics.csv``
(:func:`villa.engine.training.read_metrics`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from villa.storage.io import atomic_path

CURVES_FILE = "curves.png"


def _points(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["epoch"], r.get(key)) for r in history if r.get(key) is not None and math.isfinite(r[key])]
    return [e for e, _ in rows], [v for _, v in rows]


def plot_curves(
    path: str | os.PathLike, history: Sequence[dict], best_epoch: int | None = None, title: str | None = None
) -> Path:
    """Draw ``history`` (rows with ``epoch``, ``train_loss``, ``val_loss``, ``lr``) into the PNG ``path``
    (atomically) and return the path. ``best_epoch`` is marked on the loss panel."""
    # the object-oriented API: no pyplot, so no global backend or figure state is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        epochs, values = _points(history, key)
        if epochs:
            loss_ax.plot(epochs, values, marker="o", markersize=3, label=label)
    if best_epoch is not None:
        row = next((r for r in history if r["epoch"] == best_epoch), None)
        if row is not None:
            monitored = row.get("val_loss") if row.get("val_loss") is not None else row.get("train_loss")
            loss_ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
            loss_ax.plot([best_epoch], [monitored], marker="*", markersize=12, color="gold",
                         markeredgecolor="black", linestyle="none", label=f"best (epoch {best_epoch})")  # fmt: skip
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss", fontsize=10)
    loss_ax.grid(alpha=0.3)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=8)
    epochs, rates = _points(history, "lr")
    if epochs:
        lr_ax.plot(epochs, rates, marker="o", markersize=3, color="tab:green")
        if min(rates) > 0 and max(rates) > min(rates):
            lr_ax.set_yscale("log")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("learning rate", fontsize=10)
    lr_ax.grid(alpha=0.3)
    for ax in (loss_ax, lr_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path

"""Look at a dataset: a grid of images with region boxes, attributes and captions, and statistics.

    python -m villa.visualize --data_dir=docmnist_30000_15.2 --out=grid.png [--split=train --n=9 --seed=0]
        [--stats_out=stats.png]
    python -m villa.visualize --data_dir=docmnist_30000_15.2 --out=mapping.png \
        --mapping_dir=villa/checkpoints/docmnist_stage1 [--split=train --image_id=ID]

Figures are built with matplotlib's object API on the non-interactive Agg canvas (no pyplot, no display
needed), so this works headless and inside notebooks alike.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from villa.datasets import SPLITS, Dataset
from villa.errors import VillaError, exit_on_error

_BOX_COLOR = "#00e5ff"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _load_image(dataset: Dataset, filepath: str) -> np.ndarray:
    from villa.images import decode_image

    return decode_image(dataset.image_paths([filepath])[0])


def _region_labels(row: dict) -> list[list[str]]:
    """A row's per-region labels, or empty lists when the dataset has none."""
    labels = row.get("reg_to_attr")
    return [list(a) for a in labels] if labels is not None else [[] for _ in row["region_coord"]]


def draw_grid(dataset_dir: str | os.PathLike, split: str = "train", n: int = 9, seed: int = 0) -> Figure:
    """A grid of ``n`` random images of ``split`` (chosen with ``seed``), each with its region boxes labelled
    with their ground-truth attributes and its caption underneath."""
    if n < 1:
        raise VillaError(f"n must be a positive integer, got {n}")
    dataset = Dataset.open(dataset_dir)
    frame = dataset.annotations(split)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(frame), size=min(n, len(frame)), replace=False))
    picked = frame.iloc[rows]
    cols = math.ceil(math.sqrt(len(picked)))
    grid_rows = math.ceil(len(picked) / cols)
    fig = _new_figure(4.2 * cols, 5.4 * grid_rows)
    axes = fig.subplots(grid_rows, cols, squeeze=False).ravel()
    for ax in axes[len(picked) :]:
        ax.set_axis_off()
    for ax, row in zip(axes, picked.to_dict("records"), strict=False):
        image = _load_image(dataset, row["image_filepath"])
        ax.imshow(image, interpolation="nearest")
        labels = _region_labels(row)
        for (x1, y1, x2, y2), attrs in zip(row["region_coord"], labels, strict=True):
            ax.add_patch(
                Rectangle(
                    (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=_BOX_COLOR, linewidth=1
                )
            )
            ax.text(
                x1 + 0.5,
                y1 + 1,
                "\n".join(attrs),
                color="white",
                fontsize=5.5,
                va="top",
                ha="left",
                bbox={"facecolor": "black", "alpha": 0.55, "pad": 0.6, "edgecolor": "none"},
            )
        ax.set_xticks([])
        ax.set_yticks([])
        complexity = sum(len(a) for a in labels)
        ax.set_title(
            f"#{row['image_id']}  ({row['num_regions']} regions, complexity {complexity})", fontsize=8
        )
        ax.set_xlabel(textwrap.fill(row["text"], width=62), fontsize=5.5, loc="left")
    fig.suptitle(f"{dataset.name} / {split}", fontsize=10)
    return fig


def draw_mapping(
    dataset_dir: str | os.PathLike,
    mapping_dir: str | os.PathLike,
    split: str = "train",
    image_id: int | None = None,
) -> Figure:
    """One image with its caption (left) and the region-attribute pairs stage 1 wrote for it (right).

    Assigned attributes are green when the region truly carries them and red when not; true attributes
    that stage 1 did not assign are listed grey in brackets. ``image_id`` None picks the split's first
    image with the most regions.
    """
    from villa.mapping.schema import check_mapping_inputs, read_mapping

    dataset = Dataset.open(dataset_dir)
    check_mapping_inputs(mapping_dir, dataset.root)
    frame = read_mapping(mapping_dir, split)
    if image_id is None:
        row = frame.iloc[int(np.argmax(frame["num_regions"].to_numpy()))].to_dict()
    else:
        match = frame[frame["image_id"] == image_id]
        if match.empty:
            raise VillaError(f"image_id {image_id} is not in the {split} mapping of {mapping_dir}")
        row = match.iloc[0].to_dict()
    image = _load_image(dataset, row["image_filepath"])
    fig = _new_figure(9.0, 5.6)
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title(f"image #{row['image_id']} and its caption", fontsize=10)
    left.set_xlabel(textwrap.fill(row["text"], width=70), fontsize=6.5, loc="left")
    right.imshow(image, interpolation="nearest")
    right.set_title("region-attribute pairs found by stage 1", fontsize=10)
    for (x1, y1, x2, y2), truth, assigned in zip(
        row["region_coord"], _region_labels(row), row["assigned_attributes"], strict=True
    ):
        right.add_patch(
            Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=_BOX_COLOR, linewidth=1)
        )
        lines = [(a, "#3dff6e" if a in truth else "#ff4d4d") for a in assigned]
        lines += [(f"({a})", "#9e9e9e") for a in truth if a not in assigned]
        for k, (word, color) in enumerate(lines):
            right.text(
                x1 + 0.8, y1 + 1.2 + 3.6 * k, word, color=color, fontsize=7, va="top", ha="left",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.4, "edgecolor": "none"},
            )  # fmt: skip
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    right.set_xlabel("green: correct   red: wrong   (grey): missed", fontsize=7, loc="left")
    return fig


def dataset_statistics(dataset_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Statistics of a dataset, per split.

    Returns ``summary`` (images, regions, pairs, mean/min/max complexity per split), ``attribute_counts``
    (region-attribute pairs per attribute, index in vocabulary order, one column per split) and
    ``complexity`` (number of images per sample complexity, one column per split).
    """
    dataset = Dataset.open(dataset_dir)
    frame = dataset.annotations()
    splits = [s for s in SPLITS if (frame["split"] == s).any()]
    if dataset.has_region_labels:
        regions = frame[["image_id", "split", "reg_to_attr"]].explode("reg_to_attr", ignore_index=True)
        regions = regions.dropna(subset=["reg_to_attr"])
        pairs = regions.explode("reg_to_attr", ignore_index=True)
    else:  # no region labels: count what each text mentions
        pairs = frame[["image_id", "split", "attributes"]].explode("attributes", ignore_index=True)
        pairs = pairs.rename(columns={"attributes": "reg_to_attr"})
    pairs = pairs.dropna(subset=["reg_to_attr"])
    per_image = pairs.groupby("image_id").size()
    complexity = frame["image_id"].map(per_image).fillna(0).astype(int)
    by_split = pd.DataFrame({"split": frame["split"], "complexity": complexity})

    summary = pd.DataFrame(
        {
            "images": frame.groupby("split").size(),
            "regions": frame.groupby("split")["num_regions"].sum(),
            "pairs": by_split.groupby("split")["complexity"].sum(),
            "mean_complexity": by_split.groupby("split")["complexity"].mean(),
            "min_complexity": by_split.groupby("split")["complexity"].min(),
            "max_complexity": by_split.groupby("split")["complexity"].max(),
        }
    ).reindex(splits)
    attribute_counts = (
        pd.crosstab(pairs["reg_to_attr"], pairs["split"])
        .reindex(index=dataset.vocabulary.names, columns=splits, fill_value=0)
        .fillna(0)
        .astype(int)
    )
    attribute_counts.index.name = "attribute"
    complexity_hist = pd.crosstab(by_split["complexity"], by_split["split"]).reindex(
        columns=splits, fill_value=0
    )
    return {"summary": summary, "attribute_counts": attribute_counts, "complexity": complexity_hist}


def plot_statistics(stats: dict[str, pd.DataFrame] | str | os.PathLike) -> Figure:
    """Bar charts of attribute counts and of the complexity histogram per split.

    ``stats`` is the output of :func:`dataset_statistics` or a dataset folder.
    """
    if not isinstance(stats, dict):
        stats = dataset_statistics(stats)
    counts, hist = stats["attribute_counts"], stats["complexity"]
    splits = list(counts.columns)
    fig = _new_figure(12, 7)
    ax_attr, ax_hist = fig.subplots(2, 1)
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(counts))
    for i, split in enumerate(splits):
        ax_attr.bar(x + i * width, counts[split].to_numpy(), width=width, label=split)
    ax_attr.set_xticks(x + width * (len(splits) - 1) / 2, counts.index, rotation=45, ha="right")
    ax_attr.set_ylabel("region-attribute pairs")
    ax_attr.set_title("attribute counts")
    ax_attr.legend()
    xh = hist.index.to_numpy()
    for i, split in enumerate(splits):
        ax_hist.bar(xh + i * width - 0.4 + width / 2, hist[split].to_numpy(), width=width, label=split)
    ax_hist.set_xticks(xh)
    ax_hist.set_xlabel("sample complexity (region-attribute pairs per image)")
    ax_hist.set_ylabel("images")
    ax_hist.set_title("sample complexity")
    ax_hist.legend()
    return fig


def save_figure(fig: Figure, out: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    from villa.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


def render_grid_png(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    n: int = 9,
    seed: int = 0,
    stats_out: str | os.PathLike | None = None,
) -> list[Path]:
    """Resolve ``data_dir`` (path or name under the data root), draw the grid (and statistics) to PNGs."""
    from villa.paths import resolve_dataset_dir

    dataset_dir = resolve_dataset_dir(data_dir)
    written = [save_figure(draw_grid(dataset_dir, split=split, n=n, seed=seed), out)]
    if stats_out is not None:
        written.append(save_figure(plot_statistics(dataset_dir), stats_out))
    return written


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise VillaError(message)


@exit_on_error
def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = _OneLineParser(
        prog="python -m villa.visualize", description="Draw DocMNIST images to a PNG grid."
    )
    parser.add_argument("--data_dir", required=True, help="dataset folder, or its name under the data root")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--n", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats_out", default=None, help="also write the statistics figure here")
    parser.add_argument(
        "--mapping_dir", default=None, help="a stage-1 run folder: draw one image's mapped regions instead"
    )
    parser.add_argument("--image_id", type=int, default=None, help="with --mapping_dir: the image to draw")
    args = parser.parse_args(argv)
    if args.mapping_dir is not None:
        from villa.paths import resolve_dataset_dir

        figure = draw_mapping(resolve_dataset_dir(args.data_dir), args.mapping_dir, args.split, args.image_id)
        written = [save_figure(figure, args.out)]
    else:
        written = render_grid_png(args.data_dir, args.out, args.split, args.n, args.seed, args.stats_out)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()

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
from villa.storage.errors import VillaError, exit_on_error

_BOX_COLOR = "#00e5ff"
#: a panel's longest side in inches: the image's pixels / PIXELS_PER_INCH, within these bounds
PANEL_INCHES = (4.2, 12.0)
PIXELS_PER_INCH = 110


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_inches(height: int, width: int, largest: float = PANEL_INCHES[1]) -> tuple[float, float]:
    """(width, height) in inches of an image panel: the longest side grows with the image's pixels from
    ``PANEL_INCHES[0]`` (84-pixel images) to ``largest`` (a few thousand pixels), so a large image gets the
    room its regions need; the aspect ratio is kept."""
    long_side = min(max(max(height, width) / PIXELS_PER_INCH, PANEL_INCHES[0]), largest)
    scale = long_side / max(height, width, 1)
    return width * scale, height * scale


def label_style(panel: tuple[float, float]) -> dict[str, float]:
    """Font size (points) of region labels and captions and box line width for a panel of ``panel`` inches:
    both grow with the panel, so a label keeps the same share of a bigger picture."""
    long_side = max(panel)
    return {
        "fontsize": float(np.clip(1.5 * long_side, 6.0, 16.0)),
        "linewidth": float(np.clip(0.22 * long_side, 0.8, 3.0)),
    }


def _load_image(dataset: Dataset, filepath: str) -> np.ndarray:
    from villa.datasets.images import decode_image

    return decode_image(dataset.image_paths([filepath])[0])


def _region_labels(row: dict) -> list[list[str]]:
    """A row's per-region labels, or empty lists when the dataset has none."""
    labels = row.get("reg_to_attr")
    return [list(a) for a in labels] if labels is not None else [[] for _ in row["region_coord"]]


def _draw_regions(ax, boxes, stacks, style: dict, alpha: float = 0.6) -> list[list]:
    """Draw each box of ``boxes`` ([x0, y0, x1, y1] pixels) and, at its top-left corner, its stack of
    ``(text, colour)`` label lines (one stack per box; an empty stack draws nothing). Returns the label
    artists per stack, for :func:`_place_labels`."""
    groups = []
    for (x1, y1, x2, y2), lines in zip(boxes, stacks, strict=True):
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=_BOX_COLOR,
                               linewidth=style["linewidth"]))  # fmt: skip
        group = []
        for text, color in lines:
            label = ax.annotate(
                text, (x1 - 0.5, y1 - 0.5), xytext=(0, 0), textcoords="offset points", color=color,
                fontsize=style["fontsize"], va="top", ha="left", annotation_clip=False,
                bbox={"boxstyle": "square,pad=0.2", "facecolor": "black", "alpha": alpha, "edgecolor": "none"},
            )  # fmt: skip
            label.set_in_layout(False)  # labels never move the axes
            group.append(label)
        if group:
            groups.append(group)
    return groups


def _place_labels(fig: Figure, groups_per_axes: list[list[list]]) -> None:
    """Stack each group's lines and move the groups so that no two labels of an axes overlap.

    The figure is laid out once (for the axes positions and the text sizes), then frozen. Each group (one box's lines)
    starts at its box's top-left corner; when that spot is taken it goes to the nearest free spot of a
    grid of offsets around it, preferring spots inside the axes (greedy, in reading order of the boxes).
    Offsets are in points, so the result is the same at any ``dpi``."""
    fig.draw_without_rendering()  # (the layout and text sizes, no pixels)
    fig.set_layout_engine("none")  # the axes stay where the first draw put them
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    for groups in groups_per_axes:
        if not groups:
            continue
        ax = groups[0][0].axes
        frame = ax.get_window_extent(renderer)
        placed = np.zeros((0, 4))  # x0, y0, x1, y1 in pixels
        order = sorted(
            groups, key=lambda g: (-g[0].get_window_extent(renderer).y1, g[0].get_window_extent(renderer).x0)
        )
        for group in order:
            boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in group]
            anchor = group[0].get_window_extent(renderer)  # every line starts at the box's corner
            gap = 1.0
            # line k goes below line k - 1; rect of the stacked group, relative to line 0's position
            shifts = np.concatenate([[0.0], -np.cumsum([b.height + gap for b in boxes[:-1]])])
            rel = np.array([
                min(b.x0 for b in boxes) - anchor.x0,
                boxes[-1].y0 + shifts[-1] - anchor.y0,
                max(b.x1 for b in boxes) - anchor.x0,
                boxes[0].y1 - anchor.y0,
            ])  # fmt: skip
            width, height = rel[2] - rel[0], rel[3] - rel[1]
            offset = _free_offset(anchor.x0, anchor.y0, rel, width, height, placed, frame)
            rect = rel + [anchor.x0 + offset[0], anchor.y0 + offset[1]] * 2
            placed = np.vstack([placed, rect])
            for text, shift in zip(group, shifts):
                text.xyann = (offset[0] / px_per_pt, (offset[1] + shift) / px_per_pt)
            if offset != (0.0, 0.0):  # moved away from its box: a leader line from the box's corner
                corner = ax.transData.transform(group[0].xy)
                nearest = np.clip(corner, rect[:2], rect[2:])
                ends = ax.transData.inverted().transform(np.stack([corner, nearest]))
                ax.plot(ends[:, 0], ends[:, 1], color=_BOX_COLOR, alpha=0.8, clip_on=False,
                        linewidth=0.5 * group[0].get_fontsize() / 6)  # fmt: skip


def _free_offset(x: float, y: float, rel: np.ndarray, width: float, height: float, placed: np.ndarray,
                 frame) -> tuple[float, float]:  # fmt: skip
    """The offset (pixels) nearest to (0, 0) that puts the rect ``rel`` (relative to ``(x, y)``) over no rect
    of ``placed``; offsets inside ``frame`` first. Candidates: a grid of steps of half the rect's width and
    its height, reaching one frame size in each direction (then further out, if the frame is full)."""
    step_x, step_y = max(width / 2, 1.0), max(height, 1.0)
    for reach in (1, 3):
        nx = int(np.ceil(reach * frame.width / step_x)) + 1
        ny = int(np.ceil(reach * frame.height / step_y)) + 1
        dx = step_x * np.arange(-nx, nx + 1)
        dy = step_y * np.arange(-ny, ny + 1)
        gx, gy = np.meshgrid(dx, dy)
        gx, gy = gx.ravel(), gy.ravel()
        rects = rel[None, :] + np.stack([x + gx, y + gy, x + gx, y + gy], axis=1)
        inside = (
            (rects[:, 0] >= frame.x0)
            & (rects[:, 2] <= frame.x1)
            & (rects[:, 1] >= frame.y0)
            & (rects[:, 3] <= frame.y1)
        )
        # nearest first; below and to the right before above and to the left; inside the frame first
        cost = np.abs(gx) + 1.5 * np.abs(gy) + 0.01 * ((gy > 0) + (gx < 0)) + np.where(inside, 0.0, 1e9)
        order = np.argsort(cost, kind="stable")
        for chunk in np.array_split(order, max(1, len(order) // 512)):
            cand = rects[chunk]
            clash = (
                (cand[:, None, 0] < placed[None, :, 2]) & (cand[:, None, 2] > placed[None, :, 0])
                & (cand[:, None, 1] < placed[None, :, 3]) & (cand[:, None, 3] > placed[None, :, 1])
            ).any(axis=1)  # fmt: skip
            if not clash.all():
                best = chunk[int(np.argmin(clash))]
                return float(gx[best]), float(gy[best])
    return 0.0, float(placed[:, 1].min() - rel[3] - y - 1.0) if len(placed) else 0.0  # below everything


def draw_grid(dataset_dir: str | os.PathLike, split: str = "train", n: int = 9, seed: int = 0) -> Figure:
    """A grid of ``n`` random images of ``split`` (chosen with ``seed``), each with its region boxes labelled
    with their ground-truth attributes and its caption underneath. Panels, fonts and lines scale with the
    images (:func:`panel_inches`, :func:`label_style`); labels are moved apart so that none overlap."""
    if n < 1:
        raise VillaError(f"n must be a positive integer, got {n}")
    dataset = Dataset.open(dataset_dir)
    frame = dataset.annotations(split)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(frame), size=min(n, len(frame)), replace=False))
    picked = frame.iloc[rows]
    cols = math.ceil(math.sqrt(len(picked)))
    grid_rows = math.ceil(len(picked) / cols)
    sizes = np.asarray(picked["image_size"].tolist(), dtype=np.int64).reshape(-1, 2)
    panel = panel_inches(int(sizes[:, 0].max()), int(sizes[:, 1].max()), largest=8.0)
    style = label_style(panel)
    caption = 0.35 * style["fontsize"] / 6  # inches under a panel for the title and about 4 caption lines
    fig = _new_figure(panel[0] * cols, (panel[1] + 3 * caption) * grid_rows)
    axes = fig.subplots(grid_rows, cols, squeeze=False).ravel()
    for ax in axes[len(picked) :]:
        ax.set_axis_off()
    wrap = max(30, int(62 * panel[0] / 4.2 * 6 / style["fontsize"]))
    groups = []
    for ax, row in zip(axes, picked.to_dict("records"), strict=False):
        image = _load_image(dataset, row["image_filepath"])
        ax.imshow(image, interpolation="nearest")
        labels = _region_labels(row)
        stacks = [[("\n".join(attrs), "white")] if attrs else [] for attrs in labels]
        groups.append(_draw_regions(ax, row["region_coord"], stacks, style, alpha=0.55))
        ax.set_xticks([])
        ax.set_yticks([])
        complexity = sum(len(a) for a in labels)
        ax.set_title(f"#{row['image_id']}  ({row['num_regions']} regions, complexity {complexity})",
                     fontsize=style["fontsize"] * 1.4)  # fmt: skip
        ax.set_xlabel(textwrap.fill(row["text"], width=wrap), fontsize=style["fontsize"], loc="left")
    fig.suptitle(f"{dataset.name} / {split}", fontsize=style["fontsize"] * 1.8)
    _place_labels(fig, groups)
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
    image with the most regions. Panels, fonts and lines scale with the image; labels never overlap.
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
    panel = panel_inches(*image.shape[:2])
    style = label_style(panel)
    fontsize = style["fontsize"]
    fig = _new_figure(2 * panel[0] + 0.4, panel[1] + 0.9 * fontsize / 6)
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title(f"image #{row['image_id']} and its caption", fontsize=fontsize * 1.4)
    wrap = max(30, int(70 * panel[0] / 4.3 * 6.5 / fontsize))
    left.set_xlabel(textwrap.fill(row["text"], width=wrap), fontsize=fontsize, loc="left")
    right.imshow(image, interpolation="nearest")
    right.set_title("region-attribute pairs found by stage 1", fontsize=fontsize * 1.4)
    stacks = []
    for truth, assigned in zip(_region_labels(row), row["assigned_attributes"], strict=True):
        lines = [(a, "#3dff6e" if a in truth else "#ff4d4d") for a in assigned]
        stacks.append(lines + [(f"({a})", "#9e9e9e") for a in truth if a not in assigned])
    groups = _draw_regions(right, row["region_coord"], stacks, style)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    right.set_xlabel("green: correct   red: wrong   (grey): missed", fontsize=fontsize, loc="left")
    _place_labels(fig, [groups])
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
    from villa.storage.io import atomic_path

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
    from villa.storage.paths import resolve_dataset_dir

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
        from villa.storage.paths import resolve_dataset_dir

        figure = draw_mapping(resolve_dataset_dir(args.data_dir), args.mapping_dir, args.split, args.image_id)
        written = [save_figure(figure, args.out)]
    else:
        written = render_grid_png(args.data_dir, args.out, args.split, args.n, args.seed, args.stats_out)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()

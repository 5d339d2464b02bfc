"""Visualisation: the grid figure, the statistics, the PNG command and the notebook (headless)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from villa import visualize
from villa.datasets import read_annotations
from villa.docmnist.generate import generate_docmnist
from villa.docmnist.vocabulary import ATTRIBUTES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    pools = {split: (images, labels) for split in ("train", "val", "test")}
    result = generate_docmnist(
        120,
        10,
        seed=3,
        val_attribute_budget=40,
        test_attribute_budget=40,
        data_root=tmp_path_factory.mktemp("data"),
        digit_pools=pools,
        progress=False,
    )
    return result.dataset_dir


def test_draw_grid_boxes_and_captions(dataset_dir):
    frame = read_annotations(dataset_dir, "val")
    fig = visualize.draw_grid(dataset_dir, split="val", n=4, seed=0)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 4
    by_id = {int(r["image_id"]): r for r in frame.to_dict("records")}
    for ax in image_axes:
        image_id = int(ax.get_title().split()[0].lstrip("#"))
        row = by_id[image_id]  # only val images are drawn
        boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(boxes) == row["num_regions"]
        assert ax.get_xlabel().replace("\n", " ") == row["text"]
        assert ax.images[0].get_array().shape == (84, 84, 3)


def test_statistics_add_up(dataset_dir):
    frame = read_annotations(dataset_dir)
    stats = visualize.dataset_statistics(dataset_dir)
    counts, hist, summary = stats["attribute_counts"], stats["complexity"], stats["summary"]
    assert list(counts.index) == list(ATTRIBUTES) and list(counts.columns) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        rows = frame[frame["split"] == split]
        pairs = sum(len(r) for regions in rows["reg_to_attr"] for r in regions)
        assert counts[split].sum() == pairs == summary.loc[split, "pairs"]
        assert hist[split].sum() == len(rows) == summary.loc[split, "images"]
    fig = visualize.plot_statistics(stats)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 3 * len(ATTRIBUTES)


def test_cli_writes_png(dataset_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    stats_out = tmp_path / "stats.png"
    visualize.main([f"--data_dir={dataset_dir}", f"--out={out}", "--n=2", f"--stats_out={stats_out}"])
    for path in (out, stats_out):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200
    assert capsys.readouterr().out.split() == [str(out), str(stats_out)]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # atomic writes keep the usual file mode


def test_cli_bad_data_dir_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        visualize.main([f"--data_dir={tmp_path / 'nope'}", f"--out={tmp_path / 'g.png'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset folder not found") and "\n" not in err


def test_notebook_runs_headless(dataset_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VILLA_DATA_DIR", str(dataset_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(REPO / "docmnist" / "visualize_data.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the grid and the statistics
    assert any(str(dataset_dir) in o.get("data", {}).get("text/plain", "") for o in outputs)


def test_mapping_figure_colours_correct_wrong_and_missed(dataset_dir, tmp_path):
    from villa.mapping.schema import mapping_inputs, write_mapping, write_mapping_metrics

    frame = read_annotations(dataset_dir, "train")
    # region 0 of every image: its first true attribute plus a wrong one; other regions: all correct
    wrong = [next(a for a in ATTRIBUTES if a not in t[0]) for t in frame["reg_to_attr"]]
    frame["assigned_attributes"] = [[[t[0][0], w], *t[1:]] for t, w in zip(frame["reg_to_attr"], wrong)]
    frame["assigned_text"] = [[" . ".join(a) for a in regions] for regions in frame["assigned_attributes"]]
    write_mapping(tmp_path, "train", frame)
    write_mapping_metrics(tmp_path, {}, mapping_inputs(dataset_dir))
    drawn = int(np.argmax(frame["num_regions"].to_numpy()))  # the default pick
    truth0 = frame["reg_to_attr"][drawn][0]
    right = visualize.draw_mapping(dataset_dir, tmp_path, "train").axes[1]
    colours = {t.get_text(): t.get_color() for t in right.texts[: 1 + len(truth0)]}
    assert colours[truth0[0]] == "#3dff6e" and colours[wrong[drawn]] == "#ff4d4d"
    assert colours[f"({truth0[1]})"] == "#9e9e9e"
    assert len(right.patches) == frame["num_regions"][drawn]
    out = visualize.main(
        ["--data_dir", str(dataset_dir), "--mapping_dir", str(tmp_path), "--out", str(tmp_path / "m.png")]
    )
    assert out[0].stat().st_size > 1000


def _label_boxes(fig, ax) -> np.ndarray:
    """The drawn label boxes of ``ax`` as [x0, y0, x1, y1] pixels."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = [
        t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts if t.get_bbox_patch() is not None
    ]
    return np.asarray([[b.x0, b.y0, b.x1, b.y1] for b in boxes])


def _overlaps(boxes: np.ndarray, tolerance: float = 0.5) -> int:
    a, b = boxes[:, None], boxes[None, :]
    clash = (a[..., 0] < b[..., 2] - tolerance) & (a[..., 2] > b[..., 0] + tolerance)
    clash &= (a[..., 1] < b[..., 3] - tolerance) & (a[..., 3] > b[..., 1] + tolerance)
    return int(np.triu(clash, 1).sum())


@pytest.fixture(scope="module")
def large_dataset(tmp_path_factory):
    """One 3000x2000 photo-sized image with 40 small boxes packed in a corner, each with 2 or 3 labels."""
    from villa.datasets import Vocabulary, write_dataset

    root = tmp_path_factory.mktemp("large") / "large"
    (root / "images").mkdir(parents=True)
    height, width = 2000, 3000
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)).save(root / "images" / "0.png")
    names = ["red", "green", "blue", "round", "square", "large", "small"]
    boxes = [
        [100 + 70 * (c % 8), 100 + 70 * (c // 8), 160 + 70 * (c % 8), 160 + 70 * (c // 8)] for c in range(40)
    ]
    labels = [
        [names[c % 3], names[3 + c % 2]] + ([names[5 + c % 2]] if c % 3 == 0 else []) for c in range(40)
    ]
    columns = {
        "image_id": [0], "image_filepath": ["images/0.png"], "image_size": [[height, width]], "split": ["train"],
        "text": [" . ".join(f"there is something {n}" for n in names)], "region_coord": [boxes],
        "num_regions": [40], "reg_to_attr": [labels],
    }  # fmt: skip
    write_dataset(root, columns, Vocabulary.from_names(names), source="test")
    return root


def test_labels_on_a_large_image_do_not_overlap_and_scale(large_dataset, dataset_dir, tmp_path):
    from villa.datasets import read_annotations
    from villa.mapping.schema import mapping_inputs, write_mapping, write_mapping_metrics

    frame = read_annotations(large_dataset)
    frame["assigned_attributes"] = [
        [regions[0][:1] + ["small"], *regions[1:]] for regions in frame["reg_to_attr"]
    ]
    frame["assigned_text"] = [[" . ".join(a) for a in regions] for regions in frame["assigned_attributes"]]
    write_mapping(tmp_path, "train", frame)
    write_mapping_metrics(tmp_path, {}, mapping_inputs(large_dataset))
    fig = visualize.draw_mapping(large_dataset, tmp_path, "train")
    right = fig.axes[1]
    boxes = _label_boxes(fig, right)
    assert len(boxes) == sum(
        len(set(a) | set(t)) for a, t in zip(frame["assigned_attributes"][0], frame["reg_to_attr"][0])
    )
    assert _overlaps(boxes) == 0
    frame_px = right.get_window_extent()
    inside = (boxes[:, 0] >= frame_px.x0 - 1) & (boxes[:, 2] <= frame_px.x1 + 1)
    inside &= (boxes[:, 1] >= frame_px.y0 - 1) & (boxes[:, 3] <= frame_px.y1 + 1)
    assert inside.all()  # there is room in the image: no label is pushed out of it
    # fonts and lines grow with the image: larger than on an 84-pixel DocMNIST image
    small = visualize.draw_grid(dataset_dir, split="val", n=1, seed=0)
    small_font, large_font = small.axes[0].texts[0].get_fontsize(), right.texts[0].get_fontsize()
    assert large_font >= 2 * small_font
    assert right.patches[0].get_linewidth() >= 2 * small.axes[0].patches[0].get_linewidth()
    # the grid too: one panel, its 40 multi-line labels apart
    grid = visualize.draw_grid(large_dataset, split="train", n=1)
    assert _overlaps(_label_boxes(grid, grid.axes[0])) == 0 and len(grid.axes[0].texts) == 40
    assert fig.get_size_inches()[0] > 2 * small.get_size_inches()[0]  # the figure grew with the image

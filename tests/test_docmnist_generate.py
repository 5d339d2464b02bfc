"""DocMNIST generation on tiny synthetic digit pools: rules, schema, determinism, atomicity, bad input."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from villa.datasets import read_annotations
from villa.datasets.text import split_sentences
from villa.docmnist import generate as gen
from villa.docmnist.vocabulary import ATTRIBUTE_KIND, ATTRIBUTES, COLORS, DIGIT_WORDS, TEMPLATES
from villa.storage.errors import VillaError

REPO = Path(__file__).resolve().parent.parent


def _pattern(label: int) -> np.ndarray:
    """A digit whose grey values sweep both sides of the colour threshold; unique per label."""
    r, c = np.mgrid[0:28, 0:28]
    return ((r * 28 + c + 37 * label) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def pools():
    # one digit per label, so a region's pixels are known from its digit label
    images = np.stack([_pattern(k) for k in range(10)])
    labels = np.arange(10)
    return {split: (images, labels) for split in ("train", "val", "test")}


def _generate(root, pools, **kwargs):
    args = dict(
        attribute_budget=200,
        target_sample_complexity=12,
        seed=5,
        val_attribute_budget=60,
        test_attribute_budget=60,
        data_root=root,
        digit_pools=pools,
        progress=False,
    )
    args.update(kwargs)
    return gen.generate_docmnist(**args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pools):
    result = _generate(tmp_path_factory.mktemp("data"), pools)
    return result, read_annotations(result.dataset_dir)


def test_result_folder_name_and_sizes(dataset):
    result, frame = dataset
    complexity = frame["reg_to_attr"].map(lambda regions: sum(len(r) for r in regions))
    train = frame["split"] == "train"
    assert result.dataset_dir.name == f"docmnist_200_{complexity[train].mean():.1f}"
    assert result.split_sizes == frame["split"].value_counts().to_dict()
    assert result.summary_lines()[-1] == str(result.dataset_dir)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.dataset_dir.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's owner-only
    assert abs(result.average_complexity["val"] - complexity[frame["split"] == "val"].mean()) < 1e-9


def test_budgets_and_stopping_rule(dataset):
    _, frame = dataset
    target = 12
    complexity = frame["reg_to_attr"].map(lambda regions: sum(len(r) for r in regions))
    for split, budget in (("train", 200), ("val", 60), ("test", 60)):
        total = complexity[frame["split"] == split].sum()
        # the next image (<= target pairs) did not fit
        assert budget - target < total <= budget
    assert (complexity <= target).all()
    # an image stops below 9 regions only because the next region (2 or 4 pairs) did not fit
    short = frame["num_regions"] < 9
    assert (complexity[short] > target - 4).all()
    # regions carry 2 pairs (no shape) or 4 (shape + size)
    sizes = {len(r) for regions in frame["reg_to_attr"] for r in regions}
    assert sizes <= {2, 4}


def test_schema_and_consistency(dataset):
    result, frame = dataset
    assert frame["image_id"].tolist() == list(range(len(frame)))
    assert (frame["split"].drop_duplicates().tolist()) == ["train", "val", "test"]
    for row in frame.to_dict("records"):
        n = row["num_regions"]
        assert row["image_size"] == [84, 84]
        assert n == len(row["region_coord"]) == len(row["digit_label"]) == len(row["reg_to_attr"])
        cells = []
        for x1, y1, x2, y2 in row["region_coord"]:
            assert x1 % 28 == 0 and y1 % 28 == 0 and (x2 - x1, y2 - y1) == (28, 28)
            cells.append(3 * (y1 // 28) + x1 // 28)
        assert cells == sorted(set(cells))  # distinct cells, increasing order
        for i in range(n):
            expected = [row["digit_label"][i], row["color_label"][i]]
            assert (row["shape_label"][i] is None) == (row["size_label"][i] is None)
            if row["shape_label"][i] is not None:
                expected += [row["shape_label"][i], row["size_label"][i]]
            assert row["reg_to_attr"][i] == expected
        union = {a for r in row["reg_to_attr"] for a in r}
        assert row["attributes"] == [a for a in ATTRIBUTES if a in union]
        # caption: one sentence per distinct (attribute, template), each from the attribute's templates
        sentences = row["text"].split(" . ")
        assert len(sentences) == len(set(sentences)) == len(split_sentences(row["text"]))
        assert len(sentences) <= sum(len(r) for r in row["reg_to_attr"])
        allowed = {t.format(a) for a in union for t in TEMPLATES[ATTRIBUTE_KIND[a]]}
        assert set(sentences) <= allowed
        for attr in union:
            assert any(s in {t.format(attr) for t in TEMPLATES[ATTRIBUTE_KIND[attr]]} for s in sentences)
        assert (result.dataset_dir / row["image_filepath"]).is_file()


def test_captions_are_shuffled(dataset):
    _, frame = dataset
    kind_of = {t.format(a): ATTRIBUTE_KIND[a] for a in ATTRIBUTES for t in TEMPLATES[ATTRIBUTE_KIND[a]]}
    first_kinds = {kind_of[text.split(" . ")[0]] for text in frame["text"]}
    # unshuffled, every caption would open with the first region's digit sentence
    assert len(first_kinds) >= 3


def _perimeter_bbox(shape: str, size: str) -> int:
    if shape == "circle":
        return 2 * {"small": 1, "medium": 3, "large": 5}[size] + 1
    return {"small": 1, "medium": 4, "large": 7}[size] + 3


def test_pixels_follow_colour_rule_and_shapes_stay_in_cell(dataset):
    result, frame = dataset
    for row in frame.to_dict("records"):
        image = np.asarray(Image.open(result.dataset_dir / row["image_filepath"]))
        assert image.shape == (84, 84, 3) and image.dtype == np.uint8
        used = np.zeros((84, 84), dtype=bool)
        for i, (x1, y1, x2, y2) in enumerate(np.asarray(row["region_coord"], dtype=int).tolist()):
            used[y1:y2, x1:x2] = True
            tile = image[y1:y2, x1:x2].astype(int)
            grey = _pattern(DIGIT_WORDS.index(row["digit_label"][i])).astype(int)
            colour = np.array(COLORS[row["color_label"][i]])
            expected = np.where((grey >= 120)[..., None], colour, grey[..., None])
            differs = (tile != expected).any(axis=2)
            shape = row["shape_label"][i]
            if shape is None:
                assert not differs.any()
                continue
            assert (tile[differs] == 255).all()  # the outline is white
            rows, cols = np.nonzero(differs)
            side = _perimeter_bbox(shape, row["size_label"][i])
            assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        assert (image[~used] == 0).all()  # empty cells stay black


def test_shape_offsets_match_skimage():
    # a test dependency (setup.py's `test` extra), imported here so only this check needs it; never
    # skipped: a missing scikit-image fails the suite instead of silently dropping the cross-check
    from skimage import draw

    for radius in gen.CIRCLE_RADIUS:
        rr, cc = draw.circle_perimeter(12, 9, radius, shape=(28, 28))
        ours_r, ours_c = gen.circle_perimeter_offsets(radius)
        assert set(zip(rr.tolist(), cc.tolist(), strict=True)) == set(
            zip((ours_r + 12).tolist(), (ours_c + 9).tolist(), strict=True)
        )
    for extent in gen.RECTANGLE_EXTENT:
        rr, cc = draw.rectangle_perimeter((7, 11), end=(7 + extent, 11 + extent), shape=(28, 28))
        ours_r, ours_c = gen.rectangle_perimeter_offsets(extent)
        assert set(zip(rr.tolist(), cc.tolist(), strict=True)) == set(
            zip((ours_r + 7).tolist(), (ours_c + 11).tolist(), strict=True)
        )


def test_shapes_are_clipped_to_the_cell():
    digits = np.zeros((1, 28, 28), np.uint8)
    # a large rectangle started at the far corner would reach past the cell: it must be clipped, not wrap
    tiles = gen.render_regions(
        digits, np.array([0]), np.array([gen.SHAPES.index("rectangle")]), np.array([2]), np.array([[24, 24]])
    )
    white = (tiles[0] == 255).all(axis=2)
    rows, cols = np.nonzero(white)
    assert rows.min() == 23 and cols.min() == 23 and rows.max() == 27 and cols.max() == 27
    assert not white[:20, :20].any()


def test_same_seed_same_bytes(tmp_path, pools):
    a = _generate(tmp_path / "a", pools)
    b = _generate(tmp_path / "b", pools)
    files_a = sorted(p.relative_to(a.dataset_dir) for p in a.dataset_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.dataset_dir) for p in b.dataset_dir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (a.dataset_dir / rel).read_bytes() == (b.dataset_dir / rel).read_bytes(), rel
    c = _generate(tmp_path / "c", pools, seed=6)
    text_a = read_annotations(a.dataset_dir)["text"].tolist()
    assert read_annotations(c.dataset_dir)["text"].tolist() != text_a


def test_plan_needs_no_pixels_and_drops_empty_images():
    rng = np.random.default_rng(0)
    plan = gen.plan_split("train", 300, 3, rng)  # with a shape the first region (4 pairs) never fits
    assert plan.n_images == 150 and (plan.complexity == 2).all()
    assert (plan.shape == -1).all() and (np.diff(plan.offsets) == 1).all()


def test_interrupted_run_leaves_no_folder(tmp_path, pools, monkeypatch):
    calls = []

    def failing_write(paths, canvases):
        calls.append(len(paths))
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen, "write_pngs", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        _generate(tmp_path, pools)
    assert calls and list(tmp_path.iterdir()) == []  # neither the final nor the temporary folder


def test_existing_folder_needs_overwrite(tmp_path, pools):
    first = _generate(tmp_path, pools, val_attribute_budget=0, test_attribute_budget=0)
    assert set(read_annotations(first.dataset_dir)["split"]) == {"train"}
    marker = first.dataset_dir / "marker"
    marker.write_text("old")
    with pytest.raises(VillaError, match="already exists"):
        _generate(tmp_path, pools, val_attribute_budget=0, test_attribute_budget=0)
    assert marker.exists()
    again = _generate(tmp_path, pools, val_attribute_budget=0, test_attribute_budget=0, overwrite=True)
    assert again.dataset_dir == first.dataset_dir and not marker.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--attribute_budget=100", "--target_sample_complexity=1"],
            "target_sample_complexity must be an integer >= 2",
        ),
        (["--attribute_budget=100", "--target_sample_complexity=37"], "at most 36"),
        (["--attribute_budget=0", "--target_sample_complexity=16"], "positive integer"),
        (["--attribute_budget=-5", "--target_sample_complexity=16"], "positive integer"),
        (["--attribute_budget=abc", "--target_sample_complexity=16"], "expected an integer"),
        (["--attribute_budget=1.5", "--target_sample_complexity=16"], "expected an integer"),
        (["--attribute_budget=5", "--target_sample_complexity=16"], "too small for one image"),
        (["--target_sample_complexity=16"], "required"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gen.cli_main([*argv, f"--data_root={tmp_path}", "--no_progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_unreadable_mnist_source_is_one_line(tmp_path, capsys):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    with pytest.raises(SystemExit) as exit_info:
        gen.cli_main(
            [
                "--attribute_budget=100",
                "--target_sample_complexity=8",
                f"--data_root={tmp_path}",
                "--no_progress",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "MNIST" in err


def test_script_runs_as_plain_file(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "docmnist/generate_docmnist.py",
            "--attribute_budget=100",
            "--target_sample_complexity=40",
            f"--data_root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_writer_takes_columns_or_a_frame_and_derives_attributes_from_the_text(dataset, tmp_path):
    import pandas as pd

    from villa.datasets import write_dataset
    from villa.docmnist.vocabulary import docmnist_vocabulary

    _, frame = dataset
    write_dataset(tmp_path / "a", frame, docmnist_vocabulary(), source="test")
    write_dataset(
        tmp_path / "b", {c: frame[c].tolist() for c in frame.columns}, docmnist_vocabulary(), source="test"
    )
    pd.testing.assert_frame_equal(read_annotations(tmp_path / "a"), read_annotations(tmp_path / "b"))
    # on DocMNIST every region attribute has a sentence: the text-derived set is the region labels' union
    union = [sorted({a for region in regs for a in region}) for regs in frame["reg_to_attr"]]
    assert [sorted(a) for a in frame["attributes"]] == union

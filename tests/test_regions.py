"""Region specs, the region proposer, and the importers' --regions=proposals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from villa.datasets import Dataset
from villa.datasets.coco import import_coco
from villa.datasets.shapes import make_shapes_coco
from villa.datasets.table import import_table
from villa.regions import (
    DEFAULT_MAX_PROPOSALS,
    RegionSpec,
    box_iou,
    grid_boxes,
    nms,
    parse_region_spec,
    propose_regions,
)
from villa.storage.errors import VillaError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 24-image COCO-format shapes set (160-320 x 120-240 JPEGs, 2-6 shapes each)."""
    return make_shapes_coco(tmp_path_factory.mktemp("shapes") / "sh", num_images=24, seed=4, progress=False)


def _image(shapes, k: int = 0) -> np.ndarray:
    return np.asarray(Image.open(shapes / "images" / f"{k + 1:06d}.jpg").convert("RGB"))


def _instances(shapes) -> dict[int, np.ndarray]:
    data = json.loads((shapes / "instances.json").read_text())
    out: dict[int, list] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid:3x3", RegionSpec("grid", rows=3, cols=3)),
        ("GRID:2x5", RegionSpec("grid", rows=2, cols=5)),
        ("proposals", RegionSpec("proposals", max_regions=DEFAULT_MAX_PROPOSALS)),
        ("proposals:7", RegionSpec("proposals", max_regions=7)),
        ("boxes", RegionSpec("boxes")),
    ],
)
def test_region_specs_parse(text, expected):
    assert parse_region_spec(text) == expected
    assert parse_region_spec(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid:2by2", "unknown --regions spec 'grid:2by2'"),
        ("grid:0x3", "unknown --regions spec"),
        ("proposals:0", "at least 1"),
        ("proposals:-5", "at least 1"),
        ("proposals:many", "unknown --regions spec"),
        ("proposals:100000", "at most"),
        ("segments", "use boxes or grid:RxC"),
    ],
)
def test_bad_region_specs_are_one_line(text, message):
    with pytest.raises(VillaError, match=message):
        parse_region_spec(text)


def test_grid_boxes_tile_the_image():
    cells = np.asarray(grid_boxes("grid:2x3", 60, 90))
    assert cells.shape == (6, 4)
    assert cells[0].tolist() == [0, 0, 30, 30] and cells[-1].tolist() == [60, 30, 90, 60]
    assert (box_iou(cells, cells) > 1e-9).sum() == 6  # no two cells overlap


def test_nms_is_per_group_and_keeps_the_lower_index_on_ties():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60]], float)
    assert nms(boxes, np.array([1.0, 1.0, 0.9, 0.5]), 0.5).tolist() == [0, 3]
    assert nms(boxes, np.array([1.0, 1.0, 0.9, 0.5]), 0.5, groups=np.array([0, 1, 1, 0])).tolist() == [
        0,
        1,
        3,
    ]


# --------------------------------------------------------------------------- the proposer
def test_proposals_are_deterministic_ranked_and_inside_the_image(shapes):
    image = _image(shapes)
    first = propose_regions(image, 20)
    again = propose_regions(image.copy(), 20)
    assert np.array_equal(first.boxes, again.boxes) and np.array_equal(first.scores, again.scores)
    height, width = image.shape[:2]
    boxes = first.boxes
    assert 1 <= len(boxes) <= 20 and boxes.dtype == np.float32
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (np.diff(first.scores) <= 0).all() and ((first.scores >= 0) & (first.scores <= 1)).all()
    assert (box_iou(boxes, boxes)[~np.eye(len(boxes), dtype=bool)] <= 0.7 + 1e-6).all()  # NMS at 0.7


def test_proposals_find_the_shapes(shapes):
    """Recall of the instance boxes within the top 30 at IoU 0.5 and 0.7 on the shapes set."""
    truth = _instances(shapes)
    hits50 = hits70 = total = 0
    for k in range(12):
        best = box_iou(truth[k + 1], propose_regions(_image(shapes, k), 30).boxes).max(1)
        hits50, hits70, total = hits50 + (best >= 0.5).sum(), hits70 + (best >= 0.7).sum(), total + len(best)
    assert hits50 / total >= 0.9
    assert hits70 / total >= 0.75


def test_a_large_image_is_proposed_at_the_working_resolution(shapes):
    """A 10x upscaled image gives the boxes of the original, scaled (the proposer works at a fixed size)."""
    image = _image(shapes)
    big = np.asarray(Image.fromarray(image).resize((image.shape[1] * 10, image.shape[0] * 10), Image.NEAREST))
    small, large = propose_regions(image, 10).boxes, propose_regions(big, 10).boxes
    assert large.max() > 5 * image.shape[1]  # in the big image's pixels
    matched = box_iou(small * 10, large).max(1)
    assert np.median(matched) > 0.8


def test_tiny_and_flat_images():
    assert len(propose_regions(np.zeros((5, 40, 3), np.uint8)).boxes) == 0  # too small for any box
    flat = propose_regions(np.full((30, 40, 3), 128, np.uint8), 5)
    assert flat.boxes.tolist() == [[0, 0, 40, 30]]  # one segment: the whole image
    with pytest.raises(VillaError, match="at least 1"):
        propose_regions(np.zeros((30, 40, 3), np.uint8), 0)


# --------------------------------------------------------------------------- importers
def _coco(shapes, out, **kw):
    return import_coco(
        shapes / "images", shapes / "instances.json", shapes / "captions.json", out, progress=False, **kw
    )


def test_coco_import_with_computed_proposals(shapes, tmp_path):
    result = _coco(shapes, tmp_path / "prop", regions="proposals:12")
    dataset = Dataset.open(result.dataset_dir)
    frame = dataset.annotations()
    assert dataset.regions == "proposals:12" and dataset.has_objects and not dataset.regions_are_objects
    assert (frame["num_regions"] <= 12).all() and (frame["num_regions"] >= 1).all()
    truth = _instances(shapes)
    row = frame.iloc[0]
    assert len(row["object_boxes"]) == len(truth[int(row["image_id"])])  # the instance boxes stay as objects
    # labels come from overlap with the instance boxes only
    regions = np.asarray(list(row["region_coord"]), float)
    objects = np.asarray(list(row["object_boxes"]), float)
    iou = box_iou(regions, objects)
    for labels, overlaps in zip(row["reg_to_attr"], iou):
        assert (len(labels) > 0) == bool((overlaps >= 0.5).any())
    gt = _coco(shapes, tmp_path / "gt")
    assert Dataset.open(gt.dataset_dir).regions_are_objects


def test_proposals_and_a_proposals_file_are_exclusive(shapes, tmp_path):
    (tmp_path / "dets.json").write_text("[]")
    with pytest.raises(VillaError, match="give one of them"):
        _coco(shapes, tmp_path / "x", regions="proposals", proposals=tmp_path / "dets.json")
    assert not (tmp_path / "x").exists()


def test_table_import_without_boxes_uses_proposals(shapes, tmp_path):
    captions = json.loads((shapes / "captions.json").read_text())["annotations"]
    texts: dict[int, list[str]] = {}
    for c in captions:
        texts.setdefault(c["image_id"], []).append(c["caption"])
    rows = [{"image": f"{i:06d}.jpg", "text": " ".join(t)} for i, t in sorted(texts.items())]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "attributes.yaml").write_text(
        "attributes: [circle, square, triangle, star, half moon, cross, ring]\n"
    )
    result = import_table(
        table, tmp_path / "out", attributes=tmp_path / "attributes.yaml", images=shapes / "images",
        regions="proposals:8", progress=False,
    )  # fmt: skip
    dataset = Dataset.open(result.dataset_dir)
    assert dataset.regions == "proposals:8" and not dataset.has_region_labels
    assert (dataset.annotations()["num_regions"] <= 8).all()


def test_an_image_too_small_for_proposals_is_one_line(tmp_path, capsys):
    from villa.ingest import main

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((6, 30, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "t.csv").write_text("image,text\na.png,a red star here\n")
    (tmp_path / "attributes.yaml").write_text("attributes: [star]\n")
    argv = ["table", f"--table={tmp_path / 't.csv'}", f"--images={tmp_path / 'img'}",
            f"--attributes={tmp_path / 'attributes.yaml'}", "--regions=proposals", f"--out={tmp_path / 'out'}",
            "--no_progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small for any region proposal" in err[0] and "30x6" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_elongated_image_keeps_its_boxes_in_place():
    """Each axis is scaled back by its own factor (a 2000 x 10 image is worked on at 320 x 8)."""
    image = np.full((10, 2000, 3), 40, np.uint8)
    image[:, 1000:1200] = (220, 30, 30)
    boxes = propose_regions(image, 10).boxes
    assert [0, 0, 2000, 10] in boxes.round().tolist()  # the whole extent
    assert box_iou(np.array([[1000, 0, 1200, 10]]), boxes).max() > 0.9  # the red stripe, where it is


def test_detection_candidates_and_settings(shapes, tmp_path):
    """auto: proposals for a dataset whose regions are its objects' boxes, its own proposals (for their
    objectness) when it has them; settings that fail late are refused before any work."""
    from villa.evaluation.run import _check_detection_settings, detection_candidate_spec

    gt = Dataset.open(_coco(shapes, tmp_path / "gt").dataset_dir)
    prop = Dataset.open(_coco(shapes, tmp_path / "prop", regions="proposals:12").dataset_dir)
    grid = Dataset.open(_coco(shapes, tmp_path / "grid", regions="grid:2x2").dataset_dir)
    assert str(detection_candidate_spec(gt, "auto")) == "proposals:30"
    assert str(detection_candidate_spec(prop, "auto")) == "proposals:12"
    assert detection_candidate_spec(grid, "auto") is None  # the grid cells themselves
    assert detection_candidate_spec(gt, "dataset") is None
    with pytest.raises(VillaError, match="cannot be combined"):
        _check_detection_settings(gt, "auto", "cosine", 0.5, 100)
    _check_detection_settings(gt, "dataset", "cosine", None, None)  # no proposals, no cap: fine
    with pytest.raises(VillaError, match="unknown detection.score"):
        _check_detection_settings(gt, "auto", "maximum", 0.5, 100)
    with pytest.raises(VillaError, match="positive integer or null"):
        _check_detection_settings(gt, "auto", "sigmoid", 0.5, 0)
    with pytest.raises(VillaError, match="unknown detection.regions spec"):
        _check_detection_settings(gt, "segments", "sigmoid", 0.5, 100)


def test_ingest_names_the_next_command_and_the_encoder(shapes, tmp_path, capsys):
    from villa.ingest import main

    out = tmp_path / "data"
    main(["coco", f"--images={shapes / 'images'}", f"--instances={shapes / 'instances.json'}",
          f"--captions={shapes / 'captions.json'}", "--regions=proposals:5", f"--out={out}", "--no_progress"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out.resolve())  # the dataset folder stays the last line
    assert lines[-2].startswith(f"next: python3 preprocess/preprocess_dataset.py --data_dir={out.resolve()}")
    assert "--encoder=mobilenet_v2" in lines[-2]

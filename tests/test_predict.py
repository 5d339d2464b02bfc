"""Using a trained model: villa.load, Model.encode_text / encode_regions / ground / heatmaps, the export folder,
python -m villa.predict and python -m villa.export, on a tiny stage-2 run trained in tmp_path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_stage2_e2e import build_fixture

import villa
from villa.storage.errors import VillaError, VillaWarning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder of a 1-epoch CLIP-pairs stage 2 on an 84x84 DocMNIST-like set, its dataset folder)."""
    from villa.engine.hydra_app import compose
    from villa.vlm.run import run_stage2_from_config

    root = tmp_path_factory.mktemp("predict")
    data_dir, _, _ = build_fixture(root, "default", 384)
    cfg = compose(
        ["experiment=docmnist_clip", f"data_dir={data_dir}", f"checkpoint_dir={root}", "device=cpu", "epochs=1",
         "batch_size=4", "progress=false"]
    )  # fmt: skip
    run_stage2_from_config(cfg)
    return root / "docmnist_clip", data_dir


@pytest.fixture(scope="module")
def model(run):
    return villa.load(run[0])


@pytest.fixture(scope="module")
def image(run):
    return sorted((run[1] / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def exported(run, model, tmp_path_factory):
    return villa.export_model(model, tmp_path_factory.mktemp("export") / "model")


def _training_embeddings(run_dir: Path, image: Path, boxes, encoder: str = "default") -> torch.Tensor:
    """What evaluation computes for ``boxes`` (stored pixels) of ``image``: the checkpoint in the encoder's tower,
    the image decoded and resized by the encoder's policy through an ImageStore, boxes scaled with it."""
    from villa.datasets.images import ImageStore, ResizePolicy, scale_boxes
    from villa.encoders import get_encoder
    from villa.engine.checkpoints import load_model_state

    enc = get_encoder(encoder)
    tower = enc.build_image_model()
    if run_dir is not None:
        load_model_state(run_dir / "best.pkl", tower)
    with Image.open(image) as im:
        size = [[im.height, im.width]]
    store = ImageStore([image], size, ResizePolicy.of(enc))
    scaled = scale_boxes(np.asarray(boxes), np.repeat(store.scales, len(boxes), 0))
    rows = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(scaled)], 1)
    with torch.no_grad():
        return torch.nn.functional.normalize(tower(store.batch([0]).float() / 255, rows), dim=1)


# --------------------------------------------------------------------------- the Python API
def test_load_a_run_folder_finds_encoder_vocabulary_and_temperature(run, model):
    assert model.encoder_name == "default" and model.dim == 384
    assert model.vocabulary is not None and len(model.vocabulary) == 20  # the dataset's attributes.yaml
    assert model.temperature == pytest.approx(0.07)
    assert model.info["pairs"] == "clip" and model.info["dataset"] == "ds"
    assert not model.image_model.training


def test_encode_text_is_normalised_and_cached(model):
    embs = model.encode_text(["a red star", "two half moons", "a red star"])
    assert embs.shape == (3, 384) and embs.dtype == torch.float32
    assert torch.allclose(embs.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(embs[0], embs[2])
    expected = torch.nn.functional.normalize(model.encoder.encode_text(["two half moons"]), dim=1)[0]
    assert torch.allclose(embs[1], expected, atol=1e-6)
    assert "two half moons" in model._text_cache


def test_encode_regions_equals_the_training_recipe(run, model, image):
    boxes = [[0, 0, 84, 84], [28, 0, 56, 28], [5.5, 10, 40, 70]]
    embs = model.encode_regions(image, boxes)
    assert embs.shape == (3, 384)
    assert torch.allclose(embs, _training_embeddings(run[0], image, boxes), atol=1e-5)
    # a PIL image and a uint8 array give the same as the path
    with Image.open(image) as im:
        assert torch.allclose(model.encode_regions(im, boxes), embs, atol=1e-6)
        assert torch.allclose(model.encode_regions(np.asarray(im.convert("RGB")), boxes), embs, atol=1e-6)


def test_encode_regions_applies_the_resize_policy(image):
    """mobilenet_v2 enlarges images to a 224 px shorter side: boxes given in the 84 px image's pixels land on
    the same pixels of the resized image, exactly as in training."""
    untrained = villa.load("untrained:mobilenet_v2")
    assert untrained.policy.min_side == 224
    boxes = [[0, 0, 84, 84], [28, 28, 56, 84]]
    embs = untrained.encode_regions(image, boxes)
    assert torch.allclose(embs, _training_embeddings(None, image, boxes, "mobilenet_v2"), atol=1e-5)
    assert untrained.vocabulary is None


def test_ground_rows(model, image):
    rows = model.ground(image, ["the number is a seven", "the color is red"], regions="grid:3x3", top_k=2)
    assert rows and all(set(r) == {"box", "query", "score", "cosine"} for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    for query in ("the number is a seven", "the color is red"):
        assert sum(r["query"] == query for r in rows) == 2
    for r in rows:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 84 and 0 <= y0 < y1 <= 84 and 0 <= r["score"] <= 1
        region = model.encode_regions(image, [r["box"]])[0]
        assert r["cosine"] == pytest.approx(float(region @ model.encode_text([r["query"]])[0]), abs=1e-5)


def test_ground_scores_against_the_vocabulary(model, image):
    """score = sigmoid((cos(region, query) - mean cos(region, vocabulary attributes)) / temperature)."""
    rows = model.ground(image, "the color is red", regions=[[0, 0, 28, 28]], top_k=None, nms_iou=None)
    region = model.encode_regions(image, [[0, 0, 28, 28]])[0].double()
    vocab = model.vocabulary_embeddings().double()
    query = model.encode_text(["the color is red"])[0].double()
    expected = torch.sigmoid((region @ query - region @ vocab.mean(0)) / 0.07)
    assert rows[0]["score"] == pytest.approx(float(expected), abs=1e-6)
    # the vocabulary's attributes as queries: one row per attribute, labelled by name
    names = {r["query"] for r in model.ground(image, model.vocabulary, regions="grid:2x2", top_k=1)}
    assert names == set(model.vocabulary.names)


def test_ground_threshold_nms_and_top_k(model, image):
    boxes = [[0, 0, 40, 40], [1, 1, 41, 41], [44, 44, 84, 84]]
    everything = model.ground(image, ["a"], regions=boxes, top_k=None, nms_iou=None)
    assert len(everything) == 3
    suppressed = model.ground(image, ["a"], regions=boxes, top_k=None, nms_iou=0.5)
    assert len(suppressed) == 2  # the two near-identical boxes keep one
    assert model.ground(image, ["a"], regions=boxes, top_k=1, nms_iou=None) == everything[:1]
    assert model.ground(image, ["a"], regions=boxes, score_threshold=1.01) == []


def test_proposals_are_the_default_regions(model, image):
    rows = model.ground(image, ["the color is red"], top_k=3)
    assert 1 <= len(rows) <= 3


def test_heatmaps_cover_the_image(model, image):
    labels, maps = model.heatmaps(image, ["the color is red", "the number is a one"], cells=8, window=3)
    assert labels == ["the color is red", "the number is a one"]
    assert maps.shape == (2, 84, 84) and maps.dtype == np.float32
    assert 0 <= maps.min() <= maps.max() <= 1 and maps.std() > 0


def test_untrained_tower_and_an_added_vocabulary(run, image):
    untrained = villa.load("untrained:default")
    assert untrained.vocabulary is None and untrained.info["pairs"] == "untrained"
    lone = untrained.ground(image, ["a"], regions="grid:2x2", top_k=None, nms_iou=None)
    # the query is its own background: the class score is (1 + cosine) / 2, so the query decides the ranking
    assert all(r["score"] == pytest.approx((1 + r["cosine"]) / 2) for r in lone)
    assert [r["cosine"] for r in lone] == sorted((r["cosine"] for r in lone), reverse=True)
    other = untrained.ground(image, ["the number is a one"], regions="grid:2x2", top_k=None, nms_iou=None)
    assert {r["score"] for r in other} != {r["score"] for r in lone}  # the query changes the scores
    with_vocab = villa.load("untrained:default", vocabulary=run[1] / "attributes.yaml")
    assert len(with_vocab.vocabulary) == 20


def test_import_villa_stays_light():
    code = "import sys, villa; assert 'torch' not in sys.modules; assert callable(villa.load); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


# --------------------------------------------------------------------------- bad input
def test_missing_image(model, tmp_path):
    with pytest.raises(VillaError, match="missing"):
        model.ground(tmp_path / "nope.png", ["a"])


def test_unreadable_image(model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(VillaError, match="cannot decode image"):
        model.ground(bad, ["a"])


def test_empty_query_list(model, image):
    with pytest.raises(VillaError, match="query list is empty"):
        model.ground(image, [])
    with pytest.raises(VillaError, match="empty"):
        model.ground(image, ["  "])


def test_box_outside_the_image_is_clipped_with_a_warning(model, image):
    with pytest.warns(VillaWarning, match="clipped"):
        clipped = model.encode_regions(image, [[-10, 50, 30, 200]])
    assert torch.allclose(clipped, model.encode_regions(image, [[0, 50, 30, 84]]), atol=1e-6)
    with pytest.raises(VillaError, match="lies outside"):
        model.encode_regions(image, [[100, 100, 120, 120]])
    with pytest.raises(VillaError, match="x1 > x0"):
        model.encode_regions(image, [[30, 30, 10, 40]])


def test_long_query_is_truncated_with_a_warning(model, image):
    long = " ".join(["red"] * 400)
    with pytest.warns(VillaWarning, match="more than the text tower's limit of 256"):
        model.encode_text([long])
    with warnings.catch_warnings():
        warnings.simplefilter("error", VillaWarning)
        model.encode_text(["short enough"])


def test_damaged_run_folder(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    (copy / "best.pkl").write_bytes((copy / "best.pkl").read_bytes()[:500])
    with pytest.raises(
        VillaError, match="best.pkl in .* (is truncated|cannot be read|is damaged|is not)"
    ) as info:
        villa.load(copy)
    assert "\n" not in str(info.value)


def test_not_a_model(tmp_path):
    with pytest.raises(VillaError, match="no model at"):
        villa.load(tmp_path / "nowhere")
    with pytest.raises(VillaError, match="is not a villa model"):
        villa.load(tmp_path)


# --------------------------------------------------------------------------- export
def test_export_round_trip_gives_identical_embeddings(model, exported, image):
    files = {p.name for p in exported.iterdir()}
    assert files == {"config.json", "model.safetensors", "attributes.yaml", "MODEL_CARD.md"}
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "villa-model" and config["format_version"] == 1
    assert config["encoder"]["name"] == "default" and config["dim"] == 384 and config["temperature"] == 0.07
    assert config["resize_policy"] == {"min_side": None, "max_side": None}
    loaded = villa.load(exported)
    boxes = [[0, 0, 84, 84], [10, 20, 50, 60]]
    assert torch.equal(loaded.encode_regions(image, boxes), model.encode_regions(image, boxes))
    assert torch.equal(loaded.encode_text(["a red star"]), model.encode_text(["a red star"]))
    assert loaded.vocabulary.names == model.vocabulary.names and loaded.temperature == model.temperature
    assert loaded.ground(image, ["a"], regions="grid:3x3") == model.ground(image, ["a"], regions="grid:3x3")
    card = (exported / "MODEL_CARD.md").read_text()
    for needle in ("Training data", "python -m villa.stage2", "Intended use", "Apache-2.0", "MIT", "ds"):
        assert needle in card


def test_float16_export_is_half_the_size(model, exported, image, tmp_path):
    half = villa.export_model(model, tmp_path / "half", float16=True)
    full_bytes = (exported / "model.safetensors").stat().st_size
    assert (half / "model.safetensors").stat().st_size < 0.55 * full_bytes
    boxes = [[0, 0, 84, 84]]
    a, b = villa.load(half).encode_regions(image, boxes), model.encode_regions(image, boxes)
    assert torch.allclose(a, b, atol=2e-2) and not torch.equal(a, b)


def test_export_command_and_rerun(run, tmp_path):
    from villa.export import main

    out = tmp_path / "cli_export"
    code, _, err = _cli(main, [f"run_dir={run[0]}", f"out={out}"])
    assert code == 0, err
    assert (out / "config.json").is_file()
    code, _, err = _cli(main, [f"run_dir={run[0]}", f"out={out}", "float16=true"])  # an export is replaced
    assert code == 0 and json.loads((out / "config.json").read_text())["image_tower"]["dtype"] == "float16"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = _cli(main, [f"run_dir={run[0]}", f"out={foreign}"])
    assert code == 2 and err.splitlines() == [
        f"error: {foreign} exists and is not a villa export: choose a new folder for out="
    ]
    assert (foreign / "notes.txt").read_text() == "mine"


def _damaged_copy(exported: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    return copy


@pytest.mark.parametrize(
    "damage,expected",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "is truncated",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors in .* is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json in .* is not valid JSON"),
        (
            lambda d: (d / "attributes.yaml").write_text(
                (d / "attributes.yaml").read_text().replace("one", "uno")
            ),
            "does not match the checksum",
        ),
    ],
    ids=["truncated-weights", "missing-weights", "bad-config", "altered-vocabulary"],
)
def test_damaged_model_folder(exported, tmp_path, damage, expected):
    copy = _damaged_copy(exported, tmp_path)
    damage(copy)
    with pytest.raises(VillaError, match=expected) as info:
        villa.load(copy)
    assert "\n" not in str(info.value)


def test_model_folder_of_another_format_version(exported, tmp_path):
    copy = _damaged_copy(exported, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["format_version"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(VillaError, match="format version 2; this villa reads version 1: upgrade villa"):
        villa.load(copy)


# --------------------------------------------------------------------------- python -m villa.predict
def _cli(main, argv, monkeypatch=None):
    """Run a Hydra entry point in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["villa", *argv, "progress=false"] if "predict" in main.__module__ else ["villa", *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def test_predict_writes_coco_results_csv_and_pngs(exported, run, tmp_path):
    from villa.inference.prediction import read_predictions
    from villa.predict import main

    out = tmp_path / "out"
    images = run[1] / "images"
    argv = [f"model={exported}", f"images='{images}/00000[0-2].png'", 'queries=["the color is red","a seven"]',
            f"out={out}", "regions=grid:3x3", "top_k=2", "heatmap=true", "heatmap_cells=6", "heatmap_window=2"]  # fmt: skip
    code, stdout, err = _cli(main, argv)
    assert code == 0, err
    data = read_predictions(out)
    assert [c["name"] for c in data["categories"]] == ["the color is red", "a seven"]
    assert [i["id"] for i in data["images"]] == [1, 2, 3]
    assert len(data["annotations"]) == 3 * 2 * 2  # top 2 per query and image
    by_id = {c["id"]: c["name"] for c in data["categories"]}
    for a in data["annotations"]:
        assert (
            set(a) >= {"image_id", "category_id", "bbox", "score"} and by_id[a["category_id"]] == a["query"]
        )
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x + w <= 84 and y + h <= 84
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(data["annotations"])
    first = data["annotations"][0]
    assert float(rows[0]["x1"]) == pytest.approx(first["bbox"][0] + first["bbox"][2])
    for entry in data["images"]:
        with Image.open(out / entry["drawn"]) as drawn:
            assert drawn.size[0] >= 512  # an 84 px image is drawn enlarged
        assert len(entry["heatmaps"]) == 2 and all((out / p).is_file() for p in entry["heatmaps"])
    assert "12 boxes for 2 queries in 3 images" in stdout
    # a rerun into the folder villa wrote replaces it; a file of someone else's there is refused
    rerun = [a for a in argv if a.split("=")[0] not in ("regions", "heatmap")] + ["regions=grid:2x2"]
    assert _cli(main, rerun)[0] == 0
    assert read_predictions(out)["regions"] == "grid:2x2" and not (out / "heatmaps").exists()
    (out / "mine.txt").write_text("x")
    code, _, err = _cli(main, argv)
    assert code == 2 and "holds files villa.predict did not write (e.g. mine.txt)" in err


def test_predict_vocabulary_queries_and_boxes_file(exported, run, tmp_path):
    from villa.inference.prediction import predict_images

    image = sorted((run[1] / "images").glob("*.png"))[0]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({image.name: [[0, 0, 28, 28], [28, 28, 56, 56]]}))
    model = villa.load(exported)
    result = predict_images(model, image, "vocabulary", tmp_path / "out", boxes_file=boxes, top_k=1, nms_iou=None,
                            draw=False, progress=False)  # fmt: skip
    assert [c["name"] for c in result["categories"]] == model.vocabulary.names
    assert len(result["annotations"]) == 20 and result["regions"] == "boxes"
    assert {tuple(a["bbox"]) for a in result["annotations"]} <= {(0, 0, 28, 28), (28, 28, 28, 28)}


def _predict_error(exported, run, tmp_path, *extra) -> tuple[int, str]:
    from villa.predict import main

    argv = [f"model={exported}", f"images={run[1] / 'images' / '000000.png'}", "queries=[a]",
            f"out={tmp_path / 'out'}", *extra]  # fmt: skip
    code, _, err = _cli(main, argv)
    assert not (tmp_path / "out").exists()
    return code, err


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["images=/no/such/image.png"], "error: image /no/such/image.png is missing"),
        (["images=/no/such/*.png"], "error: no image file matches '/no/such/*.png'"),
        (["queries=[]"], "error: the query list is empty"),
        (["model=/no/such/model"], "error: no model at /no/such/model"),
        (["regions=grid:2by2"], "error: unknown regions spec 'grid:2by2'"),
    ],
    ids=["missing-image", "no-match", "empty-queries", "missing-model", "bad-regions"],
)
def test_predict_bad_input_is_one_line_and_exit_2(exported, run, tmp_path, extra, expected):
    code, err = _predict_error(exported, run, tmp_path, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expected), err


def test_predict_unreadable_image(exported, run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, err = _predict_error(exported, run, tmp_path, f"images={bad}")
    assert code == 2 and err.startswith(f"error: cannot decode image {bad}") and len(err.splitlines()) == 1


def test_predict_damaged_model_folder(exported, run, tmp_path):
    copy = _damaged_copy(exported, tmp_path)
    (copy / "model.safetensors").write_bytes(b"")
    code, err = _predict_error(copy, run, tmp_path)
    assert code == 2 and "model.safetensors in" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "is not valid JSON"),
        ("[[0, 0, 10, 10]]", "must be a non-empty JSON object"),
        ('{"000000.png": [[0, 0, 10]]}', "the boxes of '000000.png' are not a list of [x0, y0, x1, y1]"),
        ('{"000000.png": [[10, 0, 5, 10]]}', "is not [x0, y0, x1, y1] with x1 > x0"),
        ('{"other.png": [[0, 0, 10, 10]]}', "has no boxes for image 000000.png"),
    ],
    ids=["json", "not-object", "short-box", "flipped-box", "no-entry"],
)
def test_predict_malformed_boxes_file(exported, run, tmp_path, content, expected):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content)
    code, err = _predict_error(exported, run, tmp_path, f"boxes={boxes}")
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_predict_warns_in_one_line_when_a_box_is_clipped(exported, run, tmp_path):
    from villa.predict import main

    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"000000.png": [[-5, 0, 40, 40]]}')
    argv = [f"model={exported}", f"images={run[1] / 'images' / '000000.png'}", "queries=[a]",
            f"out={tmp_path / 'out'}", f"boxes={boxes}"]  # fmt: skip
    code, _, err = _cli(main, argv)
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: 1 box(es) extend outside the 84x84 image {run[1] / 'images' / '000000.png'} and were clipped to "
        "it (e.g. box 0 [-5.0, 0.0, 40.0, 40.0] -> [0.0, 0.0, 40.0, 40.0])"
    ]


def test_predict_vocabulary_needs_a_vocabulary(run, tmp_path):
    from villa.inference.prediction import predict_images

    with pytest.raises(VillaError, match="has no training vocabulary"):
        predict_images(villa.load("untrained:default"), run[1] / "images", "vocabulary", tmp_path / "o")


def test_predict_and_export_configs_compose():
    from villa.engine.hydra_app import check_command_line, compose

    cfg = compose(["model=m", "images=i", "queries=[a]", "out=o"], config_name="predict")
    assert cfg.regions == "proposals" and cfg.top_k == 5 and cfg.nms_iou == 0.5 and cfg.heatmap is False
    assert compose(["run_dir=r", "out=o"], config_name="export").float16 is False
    with pytest.raises(VillaError, match="images, model, out, queries are required"):
        check_command_line([], "predict")

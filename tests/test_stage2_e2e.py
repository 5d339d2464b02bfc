"""Tiny end-to-end stage 2 (ViLLA and CLIP pairs) followed by evaluation, on a synthetic dataset in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from villa.datasets import write_dataset
from villa.docmnist.vocabulary import ATTRIBUTES, COLORS, DIGIT_WORDS, docmnist_vocabulary
from villa.features.embeddings import TextEmbeddingCache, save_attr_embs
from villa.mapping.schema import mapping_inputs, write_mapping, write_mapping_metrics
from villa.storage.errors import VillaError

SPLIT_SIZES = {"train": 4, "val": 2, "test": 3}
COLOR_NAMES = tuple(COLORS)


def _encoder():
    from villa.encoders import get_encoder

    return get_encoder("default", device="cpu")


def build_fixture(root, encoder_name: str, dim: int, seed: int = 0):
    """A DocMNIST-like dataset (coloured squares in 28x28 cells), random sentence/attribute embeddings,
    and a stage-1 mapping that assigns ground truth except the first region of every image (empty text)."""
    rng = np.random.default_rng(seed)
    data_dir, stage1_dir = root / "ds", root / "stage1"
    (data_dir / "images").mkdir(parents=True)
    rows, image_id = [], 0
    for split, count in SPLIT_SIZES.items():
        for _ in range(count):
            n = int(rng.integers(2, 4))
            cells = np.sort(rng.choice(9, size=n, replace=False))
            canvas = np.zeros((84, 84, 3), dtype=np.uint8)
            boxes, digits, colors, reg_to_attr, sentences = [], [], [], [], []
            for cell in cells:
                x, y = 28 * (cell % 3), 28 * (cell // 3)
                digit = DIGIT_WORDS[int(rng.integers(10))]
                color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
                canvas[y + 6 : y + 22, x + 6 : x + 22] = COLORS[color]
                boxes.append([int(x), int(y), int(x) + 28, int(y) + 28])
                digits.append(digit)
                colors.append(color)
                reg_to_attr.append([digit, color])
                sentences.append([f"the number is a {digit}", f"the color is {color}"])
            path = f"images/{image_id:06d}.png"
            Image.fromarray(canvas).save(data_dir / path)
            flat = list(dict.fromkeys(s for per in sentences for s in per))
            rows.append(
                {
                    "image_id": image_id,
                    "image_size": [84, 84],
                    "image_filepath": path,
                    "region_coord": boxes,
                    "num_regions": n,
                    "split": split,
                    "text": " . ".join(flat),
                    "digit_label": digits,
                    "color_label": colors,
                    "shape_label": [None] * n,
                    "size_label": [None] * n,
                    "reg_to_attr": reg_to_attr,
                    "attributes": [a for a in ATTRIBUTES if any(a in r for r in reg_to_attr)],
                    "assigned_attributes": [[]] + reg_to_attr[1:],
                    "assigned_text": [""] + [" . ".join(s) for s in sentences[1:]],
                }
            )
            image_id += 1
    frame = pd.DataFrame(rows)
    write_dataset(data_dir, vocabulary=docmnist_vocabulary(), source="test", columns=frame)
    for split in ("train", "val"):
        write_mapping(stage1_dir, split, frame[frame["split"] == split].reset_index(drop=True))
    write_mapping_metrics(stage1_dir, {}, mapping_inputs(data_dir))  # marks the stage-1 run complete
    sentences = sorted({s.strip() for t in frame["text"] for s in t.split(".")})
    TextEmbeddingCache.write(data_dir, encoder_name, sentences, rng.standard_normal((len(sentences), dim)))
    attr = torch.from_numpy(rng.standard_normal((len(ATTRIBUTES), dim)).astype(np.float32))
    save_attr_embs(data_dir, dict(zip(ATTRIBUTES, torch.nn.functional.normalize(attr, dim=1))))
    return data_dir, stage1_dir, frame


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    enc = _encoder()
    return (*build_fixture(tmp_path_factory.mktemp("stage2"), enc.name, enc.dim), enc)


def test_stage2_dataset_from_mapping(fixture):
    from villa.vlm.run import build_stage2_datasets

    data_dir, stage1_dir, frame, enc = fixture
    train, val = build_stage2_datasets(data_dir, enc.name, "villa", stage1_dir)
    train_frame = frame[frame["split"] == "train"]
    # whole image + every region but the first (whose assigned text is empty)
    assert len(train) == 4 and train.num_pairs == int(train_frame["num_regions"].sum())
    first = train.images.batch([0])
    assert first.dtype == torch.uint8 and tuple(first.shape) == (1, 3, 84, 84) and train.images.cached
    assert torch.allclose(train.text.norm(dim=1), torch.ones(train.num_pairs), atol=1e-5)
    clip_train, _ = build_stage2_datasets(data_dir, enc.name, "clip", None)
    assert clip_train.num_pairs == 4
    assert clip_train.boxes.tolist() == [[0, 0, 83, 83]] * 4


def test_stage2_train_then_evaluate(fixture, tmp_path):
    from villa.engine.hydra_app import compose
    from villa.evaluation.run import evaluate_from_config, evaluate_model
    from villa.vlm.run import run_stage2

    data_dir, stage1_dir, _, enc = fixture
    run_dir = tmp_path / "docmnist_stage2"
    result = run_stage2(
        data_dir=data_dir,
        run_dir=run_dir,
        stage_1_ckpt_dir=stage1_dir,
        epochs=1,
        batch_size=2,
        device="cpu",
        progress=False,
    )
    assert (run_dir / "best.pkl").is_file() and (run_dir / "last.pkl").is_file()
    assert len(result.history) == 1 and np.isfinite(result.history[0]["val_loss"])

    metrics = evaluate_model(
        data_dir=data_dir,
        checkpoint=run_dir / "best.pkl",
        device="cpu",
        out_path=run_dir / "metrics.json",
        progress=False,
    )
    stored = json.loads((run_dir / "metrics.json").read_text())
    keys = ("text_to_region_r_precision", "region_to_text_r_precision", "precision_at_1", "precision_at_5",
            "precision_at_10", "zero_shot_auroc")  # fmt: skip
    for key in keys:
        assert 0.0 <= stored[key] <= 100.0
        assert stored[key] == pytest.approx(metrics[key])
    frame = fixture[2]
    assert stored["num_regions"] == int(frame.loc[frame["split"] == "test", "num_regions"].sum())
    assert set(stored["per_attribute"]) == set(ATTRIBUTES)
    assert stored["epoch"] == 1
    # zero-shot detection: each test region is one object per attribute it carries (digit and colour here)
    detection = stored["detection"]
    assert (
        0.0 <= detection["ap"] <= detection["ap50"] + 1e-9 <= 100.0 + 1e-9
        and detection["ground_truth"] == "regions"
    )
    assert detection["num_gt"] == 2 * stored["num_regions"]
    assert detection["per_attribute"]["circle"]["ap"] is None  # no circle in this data

    # the Hydra path: untrained floor, evaluated into ${checkpoint_dir}/${task_name}/metrics.json
    cfg = compose(
        ["experiment=docmnist_untrained", f"data_dir={data_dir}", f"checkpoint_dir={tmp_path}", "device=cpu",
         "progress=false"]
    )  # fmt: skip
    untrained = evaluate_from_config(cfg)
    assert (tmp_path / "docmnist_untrained" / "metrics.json").is_file()
    assert untrained["model"] == "docmnist_untrained" and untrained["checkpoint"] is None


def test_clip_baseline_runs_without_mapping(fixture, tmp_path):
    from villa.engine.hydra_app import compose
    from villa.vlm.run import run_stage2_from_config

    data_dir, _, _, _ = fixture
    cfg = compose(
        ["experiment=docmnist_clip", f"data_dir={data_dir}", f"checkpoint_dir={tmp_path}", "device=cpu",
         "epochs=1", "batch_size=4", "progress=false"]
    )  # fmt: skip
    result = run_stage2_from_config(cfg)
    assert (tmp_path / "docmnist_clip" / "best.pkl").is_file()
    assert result.history[0]["train_loss"] > 0


def test_whole_image_pairs_separate_trains_and_leaves_clip_unchanged(fixture, tmp_path):
    from villa.engine.hydra_app import compose
    from villa.vlm.run import run_stage2_from_config

    data_dir, stage1_dir, _, _ = fixture
    common = [f"data_dir={data_dir}", "device=cpu", "epochs=1", "batch_size=4", "progress=false"]
    losses = {}
    for experiment in ("docmnist_stage2", "docmnist_clip"):
        for setting in ("pooled", "separate"):
            run_dir = tmp_path / f"{experiment}_{setting}"
            keys = [f"stage_1_ckpt_dir={stage1_dir}"] if experiment == "docmnist_stage2" else []
            cfg = compose([f"experiment={experiment}", *common, *keys, f"run_dir={run_dir}",
                           f"whole_image_pairs={setting}"])  # fmt: skip
            losses[experiment, setting] = run_stage2_from_config(cfg).history[0]["train_loss"]
    # whole-image pairs only: the same loss either way; with region pairs: a different loss
    assert losses["docmnist_clip", "separate"] == losses["docmnist_clip", "pooled"]
    assert losses["docmnist_stage2", "separate"] != pytest.approx(
        losses["docmnist_stage2", "pooled"], rel=1e-3
    )


def test_stage2_bad_input_errors(fixture, tmp_path):
    from villa.evaluation.run import evaluate_model
    from villa.vlm.run import run_stage2

    data_dir, _, _, enc = fixture
    with pytest.raises(VillaError, match="stage 1"):
        run_stage2(
            data_dir=data_dir, run_dir=tmp_path / "r", stage_1_ckpt_dir=tmp_path / "nope", device="cpu"
        )
    (tmp_path / "empty_stage1").mkdir()
    with pytest.raises(VillaError, match="stage 1"):
        run_stage2(
            data_dir=data_dir,
            run_dir=tmp_path / "r",
            stage_1_ckpt_dir=tmp_path / "empty_stage1",
            device="cpu",
        )
    with pytest.raises(VillaError, match="no checkpoint"):
        evaluate_model(data_dir=data_dir, checkpoint=tmp_path / "missing" / "best.pkl", device="cpu")
    with pytest.raises(VillaError, match="has no images"):
        _evaluate_without_test_split(data_dir, tmp_path)

    other = tmp_path / "other_encoder"
    build_fixture(other, "some_other_encoder", enc.dim)
    with pytest.raises(VillaError, match="encoder"):
        evaluate_model(data_dir=other / "ds", device="cpu", progress=False)
    with pytest.raises(VillaError, match="encoder"):
        run_stage2(
            data_dir=other / "ds", run_dir=tmp_path / "r", stage_1_ckpt_dir=other / "stage1", device="cpu"
        )


def _evaluate_without_test_split(data_dir, tmp_path):
    from villa.datasets import read_annotations
    from villa.evaluation.run import evaluate_model

    frame = read_annotations(data_dir)
    target = tmp_path / "no_test"
    target.mkdir()
    write_dataset(
        target, vocabulary=docmnist_vocabulary(), source="test", columns=frame[frame["split"] != "test"]
    )
    evaluate_model(data_dir=target, device="cpu", progress=False)

"""Result collection and plotting of the complexity sweep, on hand-written run folders."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from villa.complexity_sweep import (
    RESULT_COLUMNS,
    _check_settings,
    collect_results,
    format_results,
    write_results,
)
from villa.errors import VillaError


def fake_run(out_dir, complexity, avg, r_precision):
    root = out_dir / f"c{complexity}"
    (root / "docmnist_stage1").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"dataset_dir": "x", "avg_train_complexity": avg}))
    mapping = {"test": {"precision": 90.0, "recall": 80.0, "f1": 84.7, "per_kind": {}}}
    (root / "docmnist_stage1" / "mapping_metrics.json").write_text(json.dumps(mapping))
    for offset, experiment in enumerate(("docmnist_stage2", "docmnist_clip", "docmnist_untrained")):
        (root / experiment).mkdir()
        metrics = {
            "text_to_region_r_precision": r_precision - 10 * offset,
            "region_to_text_r_precision": 50.0,
            "zero_shot_auroc": 70.0,
        }
        (root / experiment / "metrics.json").write_text(json.dumps(metrics))


def test_collect_and_write_results(tmp_path):
    fake_run(tmp_path, 16, 15.2, 60.0)
    fake_run(tmp_path, 4, 3.9, 80.0)
    (tmp_path / "c8").mkdir()  # an unfinished complexity contributes nothing
    results = collect_results(tmp_path)
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert results["target_sample_complexity"].tolist() == [4, 4, 4, 16, 16, 16]
    assert results["method"].tolist() == ["villa", "clip", "untrained"] * 2
    villa = results[results["method"] == "villa"]
    assert villa["text_to_region_r_precision"].tolist() == [80.0, 60.0]
    assert villa["mapping_f1"].tolist() == [84.7, 84.7]
    assert results[results["method"] != "villa"]["mapping_f1"].isna().all()

    csv_path, png_path = write_results(tmp_path, results)
    assert pd.read_csv(csv_path).shape == (6, len(RESULT_COLUMNS))
    with Image.open(png_path) as image:
        assert image.size[0] > 600 and image.size[1] > 300
    assert "villa" in format_results(results)


def test_sweep_refuses_an_out_dir_with_other_settings(tmp_path):
    settings = {"attribute_budget": 100, "seed": 1, "stage1": {"epochs": 2}}
    _check_settings(tmp_path, settings)
    _check_settings(tmp_path, dict(settings))  # same settings: a resume
    with pytest.raises(VillaError, match=r"other settings \(attribute_budget, stage1 differ\)"):
        _check_settings(tmp_path, {**settings, "attribute_budget": 200, "stage1": {"epochs": 3}})

"""A miniature sweep end to end through its command line: two seeds as two concurrent processes sharing one
out_dir (one complexity, all six methods), then the plain command, which skips every step and gathers the
tables."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from villa.complexity_sweep import COMPARISONS, DIFFERENCE_COLUMNS, METHODS, RESULT_COLUMNS, SUMMARY_COLUMNS

pytestmark = pytest.mark.slow

STEPS_PER_CELL = 14  # generate, preprocess, stage 1, five stage-2 trainings, six evaluations


def test_miniature_sweep_writes_tables_and_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    common = [
        "complexities=[8]",
        "attribute_budget=60",
        "val_attribute_budget=24",
        "test_attribute_budget=24",
        "stage1.epochs=1",
        "stage2.epochs=1",
        "stage2.batch_size=8",
        "device=cpu",
        "progress=false",
        f"out_dir={out}",
    ]
    sweep = [sys.executable, "-m", "villa.sweep"]
    concurrent = [
        subprocess.Popen(
            [*sweep, f"seeds=[{seed}]", *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        for seed in (23, 24)
    ]
    for process in concurrent:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-4000:]

    cmd = [*sweep, "seeds=[23,24]", *common]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("already done, skipped") == 2 * STEPS_PER_CELL
    assert "paired differences" in first.stdout

    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert list(zip(results["seed"], results["method"])) == [(s, m) for s in (23, 24) for m in METHODS]
    metric_columns = ["text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc"]
    assert results[metric_columns].apply(lambda c: c.between(0, 100)).all().all()
    assert results[results["method"] == "villa"]["mapping_f1"].between(0, 100).all()
    assert results[results["method"] != "villa"]["mapping_f1"].isna().all()
    assert {"detection_ap", "detection_ap50"} <= set(results.columns)
    averages = results.groupby("seed")["avg_sample_complexity"].first()
    assert (averages <= 8).all() and averages.nunique() >= 1

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    t2r = summary[summary["metric"] == "text_to_region_r_precision"]
    assert t2r["method"].tolist() == list(METHODS) and (t2r["n"] == 2).all()
    assert (t2r["ci95_low"] <= t2r["mean"]).all() and (t2r["mean"] <= t2r["ci95_high"]).all()
    differences = pd.read_csv(out / "differences.csv")
    assert list(differences.columns) == list(DIFFERENCE_COLUMNS)
    assert set(differences["comparison"]) == {f"{a} - {b}" for a, b in COMPARISONS}
    with Image.open(out / "results.png") as image:
        assert image.size[0] > 600
    steps = pd.read_csv(out / "step_times.csv")
    assert len(steps) == 2 * STEPS_PER_CELL and (steps["seconds"] >= 0).all()
    assert steps.groupby("seed").size().to_dict() == {23: STEPS_PER_CELL, 24: STEPS_PER_CELL}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 2 * STEPS_PER_CELL
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)

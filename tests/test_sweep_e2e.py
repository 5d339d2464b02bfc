"""A miniature sweep end to end through its command line: two seeds as two concurrent processes sharing one
out_dir (one complexity, all six methods), then the plain command, which skips every step and gathers the
tables."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from villa.docmnist.complexity_sweep import (
    COMPARISONS,
    DIFFERENCE_COLUMNS,
    METHOD_EXPERIMENTS,
    METHODS,
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
)

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
        "device=auto",  # the command's and the demo's default, resolved by every stage and by env.json
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
    # every figure is the one its run wrote: the dataset's average complexity, stage 1's test F1, the evaluations
    digests = set()
    for seed in (23, 24):
        cell = out / f"s{seed}" / "c8"
        rows = results[results["seed"] == seed].set_index("method")
        record = json.loads((cell / "dataset.json").read_text())
        assert 6 <= record["avg_train_complexity"] <= 8  # near the target complexity 8, not above it
        assert (rows["avg_sample_complexity"] == round(record["avg_train_complexity"], 2)).all()
        digests.add(
            hashlib.sha256((Path(record["dataset_dir"]) / "annotations.feather").read_bytes()).hexdigest()
        )
        mapping = json.loads((cell / "docmnist_stage1" / "mapping_metrics.json").read_text())
        assert rows.loc["villa", "mapping_f1"] == pytest.approx(mapping["test"]["f1"], abs=0.006)
        for method, experiment in METHOD_EXPERIMENTS.items():
            metrics = json.loads((cell / experiment / "metrics.json").read_text())
            for column in metric_columns:
                expected = float("nan") if metrics[column] is None else metrics[column]  # (null: no value)
                assert rows.loc[method, column] == pytest.approx(expected, abs=0.006, nan_ok=True), (
                    seed,
                    method,
                )
        # trained towers moved away from the untrained one
        assert (rows.loc["villa", metric_columns] != rows.loc["untrained", metric_columns]).any()
    assert len(digests) == 2  # each seed made its own dataset

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    t2r = summary[summary["metric"] == "text_to_region_r_precision"]
    assert t2r["method"].tolist() == list(METHODS) and (t2r["n"] == 2).all()
    assert (t2r["ci95_low"] <= t2r["mean"]).all() and (t2r["mean"] <= t2r["ci95_high"]).all()
    seed_means = results.groupby("method")["text_to_region_r_precision"].mean()
    for method, mean in zip(t2r["method"], t2r["mean"]):
        assert mean == pytest.approx(seed_means[method], abs=0.011)  # the mean over the two seeds
    differences = pd.read_csv(out / "differences.csv")
    assert list(differences.columns) == list(DIFFERENCE_COLUMNS)
    assert set(differences["comparison"]) == {f"{a} - {b}" for a, b in COMPARISONS}
    paired = results.pivot(index="seed", columns="method", values="text_to_region_r_precision")
    for a, b in COMPARISONS:
        row = differences[
            (differences["comparison"] == f"{a} - {b}") & (differences["metric"] == metric_columns[0])
        ]
        assert row["mean"].item() == pytest.approx((paired[a] - paired[b]).mean(), abs=0.011)
    with Image.open(out / "results.png") as image:
        assert image.size[0] > 600
    steps = pd.read_csv(out / "step_times.csv")
    assert len(steps) == 2 * STEPS_PER_CELL and (steps["seconds"] >= 0).all()
    assert steps.groupby("seed").size().to_dict() == {23: STEPS_PER_CELL, 24: STEPS_PER_CELL}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 2 * STEPS_PER_CELL
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)

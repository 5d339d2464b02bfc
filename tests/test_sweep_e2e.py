"""A miniature complexity sweep end to end through its command line: two complexities as two concurrent
processes sharing one out_dir, then the plain command, which skips every step and gathers the table."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from villa.complexity_sweep import RESULT_COLUMNS

pytestmark = pytest.mark.slow


def test_miniature_sweep_writes_table_and_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    common = [
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
            [*sweep, f"complexities=[{t}]", *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        for t in (4, 8)
    ]
    for process in concurrent:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-4000:]

    cmd = [*sweep, "complexities=[4,8]", *common]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("already done, skipped") == 16

    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert sorted(results["target_sample_complexity"].unique()) == [4, 8]
    assert sorted(results["method"].unique()) == ["clip", "untrained", "villa"]
    assert len(results) == 6
    metric_columns = ["text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc"]
    assert results[metric_columns].apply(lambda c: c.between(0, 100)).all().all()
    assert results[results["method"] == "villa"]["mapping_f1"].between(0, 100).all()
    averages = results.groupby("target_sample_complexity")["avg_sample_complexity"].first()
    assert averages[4] <= 4 < averages[8] <= 8
    with Image.open(out / "results.png") as image:
        assert image.size[0] > 600
    steps = pd.read_csv(out / "step_times.csv")
    assert len(steps) == 16 and (steps["seconds"] >= 0).all()
    assert steps.groupby("complexity").size().to_dict() == {4: 8, 8: 8}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 16
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)

"""Result collection, the seed statistics (t-intervals, summary, paired differences) and the plot of the
complexity sweep, on hand-written run folders and a synthetic results table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from villa.docmnist.complexity_sweep import (
    DIFFERENCE_COLUMNS,
    METHOD_EXPERIMENTS,
    METHODS,
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
    _check_settings,
    collect_results,
    differences,
    format_results,
    format_summary,
    summarize,
    t_interval,
    t_quantile_975,
    write_results,
)
from villa.storage.errors import VillaError


def fake_run(
    out_dir, complexity, avg, r_precision, seed=23, methods=("villa", "clip", "untrained"), detection=False
):
    root = out_dir / f"s{seed}" / f"c{complexity}"
    (root / "docmnist_stage1").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"dataset_dir": "x", "avg_train_complexity": avg}))
    mapping = {"test": {"precision": 90.0, "recall": 80.0, "f1": 84.7, "per_kind": {}}}
    (root / "docmnist_stage1" / "mapping_metrics.json").write_text(json.dumps(mapping))
    for offset, method in enumerate(methods):
        (root / METHOD_EXPERIMENTS[method]).mkdir()
        metrics = {
            "text_to_region_r_precision": r_precision - 10 * offset,
            "region_to_text_r_precision": 50.0,
            "zero_shot_auroc": 70.0,
        }
        if detection:
            metrics["detection"] = {"ap": 20.0 + offset, "ap50": 40.0 + offset, "per_attribute": {}}
        (root / METHOD_EXPERIMENTS[method] / "metrics.json").write_text(json.dumps(metrics))


def test_collect_and_write_results(tmp_path):
    fake_run(tmp_path, 16, 15.2, 60.0)
    fake_run(tmp_path, 4, 3.9, 80.0, detection=True)
    (tmp_path / "s23" / "c8").mkdir()  # an unfinished complexity contributes nothing
    results = collect_results(tmp_path)
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert results["seed"].tolist() == [23] * 6
    assert results["target_sample_complexity"].tolist() == [4, 4, 4, 16, 16, 16]
    assert results["method"].tolist() == ["villa", "clip", "untrained"] * 2
    villa = results[results["method"] == "villa"]
    assert villa["text_to_region_r_precision"].tolist() == [80.0, 60.0]
    assert villa["mapping_f1"].tolist() == [84.7, 84.7]
    assert results[results["method"] != "villa"]["mapping_f1"].isna().all()
    # detection columns: the metrics.json entry where there is one, None where not
    assert results["detection_ap"].tolist()[:3] == [20.0, 21.0, 22.0]
    assert results["detection_ap50"].tolist()[:3] == [40.0, 41.0, 42.0]
    assert results["detection_ap"].iloc[3:].isna().all()

    paths = write_results(tmp_path, results)
    assert pd.read_csv(paths["results"]).shape == (6, len(RESULT_COLUMNS))
    summary = pd.read_csv(paths["summary"])
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert (summary["n"] == 1).all() and summary["ci95_low"].isna().all()  # one seed: no interval
    assert list(pd.read_csv(paths["differences"]).columns) == list(DIFFERENCE_COLUMNS)
    with Image.open(paths["plot"]) as image:
        assert image.size[0] > 600 and image.size[1] > 300
    assert "villa" in format_results(results)
    assert format_summary(results) == ""  # nothing to summarise over one seed


def test_collect_gathers_every_seed_and_method(tmp_path):
    fake_run(tmp_path, 4, 3.6, 80.0, seed=24, methods=METHODS)
    fake_run(tmp_path, 4, 3.7, 81.0, seed=23, methods=("clip", "oracle"))
    (tmp_path / "s7").mkdir()  # a seed without cells
    (tmp_path / "notes").mkdir()
    results = collect_results(tmp_path)
    assert list(zip(results["seed"], results["method"])) == [
        (23, "clip"),
        (23, "oracle"),
        *[(24, m) for m in METHODS],
    ]
    oracle = results[(results["seed"] == 23) & (results["method"] == "oracle")]
    assert oracle["text_to_region_r_precision"].item() == 71.0


def test_sweep_refuses_an_out_dir_with_other_settings(tmp_path):
    settings = {"attribute_budget": 100, "encoder": "default", "stage1": {"epochs": 2}}
    _check_settings(tmp_path, settings)
    _check_settings(tmp_path, dict(settings))  # same settings: a resume
    with pytest.raises(VillaError, match=r"other settings \(attribute_budget, stage1 differ\)"):
        _check_settings(tmp_path, {**settings, "attribute_budget": 200, "stage1": {"epochs": 3}})


# --------------------------------------------------------------------------- t-interval maths
def _t_quantile_by_integration(df: int, p: float = 0.975) -> float:
    """An independent check of the table: bisect the t CDF, integrated numerically from its density."""

    def cdf(t):
        x = np.linspace(0.0, t, 100001)
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        return 0.5 + np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)

    lo, hi = 0.0, 15.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(
    "df,expected",
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452), (30, 2.0423),
     (31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (10**6, 1.9600)],
)  # fmt: skip
def test_t_quantile_known_values(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=1e-4)
    if df <= 60:
        assert t_quantile_975(df) == pytest.approx(_t_quantile_by_integration(df), abs=2e-5)


def test_t_interval():
    # 50, 52, 54: mean 52, std 2, half-width t(0.975, 2) * 2 / sqrt(3) = 4.9683
    got = t_interval([50.0, 52.0, 54.0])
    assert got["n"] == 3 and got["mean"] == 52.0 and got["std"] == pytest.approx(2.0)
    assert got["ci95_low"] == pytest.approx(47.0317, abs=1e-4)
    assert got["ci95_high"] == pytest.approx(56.9683, abs=1e-4)
    one = t_interval([7.0, float("nan")])
    assert one["n"] == 1 and one["mean"] == 7.0 and math.isnan(one["std"]) and math.isnan(one["ci95_low"])
    assert t_interval([])["n"] == 0
    with pytest.raises(ValueError):
        t_quantile_975(0)


# --------------------------------------------------------------------------- summary and differences
def _synthetic_results() -> pd.DataFrame:
    """Three seeds at T=4 (all methods), one seed at T=8 (villa, clip); detection only at T=4."""
    rows = []
    t2r = {  # per method, seeds 23, 24, 25
        "villa": [50.0, 52.0, 54.0],
        "clip": [40.0, 41.0, 45.0],  # villa - clip: 10, 11, 9
        "all_regions": [49.0, 53.0, 53.0],  # villa - all_regions: 1, -1, 1
        "random_mapping": [45.0, 47.0, 50.0],  # villa - random: 5, 5, 4
        "oracle": [60.0, 61.0, 66.0],  # oracle - villa: 10, 9, 12
        "untrained": [14.0, 14.0, 14.0],
    }
    for i, seed in enumerate((23, 24, 25)):
        for method in METHODS:
            rows.append(
                {
                    "seed": seed,
                    "target_sample_complexity": 4,
                    "avg_sample_complexity": 3.5 + 0.1 * i,
                    "method": method,
                    "text_to_region_r_precision": t2r[method][i],
                    "region_to_text_r_precision": 60.0,
                    "zero_shot_auroc": 80.0,
                    "detection_ap": 30.0 + i if method == "villa" else 25.0,
                    "detection_ap50": 50.0,
                    "mapping_f1": 90.0 + i if method == "villa" else None,
                }
            )
    for method, value in (("villa", 40.0), ("clip", 30.0)):
        rows.append(
            {"seed": 23, "target_sample_complexity": 8, "avg_sample_complexity": 7.3, "method": method,
             "text_to_region_r_precision": value, "region_to_text_r_precision": 50.0, "zero_shot_auroc": 70.0,
             "detection_ap": None, "detection_ap50": None, "mapping_f1": 80.0 if method == "villa" else None}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def test_summary_from_a_results_table(tmp_path):
    results = _synthetic_results()
    results.to_csv(tmp_path / "results.csv", index=False)
    summary = summarize(pd.read_csv(tmp_path / "results.csv"))  # as the lead would, from the file
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    key = summary.set_index(["target_sample_complexity", "method", "metric"])
    villa = key.loc[(4, "villa", "text_to_region_r_precision")]
    assert villa["n"] == 3 and villa["mean"] == 52.0 and villa["std"] == pytest.approx(2.0)
    assert (villa["ci95_low"], villa["ci95_high"]) == pytest.approx((47.0317, 56.9683), abs=1e-4)
    assert villa["avg_sample_complexity"] == pytest.approx(3.6)
    assert key.loc[(4, "villa", "detection_ap")]["mean"] == 31.0
    assert key.loc[(4, "villa", "mapping_f1")]["n"] == 3
    # a metric without values has no row: mapping F1 of clip, detection at T=8
    assert (4, "clip", "mapping_f1") not in key.index and (8, "villa", "detection_ap") not in key.index
    single = key.loc[(8, "clip", "text_to_region_r_precision")]
    assert single["n"] == 1 and single["mean"] == 30.0 and math.isnan(single["ci95_low"])
    # table order: complexity, then the methods' order
    assert summary[summary["target_sample_complexity"] == 4]["method"].unique().tolist() == list(METHODS)


def test_paired_differences_from_a_results_table():
    diffs = differences(_synthetic_results())
    assert list(diffs.columns) == list(DIFFERENCE_COLUMNS)
    t2r = diffs[diffs["metric"] == "text_to_region_r_precision"].set_index(
        ["target_sample_complexity", "comparison"]
    )
    assert t2r.loc[(4, "villa - clip")][["n", "mean", "std"]].tolist() == pytest.approx([3, 10.0, 1.0])
    half = 4.302652730 / math.sqrt(3)
    assert t2r.loc[(4, "villa - clip")]["ci95_low"] == pytest.approx(10 - half)
    assert t2r.loc[(4, "villa - clip")]["excludes_zero"] is True
    # 1, -1, 1: mean 1/3, the interval holds 0
    assert t2r.loc[(4, "villa - all_regions")]["mean"] == pytest.approx(1 / 3)
    assert t2r.loc[(4, "villa - all_regions")]["excludes_zero"] is False
    assert t2r.loc[(4, "villa - random_mapping")]["mean"] == pytest.approx(14 / 3)
    assert t2r.loc[(4, "oracle - villa")]["mean"] == pytest.approx(31 / 3)
    # paired, not unpaired: the seeds' own differences, whose std (1) is far below the groups' stds
    assert t2r.loc[(4, "villa - clip")]["std"] < np.std([40.0, 41.0, 45.0], ddof=1)
    # T=8: one seed and only villa/clip: one comparison, no interval
    assert t2r.loc[(8, "villa - clip")]["n"] == 1 and t2r.loc[(8, "villa - clip")]["mean"] == 10.0
    assert pd.isna(t2r.loc[(8, "villa - clip")]["excludes_zero"])
    assert (8, "oracle - villa") not in t2r.index
    assert "mapping_f1" not in set(diffs["metric"])
    ap = diffs[(diffs["metric"] == "detection_ap") & (diffs["comparison"] == "villa - clip")]
    assert ap["mean"].tolist() == [6.0]  # 30, 31, 32 - 25


def test_format_summary_and_banded_plot(tmp_path):
    results = _synthetic_results()
    text = format_summary(results)
    assert "52.0 [47.0, 57.0]" in text and "10.0 [7.5, 12.5] *" in text and "(n=1)" in text
    paths = write_results(tmp_path, results)
    written = pd.read_csv(paths["differences"])
    assert written["excludes_zero"].tolist()[0] in (True, "True")
    with Image.open(paths["plot"]) as image:
        assert image.size[0] > 600


def test_metrics_without_a_value_are_na_in_the_tables(tmp_path):
    # an evaluation whose AUROC is undefined (null) and a stage 1 whose F1 is undefined (no true pair)
    for seed in (23, 24):
        fake_run(tmp_path, 8, 7.5, 60.0 + seed, seed=seed)
    villa = tmp_path / "s23" / "c8" / METHOD_EXPERIMENTS["villa"] / "metrics.json"
    villa.write_text(json.dumps({**json.loads(villa.read_text()), "zero_shot_auroc": None}))
    mapping = tmp_path / "s23" / "c8" / "docmnist_stage1" / "mapping_metrics.json"
    mapping.write_text(json.dumps({"test": {"precision": None, "recall": None, "f1": None, "per_kind": {}}}))
    results = collect_results(tmp_path)
    first = results.iloc[0]
    assert math.isnan(first["zero_shot_auroc"]) and math.isnan(first["mapping_f1"])
    table = format_results(results)
    header, row = table.splitlines()[:2]
    cells = dict(zip(header.split(), row.split()))
    assert cells["zero_shot_auroc"] == "n/a" and cells["mapping_f1"] == "n/a" and "nan" not in table.lower()
    summary = summarize(results)
    auroc = summary[(summary["method"] == "villa") & (summary["metric"] == "zero_shot_auroc")]
    assert auroc["n"].tolist() == [1] and auroc["mean"].tolist() == [70.0]  # the seed with a value
    assert "nan" not in format_summary(results).lower()
    write_results(tmp_path, results)  # the tables and the plot cope with the gaps

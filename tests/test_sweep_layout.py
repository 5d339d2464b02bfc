"""The sweep's orchestration over seeds and methods, fast: real generation (tiny synthetic digits) and real
configs, with the preprocessing, training and evaluation steps replaced by stubs that record their calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_digit_pools

from villa.docmnist.complexity_sweep import METHODS, RESULT_COLUMNS, run_sweep
from villa.storage.errors import VillaError

SMALL = {"attribute_budget": 60, "val_attribute_budget": 24, "test_attribute_budget": 24, "device": "cpu"}


@pytest.fixture
def stages(monkeypatch):
    """Stub every slow step; returns the list of calls ``(step, task_name, seed, extra)``."""
    import villa.docmnist.mnist
    import villa.evaluation.run
    import villa.features.preprocess
    import villa.mapping.run
    import villa.vlm.run

    calls = []
    monkeypatch.setattr(
        villa.docmnist.mnist, "load_mnist_pools", lambda seed, root=None: synthetic_digit_pools(seed)
    )
    monkeypatch.setattr(
        villa.features.preprocess,
        "preprocess_dataset",
        lambda d, **kw: calls.append(("preprocess", Path(d).name, None, None)),
    )

    def stage1(cfg):
        calls.append(("stage1", cfg.task_name, cfg.seed, cfg.data_dir))
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        test = {"precision": 90.0, "recall": 80.0, "f1": 80.0 + cfg.seed % 10, "per_kind": {}}
        (Path(cfg.run_dir) / "mapping_metrics.json").write_text(json.dumps({"test": test}))

    def stage2(cfg):
        calls.append(("stage2", cfg.task_name, cfg.seed, (cfg.pairs, cfg.stage_1_ckpt_dir)))

    def evaluate(cfg):
        calls.append(("evaluate", cfg.task_name, cfg.seed, None))
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        value = 10.0 * (
            1 + list(METHODS).index(cfg.task_name.replace("docmnist_", "").replace("stage2", "villa"))
        )
        metrics = {"text_to_region_r_precision": value + cfg.seed % 10, "region_to_text_r_precision": 50.0,
                   "zero_shot_auroc": 70.0}  # fmt: skip
        (Path(cfg.run_dir) / "metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(villa.mapping.run, "run_stage1_from_config", stage1)
    monkeypatch.setattr(villa.vlm.run, "run_stage2_from_config", stage2)
    monkeypatch.setattr(villa.evaluation.run, "evaluate_from_config", evaluate)
    return calls


def test_seeds_and_methods_layout(tmp_path, stages, capsys):
    out = tmp_path / "sweep"
    results = run_sweep([4], out_dir=out, seeds=[23, 24], methods=["untrained", "oracle", "villa"], **SMALL)

    # one folder per seed and complexity, each with its own dataset (regenerated per seed)
    for seed in (23, 24):
        cell = out / f"s{seed}" / "c4"
        assert {p.name for p in cell.iterdir()} == {
            "dataset.json", "preprocessed.json", "step_times.csv", "docmnist_stage1", "docmnist_stage2",
            "docmnist_oracle", "docmnist_untrained",
        }  # fmt: skip
        record = json.loads((cell / "dataset.json").read_text())
        assert record["seed"] == seed and Path(record["dataset_dir"]).parent == out / "data" / f"s{seed}"
    datasets = [out / "data" / f"s{s}" for s in (23, 24)]
    first, second = (next(d.glob("docmnist_*")) / "annotations.feather" for d in datasets)
    assert first.read_bytes() != second.read_bytes(), "each seed generates its own data"

    trained = [(c[1], c[2], c[3]) for c in stages if c[0] == "stage2"]
    stage1_of = {s: str(out / f"s{s}" / "c4" / "docmnist_stage1") for s in (23, 24)}
    assert trained == [
        ("docmnist_stage2", 23, ("villa", stage1_of[23])),
        ("docmnist_oracle", 23, ("oracle", None)),
        ("docmnist_stage2", 24, ("villa", stage1_of[24])),
        ("docmnist_oracle", 24, ("oracle", None)),
    ]
    assert [c[2] for c in stages if c[0] == "stage1"] == [23, 24]
    printed = capsys.readouterr().out
    assert "[sweep 16/16] seed=24 T=4 untrained evaluate" in printed

    assert list(results.columns) == list(RESULT_COLUMNS)
    assert list(zip(results["seed"], results["method"])) == [
        (s, m) for s in (23, 24) for m in ("villa", "oracle", "untrained")
    ]
    assert results.loc[results["method"] == "oracle", "text_to_region_r_precision"].tolist() == [53.0, 54.0]
    assert results.loc[results["method"] == "villa", "mapping_f1"].tolist() == [83.0, 84.0]
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["n"] == 2).all()
    differences = pd.read_csv(out / "differences.csv")
    assert set(differences["comparison"]) == {"oracle - villa"}
    steps = pd.read_csv(out / "step_times.csv")
    assert list(steps.columns) == ["seed", "complexity", "step", "seconds"]
    assert steps.groupby("seed").size().to_dict() == {23: 8, 24: 8}

    # a method added later: only its own steps run (no stage 1 for clip), the rest is skipped
    stages.clear()
    results = run_sweep([4], out_dir=out, seeds=[24], methods=["clip", "untrained"], **SMALL)
    assert [(c[0], c[1]) for c in stages] == [("stage2", "docmnist_clip"), ("evaluate", "docmnist_clip")]
    assert (
        capsys.readouterr().out.count("already done, skipped") == 3
    )  # generate, preprocess, untrained evaluate
    assert len(results) == 7 and results[results["method"] == "clip"]["seed"].tolist() == [24]


def test_oracle_skipped_with_a_note_without_region_labels(tmp_path, stages, monkeypatch, capsys):
    from villa.datasets import Dataset

    monkeypatch.setattr(Dataset, "has_region_labels", property(lambda self: False))
    results = run_sweep([4], out_dir=tmp_path, seeds=[5], methods=["oracle", "clip"], **SMALL)
    printed = capsys.readouterr().out
    assert "has no region labels: oracle skipped" in printed
    assert "[sweep 4/4] seed=5 T=4 clip evaluate" in printed  # the count of steps left out the oracle's two
    assert results["method"].tolist() == ["clip"]
    assert not [c for c in stages if c[1] == "docmnist_oracle"]


def test_bad_methods_seeds_and_old_layout_are_refused(tmp_path, stages):
    with pytest.raises(
        VillaError, match="unknown method 'ViLLA' in methods: use any of villa, clip, all_regions"
    ):
        run_sweep([4], out_dir=tmp_path / "a", methods=["ViLLA"], **SMALL)
    with pytest.raises(VillaError, match="methods is empty"):
        run_sweep([4], out_dir=tmp_path / "a", methods=[], **SMALL)
    with pytest.raises(VillaError, match="seeds is empty"):
        run_sweep([4], out_dir=tmp_path / "a", seeds=[], **SMALL)
    with pytest.raises(VillaError, match="seeds must be whole numbers >= 0"):
        run_sweep([4], out_dir=tmp_path / "a", seeds=[-1], **SMALL)
    old = tmp_path / "old"
    (old / "c4").mkdir(parents=True)
    with pytest.raises(VillaError, match=r"single-seed layout \(c4 directly under it\): move them into"):
        run_sweep([4], out_dir=old, **SMALL)
    assert not stages


def test_seed_and_seeds_together_refused_by_the_command(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "villa.sweep", "seed=1", "seeds=[2]", f"out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        "error: give seeds=[...] or its single-seed shorthand seed=N, not both" in done.stdout + done.stderr
    )
    assert not (tmp_path / "sweep_settings.json").exists()

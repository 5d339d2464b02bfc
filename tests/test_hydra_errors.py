"""Hydra's own command-line errors read like ours: one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from villa.engine.hydra_app import check_command_line, register_resolvers
from villa.storage.errors import VillaError

STAGE1 = "experiment=docmnist_stage1"


@pytest.fixture(autouse=True)
def resolvers():
    register_resolvers()


@pytest.mark.parametrize(
    "argv,config,expected",
    [
        ([STAGE1, "epochs=3", "bogus_key=1"], "default", "unknown key 'bogus_key'; no similar key"),
        (
            [STAGE1, "mapping.epsilom=0.1"],
            "default",
            "unknown key 'mapping.epsilom'; nearest valid keys: mapping.epsilon, ",
        ),
        (
            ["experiment=docmnist_stage3"],
            "default",
            "unknown experiment 'docmnist_stage3'; available: docmnist_stage",
        ),
        ([STAGE1, "epochs=[1"], "default", "cannot parse override 'epochs=[1': "),
        ([STAGE1, "data_dir=???"], "default", "data_dir is required: add data_dir=<dataset folder>"),
        ([STAGE1, "epochs=${nope}"], "default", "cannot resolve epochs: Interpolation key 'nope' not found"),
        (
            ["stage2.batchsize=3"],
            "sweep",
            "unknown key 'stage2.batchsize'; nearest valid keys: stage2.batch_size",
        ),
        # multirun: the first job of the sweep is checked
        (["-m", STAGE1, "epochs=1,2", "mapping.epsilom=0.1,0.2"], "default", "+mapping.epsilom=0.1"),
        (
            ["--multirun", "complexities=[4],[16]", "stage1.epoch=3"],
            "sweep",
            "nearest valid keys: stage1.epochs",
        ),
    ],
    ids=[
        "unknown",
        "typo",
        "experiment",
        "syntax",
        "missing",
        "interpolation",
        "sweep",
        "multirun",
        "sweep-multirun",
    ],
)
def test_config_errors_are_one_line(argv, config, expected):
    with pytest.raises(VillaError) as info:
        check_command_line(argv, config)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "argv,config",
    [
        ([STAGE1, "epochs=3", "mapping.epsilon=0.3", "+early_stop=1", "hydra.job.chdir=false"], "default"),
        (["-m", STAGE1, "epochs=1,2"], "default"),
        (["-m", "complexities=[4],[16]"], "sweep"),
        (["--help"], "default"),
    ],
)
def test_valid_command_lines_pass(argv, config):
    check_command_line(argv, config)


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "villa.stage1", "epochs=3", "mapping.epsilom=0.1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: unknown key 'mapping.epsilom'; nearest valid keys: mapping.epsilon, mapping.weights, mapping "
        "(a new key needs a leading +: +mapping.epsilom=0.1)"
    ]
    assert done.stdout == ""
    assert not any(tmp_path.iterdir()), "nothing written"


def test_a_bad_setting_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from villa import evaluate

    run_dir = tmp_path / "runs" / "eval"
    argv = ["villa.evaluate", "experiment=docmnist_stage2", f"run_dir={run_dir}", "image_score=best"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown image_score 'best': use one of regions, whole"
    ]
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "command, argv, expected",
    [
        (
            "stage1",
            [STAGE1, "mapping.weights=first"],
            "mapping.weights must be one of best, last, got 'first'",
        ),
        ("stage1", [STAGE1, "mapping.epsilon=-1"], "mapping.epsilon must be >= 0, got -1"),
        ("stage1", [STAGE1, "mapping.epsilon=abc"], "mapping.epsilon must be >= 0, got abc"),
        ("evaluate", ["experiment=docmnist_stage2", "image_score=best"], "unknown image_score 'best'"),
        ("evaluate", ["experiment=docmnist_stage2", "detection.score=max"], "unknown detection.score 'max'"),
        (
            "evaluate",
            ["experiment=docmnist_stage2", "detection.nms_iou=2"],
            "detection.nms_iou must be in (0, 1]",
        ),
        ("stage2", ["experiment=docmnist_stage2", "pairs=regions"], "unknown pairs 'regions'"),
        ("stage2", [STAGE1], "is a 'stage1' experiment, but this command runs 'stage2'"),
        ("stage1", ["experiment=docmnist_stage2"], "is a 'stage2' experiment, but this command runs 'stage1'"),
        (
            "stage2",
            ["experiment=docmnist_stage2", "whole_image_pairs=split"],
            "unknown whole_image_pairs 'split': use one of pooled, separate",
        ),
    ],
)
def test_entry_points_check_their_settings_on_the_command_line(command, argv, expected):
    # values outside a setting's choices or range: the owner's one-line error, before Hydra makes a run folder
    import importlib

    check = importlib.import_module(f"villa.{command}").check
    with pytest.raises(VillaError) as info:
        check_command_line(argv, "default", check)
    assert expected in str(info.value) and "\n" not in str(info.value)
    check_command_line(argv, "default")  # not a config error: only the entry point's check refuses it

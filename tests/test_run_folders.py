"""Run folders come from the RESOLVED dataset folder, always directly inside ``checkpoint_dir``, one per dataset,
and stage 1, stage 2 and evaluation agree on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from villa.engine.hydra_app import RUNS_RECORD, claim_runs_folder, compose


def _dataset(path: Path) -> Path:
    """A folder standing for a dataset (the name resolver only needs it to exist)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _runs(data_dir, ckpt: Path, *extra: str) -> dict[str, Path]:
    """The run folders of stage 1, stage 2 (and the stage-1 run it reads), CLIP and the untrained tower."""
    common = [f"data_dir={data_dir}", f"checkpoint_dir={ckpt}", *extra]
    s1, s2 = compose(["experiment=stage1", *common]), compose(["experiment=stage2", *common])
    return {
        "stage1": Path(s1.run_dir),
        "stage2": Path(s2.run_dir),
        "stage2 reads": Path(s2.stage_1_ckpt_dir),
        "clip": Path(compose(["experiment=clip", *common]).run_dir),
        "untrained": Path(compose(["experiment=untrained", *common]).run_dir),
    }


def _check_layout(runs: dict[str, Path], ckpt: Path, name: str) -> None:
    assert runs["stage1"] == runs["stage2 reads"]
    for task, path in runs.items():
        task = "stage1" if task == "stage2 reads" else task
        assert path == ckpt / name / task, (task, path)
        assert path.resolve().is_relative_to(ckpt.resolve()), path


@pytest.mark.parametrize("relative", [".", ".."])
def test_dot_and_dotdot_name_the_folder_they_stand_for(relative, tmp_path, monkeypatch):
    """``data_dir=.`` and ``data_dir=..`` name the dataset folder they stand for, inside ``checkpoint_dir`` (not
    an empty name shared by every such dataset, nor a folder above ``checkpoint_dir``)."""
    data = _dataset(tmp_path / "work" / "my_photos")
    cwd = data if relative == "." else _dataset(data / "sub")
    monkeypatch.chdir(cwd)
    ckpt = tmp_path / "ckpt"
    _check_layout(_runs(relative, ckpt), ckpt, "my_photos")


def test_a_name_under_data_root_and_a_symbolic_link(tmp_path, monkeypatch):
    root = tmp_path / "data"
    data = _dataset(root / "birds")
    ckpt = tmp_path / "ckpt"
    monkeypatch.chdir(tmp_path)
    _check_layout(_runs("birds", ckpt, f"data_root={root}"), ckpt, "birds")
    (tmp_path / "link").symlink_to(data)
    _check_layout(_runs(tmp_path / "link", ckpt), ckpt, "birds")


def test_the_file_system_root_gets_a_hashed_name(tmp_path):
    ckpt = tmp_path / "ckpt"
    runs = _runs("/", ckpt)
    name = runs["stage1"].parent.name
    assert name.startswith("dataset-") and len(name) == len("dataset-") + 8
    _check_layout(runs, ckpt, name)


def test_two_datasets_of_one_name_get_two_folders(tmp_path):
    """The first dataset run claims ``checkpoint_dir/<name>`` (its resolved path recorded there); another
    dataset of the same folder name gets ``<name>-<hash of its path>``, for every stage alike."""
    ckpt = tmp_path / "ckpt"
    first, second = _dataset(tmp_path / "a" / "data"), _dataset(tmp_path / "b" / "data")
    runs = _runs(first, ckpt)
    _check_layout(runs, ckpt, "data")
    claim_runs_folder(compose(["experiment=stage1", f"data_dir={first}", f"checkpoint_dir={ckpt}"]))
    assert json.loads((ckpt / "data" / RUNS_RECORD).read_text()) == {"dataset_dir": str(first.resolve())}

    other = _runs(second, ckpt)
    name = other["stage1"].parent.name
    assert name.startswith("data-") and name != "data"
    _check_layout(other, ckpt, name)
    _check_layout(_runs(first, ckpt), ckpt, "data")  # the first keeps its folder
    claim_runs_folder(compose(["experiment=stage2", f"data_dir={second}", f"checkpoint_dir={ckpt}"]))
    assert _runs(second, ckpt) == other  # claiming does not move it


def test_presets_keep_their_folders(tmp_path):
    """The DocMNIST presets' run folders are named by task, as documented."""
    cfg = compose(["experiment=docmnist_stage2", f"checkpoint_dir={tmp_path}"])
    assert Path(cfg.run_dir) == tmp_path / "docmnist_stage2"
    assert Path(cfg.stage_1_ckpt_dir) == tmp_path / "docmnist_stage1"

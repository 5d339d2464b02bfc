"""Experiment trackers (logger=tensorboard|wandb|mlflow|many), env.json and curves.png, read back from the files
each tracker writes: a tiny stage-2 run of 2 epochs, resumed to 3, then evaluated into the same run folder."""

from __future__ import annotations

import functools
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from villa.storage.errors import VillaError

EPOCHS = [1, 2, 3]
TAGS = ["++tags.seed=23", "++tags.method=villa"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # W&B writes only under the run folder and never reaches for the network
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Stage 2 with logger=many through the Hydra adapters: 2 epochs, resumed to 3, then evaluation."""
    from test_stage2_e2e import _encoder, build_fixture

    from villa.engine.checkpoints import load_checkpoint
    from villa.engine.hydra_app import compose
    from villa.engine.tracking import read_run_ids
    from villa.engine.training import read_metrics
    from villa.evaluation.run import evaluate_from_config
    from villa.vlm.run import run_stage2_from_config

    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("tracked")
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(key, str(root / "wandb_home"))
        enc = _encoder()
        data_dir, stage1_dir, _ = build_fixture(root, enc.name, enc.dim)
        base = [
            "experiment=docmnist_stage2", f"data_dir={data_dir}", f"checkpoint_dir={root}",
            f"stage_1_ckpt_dir={stage1_dir}", "device=cpu", "batch_size=2", "progress=false",
            "checkpoint_every_s=0", "logger=many", *TAGS,
        ]  # fmt: skip
        run_dir = root / "docmnist_stage2"
        run_stage2_from_config(compose([*base, "epochs=2"]))
        first_ids = read_run_ids(run_dir)
        run_stage2_from_config(compose([*base, "epochs=3", "resume=true"]))
        resumed_ids = read_run_ids(run_dir)
        checkpoint_ids = load_checkpoint(run_dir / "last.pkl")["trackers"]
        metrics = evaluate_from_config(compose([*base, "epochs=3"]))
        yield {
            "run_dir": run_dir,
            "first_ids": first_ids,
            "resumed_ids": resumed_ids,
            "checkpoint_ids": checkpoint_ids,
            "eval_ids": read_run_ids(run_dir),
            "history": read_metrics(run_dir),
            "metrics": metrics,
        }


def _losses(tracked) -> tuple[list[float], list[float]]:
    history = tracked["history"]
    assert [row["epoch"] for row in history] == EPOCHS
    return [row["train_loss"] for row in history], [row["val_loss"] for row in history]


R_PRECISION = "test/text_to_region_r_precision"


def test_tensorboard_event_files_hold_every_epoch_and_the_final_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked["run_dir"] / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    train, val = _losses(tracked)
    for tag, expected in (("loss/train", train), ("loss/val", val)):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == EPOCHS
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)
    assert [s.step for s in events.Scalars("lr")] == EPOCHS
    assert [s.step for s in events.Scalars("time/epoch_s")] == EPOCHS
    (final,) = events.Scalars(R_PRECISION)
    assert final.value == pytest.approx(tracked["metrics"]["text_to_region_r_precision"], rel=1e-6)
    assert final.step == tracked["metrics"]["epoch"]
    assert "config" in " ".join(events.Tags()["tensors"])  # the run's config as text


def test_mlflow_file_store_holds_every_epoch_and_the_final_metrics(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked["run_dir"] / "mlruns").as_uri())
    run_id = tracked["eval_ids"]["mlflow"]
    train, val = _losses(tracked)
    for key, expected in (("loss/train", train), ("loss/val", val)):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == EPOCHS
        assert [m.value for m in history] == pytest.approx(expected, rel=1e-6)
    run = client.get_run(run_id)
    assert run.data.metrics[R_PRECISION] == pytest.approx(tracked["metrics"]["text_to_region_r_precision"])
    assert run.data.tags["seed"] == "23" and run.data.tags["method"] == "villa"
    assert run.data.params["epochs"] == "2" and run.data.params["optimizer.lr"] == "5e-05"
    assert run.info.status == "FINISHED"
    (experiment,) = [e for e in client.search_experiments() if e.name == "villa"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # resume and evaluation: the same run


def wandb_run_folders(run_dir: Path, run_id: str) -> list[Path]:
    """The offline W&B folders of run ``run_id``, oldest first. W&B names each ``offline-run-<date>_<time>-<id>``
    and, when two processes start within the same second, adds ``-1``, ``-2``... to the later ones."""
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for folder in (run_dir / "wandb").glob("offline-run-*"):
        match = pattern.fullmatch(folder.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), folder))
    return [folder for _, folder in sorted(found)]


def wandb_records(run_dir: Path, run_id: str):
    """Every record of the offline W&B runs ``run_id`` under ``run_dir/wandb``, in the order written: each
    ``offline-run-*/run-<id>.wandb`` is a LevelDB-style log (7-byte file header ``:W&B``, magic, version; 32 KiB
    blocks of records with a 7-byte header: CRC32, length, type full/first/middle/last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    for folder in wandb_run_folders(run_dir, run_id):
        path = folder / f"run-{run_id}.wandb"
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # (a block's tail too short for a header is zero padding)
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 2):
                pending = chunk
            else:
                pending += chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                yield record


def _items(items) -> dict:
    # (a key is either `key` or a path `nested_key`; "loss/train" is a one-element path)
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_every_epoch_and_the_final_metrics(tracked):
    run_dir, run_id = tracked["run_dir"], tracked["eval_ids"]["wandb"]
    rows, summary, tags, config = [], {}, set(), {}
    for record in wandb_records(run_dir, run_id):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            tags.update(record.run.tags)
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
    epochs = [row for row in rows if "loss/train" in row]
    assert [row["epoch"] for row in epochs] == EPOCHS
    train, val = _losses(tracked)
    assert [row["loss/train"] for row in epochs] == pytest.approx(train, rel=1e-6)
    assert [row["loss/val"] for row in epochs] == pytest.approx(val, rel=1e-6)
    assert summary[R_PRECISION] == pytest.approx(tracked["metrics"]["text_to_region_r_precision"])
    assert {"seed=23", "method=villa"} <= tags
    assert config["epochs"] == 2 and config["optimizer"]["lr"] == 5e-05


def test_resume_and_evaluation_continue_the_same_tracker_runs(tracked):
    ids = tracked["first_ids"]
    assert set(ids) == {"tensorboard", "wandb", "mlflow"}
    assert tracked["resumed_ids"] == ids and tracked["checkpoint_ids"] == ids and tracked["eval_ids"] == ids
    # W&B offline: one folder per process (train, resume, evaluate), all of the one run id
    assert len(list((tracked["run_dir"] / "wandb").glob("offline-run-*"))) == 3
    assert len(wandb_run_folders(tracked["run_dir"], ids["wandb"])) == 3


def test_env_json_records_versions_machine_code_and_command(tracked):
    from villa.engine.environment import read_environment

    env = read_environment(tracked["run_dir"])
    assert env["stage"] == "evaluate" and env["seed"] == 23 and env["world_size"] == 1
    assert [e["stage"] for e in env["earlier"]] == ["stage2", "stage2"]  # the first start, then the resume
    packages = env["packages"]
    assert packages["torch"] == torch.__version__.split("+")[0] or packages["torch"] == torch.__version__
    for name in ("torchvision", "open_clip_torch", "transformers"):
        assert isinstance(packages[name], str) and packages[name][0].isdigit()
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cuda"]["version"] == torch.version.cuda and "cudnn" in env["cuda"]
    assert env["device"]["type"] == "cpu" and env["device"]["name"] == env["cpu"]["model"]
    assert env["cpu"]["cores"] >= 1 and env["cpu"]["model"]
    assert env["command"][0] == sys.executable and env["command_line"]
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # (a source tree that is a git checkout)
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)


def test_git_state_outside_a_checkout_is_none(tmp_path):
    from villa.engine.environment import git_state

    assert git_state(tmp_path) is None


def test_curves_png_is_drawn_at_the_end_of_training(tracked):
    path = tracked["run_dir"] / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (900, 360)


def _hide(monkeypatch, *modules):
    import villa.engine.tracking as tracking

    real = tracking._installed
    monkeypatch.setattr(tracking, "_installed", lambda module: module not in modules and real(module))


def test_missing_tracker_package_is_one_line_and_exit_2_before_any_work(monkeypatch, tmp_path, capsys):
    from villa import stage2

    _hide(monkeypatch, "wandb")
    checkpoints = tmp_path / "checkpoints"
    argv = ["villa.stage2", "experiment=docmnist_stage2", f"data_dir={tmp_path}", f"checkpoint_dir={checkpoints}",
            "device=cpu", "logger=wandb"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        stage2.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: logger=wandb needs the wandb package: pip install -e .[wandb]\n"
    assert not checkpoints.exists()  # not even Hydra's run folder


def test_missing_tracker_package_refused_by_the_library_calls(monkeypatch, tmp_path):
    from villa.docmnist.complexity_sweep import run_sweep
    from villa.vlm.run import run_stage2

    _hide(monkeypatch, "mlflow", "tensorboard")
    with pytest.raises(
        VillaError, match=r"^logger=mlflow needs the mlflow package: pip install -e \.\[mlflow\]$"
    ):
        run_stage2(data_dir=tmp_path / "nowhere", run_dir=tmp_path / "run", logger={"mlflow": {}})
    assert not (tmp_path / "run").exists()
    with pytest.raises(
        VillaError, match=r"^logger=tensorboard,mlflow need .* pip install -e \.\[tensorboard,mlflow\]$"
    ):
        run_sweep([4], 100, tmp_path / "sweep", logger={"csv": {}, "tensorboard": {}, "mlflow": {}})
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(VillaError, match="unknown logger 'neptune'"):
        run_sweep([4], 100, tmp_path / "sweep", logger={"neptune": {}})


def test_only_global_rank_zero_logs(monkeypatch, tmp_path):
    from villa.engine.environment import write_environment
    from villa.engine.tracking import open_tracker

    monkeypatch.setenv("RANK", "1")
    tracker = open_tracker({"tensorboard": {}}, tmp_path / "run")
    tracker.log_metrics(1, {"loss/train": 1.0})
    tracker.close()
    assert write_environment(tmp_path / "run", "stage2", seed=1) is None
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_tracker_ids_resumes_into_a_new_run(tmp_path):
    """Checkpoints written before trackers existed hold no ``trackers`` entry: they still resume."""
    from test_training import Points, mse

    from villa.engine.checkpoints import load_checkpoint
    from villa.engine.tracking import open_tracker, read_run_ids
    from villa.engine.training import fit
    from villa.storage.io import save_torch

    def run(epochs, resume):
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 1)
        tracker = open_tracker({"mlflow": {}}, tmp_path)
        result = fit(model, Points(40, 1), Points(16, 2), mse, collate_fn=lambda b: b, batch_size=8, epochs=epochs,
                     optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1), run_dir=tmp_path,
                     device=torch.device("cpu"), resume=resume, progress=False, tracker=tracker)  # fmt: skip
        tracker.close()
        return result

    run(1, False)
    first = read_run_ids(tmp_path)["mlflow"]
    ckpt = load_checkpoint(tmp_path / "last.pkl")
    ckpt.pop("trackers")
    save_torch(tmp_path / "last.pkl", ckpt)
    result = run(2, True)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert read_run_ids(tmp_path)["mlflow"] != first
    assert load_checkpoint(tmp_path / "last.pkl")["trackers"] == read_run_ids(tmp_path)


def test_sweep_cells_log_to_one_store_with_seed_complexity_and_method_tags(tmp_path):
    from villa.docmnist.complexity_sweep import _stage_overrides, _tracker_overrides
    from villa.engine.hydra_app import compose
    from villa.engine.tracking import TrackerSettings, tracker_settings

    trackers = TrackerSettings.of(
        {"csv": {}, "mlflow": {"tracking_uri": None}, "wandb": {}}, {"who": "it's me"}
    )
    out_dir = tmp_path / "sweep out"
    overrides = _stage_overrides("docmnist_clip", tmp_path / "ds", out_dir / "s23" / "c4", {"seed": 23}, {})
    cell = {"seed": 23, "complexity": 4, "method": "clip"}
    cfg = compose(overrides + _tracker_overrides(trackers, out_dir, cell))
    settings = tracker_settings(cfg)
    assert set(settings.backends) == {"mlflow", "wandb"}
    assert settings.backends["mlflow"]["tracking_uri"] == (out_dir / "mlruns").resolve().as_uri()
    assert settings.backends["wandb"]["group"] == "sweep out"
    assert settings.tags == {"who": "it's me", "seed": "23", "complexity": "4", "method": "clip"}
    assert settings.run_name == "docmnist_clip who=it's me seed=23 complexity=4 method=clip"


@pytest.mark.parametrize("spec", ["auto", "cpu", None])
def test_env_json_resolves_a_device_spec_as_the_run_does(spec):
    """The sweep and the demo pass the configured spec ("auto" by default), not a resolved device."""
    from villa.engine.device import resolve_device
    from villa.engine.environment import cpu_model, environment

    record = environment("sweep", seed=1, device=spec)["device"]
    if spec is None:
        assert record is None
    else:
        assert record["type"] == resolve_device(spec).type
        if record["type"] == "cpu":
            assert record["name"] == cpu_model()


def test_env_json_refuses_an_unknown_device_in_one_line():
    from villa.engine.environment import environment
    from villa.storage.errors import VillaError

    with pytest.raises(VillaError, match="unknown device 'tpu'"):
        environment("sweep", device="tpu")

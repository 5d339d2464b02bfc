"""Every config composes and instantiates (a typo fails CI, not a user's run), as lightning-hydra-template does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from villa.engine.hydra_app import CONFIG_DIR, compose, implied_experiment

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose(
        [f"experiment={experiment}", f"data_dir={tmp_path / 'my_data'}", f"checkpoint_dir={tmp_path}"]
    )
    assert cfg.stage in ("stage1", "stage2", "evaluate") and cfg.task_name
    assert Path(cfg.run_dir).is_relative_to(tmp_path)
    if not experiment.startswith("docmnist_"):  # generic experiments keep each dataset's runs apart
        assert Path(cfg.run_dir).parent.name == "my_data"
    params = [torch.nn.Parameter(torch.zeros(2))]
    if cfg.get("optimizer") is not None:
        optimizer = instantiate(cfg.optimizer)(params)
        assert isinstance(optimizer, torch.optim.Optimizer)
        if cfg.get("scheduler") is not None:
            instantiate(cfg.scheduler)(optimizer)


def test_docmnist_presets_are_the_generic_experiments_on_docmnist():
    for preset, generic in (
        ("docmnist_stage1", "stage1"),
        ("docmnist_stage2", "stage2"),
        ("docmnist_clip", "clip"),
    ):
        a, b = compose([f"experiment={preset}"]), compose([f"experiment={generic}", "data_dir=x"])
        for key in ("epochs", "batch_size", "optimizer", "scheduler", "pairs", "model", "loss", "mapping"):
            assert a.get(key) == b.get(key), (preset, key)
        assert Path(a.data_dir).name == "docmnist_30000_15.2"


def test_sweep_config_composes():
    cfg = compose(config_name="sweep")
    assert list(cfg.complexities) and cfg.stage1.epochs > 0


def test_nested_stage_settings_of_the_sweep_change_one_key():
    """``+stage1.optimizer.lr=1e-3`` on the sweep's command line reaches stage 1 as ``optimizer.lr=0.001``: the
    optimiser keeps its target and other settings (a dict literal would not parse, or would replace the node)."""
    from omegaconf import OmegaConf

    from villa.docmnist.complexity_sweep import _stage_overrides

    sweep = compose(["+stage1.optimizer.lr=1e-3", "+stage2.optimizer.weight_decay=0.1"], config_name="sweep")
    for stage, experiment in (("stage1", "docmnist_stage1"), ("stage2", "docmnist_stage2")):
        extra = OmegaConf.to_container(sweep[stage])
        cfg = compose(_stage_overrides(experiment, Path("/d"), Path("/r"), {"seed": 1}, extra))
        default = compose([f"experiment={experiment}"])
        changed = {k for k in default.optimizer if cfg.optimizer[k] != default.optimizer[k]}
        assert changed == ({"lr"} if stage == "stage1" else {"weight_decay"}), stage
        assert cfg.epochs == sweep[stage].epochs


def test_the_experiment_a_command_line_implies():
    assert implied_experiment(["epochs=3"], "docmnist_stage1", "stage1") == "docmnist_stage1"
    assert implied_experiment(["data_dir=/x"], "docmnist_stage1", "stage1") == "stage1"
    assert implied_experiment(["experiment=clip", "data_dir=/x"], "docmnist_stage1", "stage1") is None


def _comparable(value):
    """A default made comparable: optimizer/scheduler partials as (class, keywords), lists as tuples."""
    import functools

    if isinstance(value, functools.partial):
        return value.func, {k: _comparable(v) for k, v in value.keywords.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    return value


#: arguments the adapters derive from paths and names, not defaults
_DERIVED = {"data_dir", "run_dir", "stage_1_ckpt_dir", "checkpoint", "out_path", "label", "config"}


@pytest.mark.parametrize(
    "module, function, adapter, experiment",
    [
        ("villa.mapping.run", "run_stage1", "run_stage1_from_config", "stage1"),
        ("villa.vlm.run", "run_stage2", "run_stage2_from_config", "stage2"),
        ("villa.evaluation.run", "evaluate_model", "evaluate_from_config", "stage2"),
    ],
)
def test_the_python_defaults_are_the_yaml_defaults(
    module, function, adapter, experiment, monkeypatch, tmp_path
):
    """A default is declared in the YAML (for the command line) and in the run function's signature (for the
    Python API); the adapter reads the YAML only. The two must not drift apart."""
    import importlib
    import inspect

    from villa.mapping.run import default_optimizer

    monkeypatch.setenv("PROJECT_DIR", str(tmp_path))  # (evaluation writes env.json into its run folder)

    mod = importlib.import_module(module)
    signature = inspect.signature(getattr(mod, function))
    passed: dict = {}
    monkeypatch.setattr(mod, function, lambda *args, **kwargs: passed.update(kwargs) or {})
    monkeypatch.setattr(mod, "format_metrics", lambda metrics: "", raising=False)
    getattr(mod, adapter)(compose([f"experiment={experiment}", "data_dir=some_data"]))
    assert passed, f"{adapter} passed no keyword arguments"
    compared = 0
    for name, value in passed.items():
        default = signature.parameters[name].default
        if name in _DERIVED or default is inspect.Parameter.empty:
            continue
        if name == "optimizer_factory" and default is None:  # run_stage1 builds default_optimizer() itself
            default = default_optimizer()
        if name == "logger":  # (settings named after the task: no tracker by default, as logger=None)
            assert default is None and not value.enabled, value
            continue
        assert _comparable(value) == _comparable(default), (
            f"{function}({name}=): YAML {value!r}, Python {default!r}"
        )
        compared += 1
    assert compared >= 8

"""Experiment trackers: TensorBoard, Weights & Biases and MLflow runs of villa's training and evaluation runs.

Chosen with Hydra's ``logger=`` group (``villa/configs/logger/``), whose composed node names the backends
and their settings, one key each (the lightning-hydra-template convention)::

    logger=csv           {csv: {}}: the run folder's own metrics.csv / metrics.json only (the default)
    logger=tensorboard   {tensorboard: {dir: tensorboard}}: event files in <run folder>/tensorboard
    logger=wandb         {wandb: {mode: offline, ...}}: an offline W&B run in <run folder>/wandb (wandb sync later)
    logger=mlflow        {mlflow: {tracking_uri: null, ...}}: a local MLflow file store, <run folder>/mlruns
    logger=many          all of them; or any list, e.g. logger=[tensorboard,mlflow]

``metrics.csv`` and ``metrics.json`` are always written; the trackers are optional extras
(``pip install -e .[tensorboard]``, ``[wandb]``, ``[mlflow]``), checked before any work starts
(:func:`check_installed`).

What a tracker run holds (:class:`Tracker`): the run's resolved config as parameters, the ``tags`` config
(key -> value; the sweep sets ``seed``, ``complexity`` and ``method``), per epoch ``loss/train``,
``loss/val``, ``lr``, ``time/epoch_s`` and ``time/data_s`` (step = epoch), and final figures:
``summary/best_epoch`` and ``summary/best_val_loss`` after training, stage 1's mapping precision / recall / F1
(``mapping/<split>/f1``), and evaluation's headline metrics (``<split>/<metric>``, e.g.
``test/text_to_region_r_precision``).

A run folder's tracker runs are recorded in ``<run folder>/trackers.json`` and in every checkpoint
(``trackers``): a resumed training run continues them, and evaluation into the run folder of the training run
(``python -m villa.evaluate`` with the stage's experiment) adds its metrics to them. Only global rank 0 logs.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from villa.storage.artifacts import one_line
from villa.storage.errors import VillaError
from villa.storage.io import write_json

#: the tracker backends, in the order they start
BACKENDS = ("tensorboard", "wandb", "mlflow")
#: the logger= names that only select the run folder's own files
FILE_LOGGERS = ("csv",)
#: backend -> (module it needs, setup.py extra that installs it)
REQUIREMENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
RUN_IDS_FILE = "trackers.json"
WANDB_MODES = ("offline", "online", "disabled")
#: per-epoch metric names (a :func:`villa.engine.training.fit` history row's key -> the tracker's name)
EPOCH_METRICS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "lr",
    "seconds": "time/epoch_s",
    "data_seconds": "time/data_s",
}


@dataclass(frozen=True)
class TrackerSettings:
    """Which trackers a run logs to, with their settings, and the tags and name of its tracker runs.

    ``backends``: backend name (:data:`BACKENDS`) -> its settings (the ``logger`` config node without
    ``csv``); ``tags``: key -> value, on every backend's run; ``name``: the run's name (the task name), shown
    with the tags (``docmnist_stage2 seed=23 complexity=4 method=villa``)."""

    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None

    @classmethod
    def of(cls, logger: Mapping | None = None, tags: Mapping | None = None, name: str | None = None):
        """Settings from a ``logger`` config node (a mapping of logger names to their settings, e.g.
        ``{"tensorboard": {"dir": "tensorboard"}}``; None or ``{"csv": {}}``: none). Raises a one-line
        :class:`VillaError` for an unknown logger name or a tracker whose package is not installed."""
        if isinstance(logger, TrackerSettings):
            return logger
        logger = _plain(logger) or {}
        if not isinstance(logger, dict):
            raise VillaError(
                f"logger must name loggers ({', '.join(FILE_LOGGERS + BACKENDS)}), got {logger!r}"
            )
        unknown = [name for name in logger if name not in BACKENDS + FILE_LOGGERS]
        if unknown:
            raise VillaError(
                f"unknown logger '{unknown[0]}': use any of {', '.join(FILE_LOGGERS + BACKENDS)} (or many)"
            )
        backends = {b: dict(logger[b] or {}) for b in BACKENDS if b in logger}
        check_installed(backends)
        mode = str((backends.get("wandb") or {}).get("mode") or "offline")
        if mode not in WANDB_MODES:
            raise VillaError(f"logger.wandb.mode must be {', '.join(WANDB_MODES)}; got '{mode}'")
        tags = {str(k): _tag_value(v) for k, v in (_plain(tags) or {}).items()}
        return cls(backends=backends, tags=tags, name=None if name is None else str(name))

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    @property
    def run_name(self) -> str:
        """The tracker runs' display name: the task name, then the tags as ``key=value``."""
        parts = [self.name or "villa"] + [f"{k}={v}" for k, v in self.tags.items()]
        return " ".join(parts)


def tracker_settings(cfg) -> TrackerSettings:
    """:class:`TrackerSettings` of a composed Hydra config (its ``logger``, ``tags`` and ``task_name`` keys)."""
    return TrackerSettings.of(cfg.get("logger"), cfg.get("tags"), cfg.get("task_name"))


def _plain(node):
    """A config node (OmegaConf or plain) as plain Python containers, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _tag_value(value) -> str:
    return "null" if value is None else str(value)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(logger: Mapping | None) -> None:
    """Raise one :class:`VillaError` line naming the extra to install when a tracker in ``logger`` (a logger
    config node or :attr:`TrackerSettings.backends`) has no package, e.g.
    ``logger=wandb needs the wandb package: pip install -e .[wandb]``."""
    names = [b for b in BACKENDS if logger is not None and b in logger]  # (keys only: nothing resolved)
    missing = [b for b in names if not _installed(REQUIREMENTS[b][0])]
    if not missing:
        return
    packages = [REQUIREMENTS[b][0] for b in missing]
    extras = ",".join(REQUIREMENTS[b][1] for b in missing)
    if len(missing) == 1:
        raise VillaError(f"logger={missing[0]} needs the {packages[0]} package: pip install -e .[{extras}]")
    raise VillaError(
        f"logger={','.join(missing)} need the {' and '.join(packages)} packages: pip install -e .[{extras}]"
    )


# --------------------------------------------------------------------------- flattening
def flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys: ``{"optimizer": {"lr": 1e-3}}`` -> ``{"optimizer.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalar_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict as ``prefix + dotted/key`` -> float (bools, strings,
    None and NaN left out)."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[prefix + key.replace(".", "/")] = float(value)
    return out


# --------------------------------------------------------------------------- backends
class Tracker:
    """What a tracker does; this base logs nothing (``logger=csv``).

    ``run_id``: the backend's id for the run (None before it starts); :meth:`log_params` the run's config
    (nested dicts allowed); :meth:`log_metrics` numbers at ``step`` (the epoch); :meth:`log_summary` final
    figures (at ``step``, default the last step logged); :meth:`close` ends the run (``failed``: as failed)."""

    name = "csv"
    run_id: str | None = None

    def log_params(self, params: Mapping) -> None:
        pass

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_summary(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class _TensorBoard(Tracker):
    """Event files in ``run_dir/<dir>`` (``torch.utils.tensorboard``). The run id is that folder, relative to
    the run folder; a continued run appends event files there. A resumed training run sets TensorBoard's
    purge step at its first epoch, so the epochs logged after the checkpoint it resumes from are dropped."""

    name = "tensorboard"

    def __init__(
        self, run_dir: Path, settings: Mapping, run_id: str | None, step: int | None, name: str, tags: dict
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = run_id or str(settings.get("dir") or "tensorboard")
        log_dir = run_dir / self.run_id
        # TensorBoard drops the folder's earlier events from the purge step on: all of them for a new run,
        # those after the checkpoint's epoch for a resumed training run
        purge = 0 if run_id is None else (None if step is None else step + 1)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
        self.tags, self.last_step = tags, step or 0

    def log_params(self, params: Mapping) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten(params)
        rows = "\n".join(
            f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in flat.items()
        )
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)
        # the HPARAMS tab: the tags first, then every scalar setting (its experiment is inferred from the runs)
        values = {**self.tags, **{k: v for k, v in flat.items() if k not in self.tags}}
        values = {
            k: v if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in values.items()
        }
        _, session_start, _ = hparams(values, {})
        self.writer.file_writer.add_summary(session_start, 0)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # (once an epoch: a run that dies keeps its epochs)
        self.last_step = step

    def log_summary(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metrics(self.last_step if step is None else step, metrics)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _WandB(Tracker):
    """A W&B run in ``run_dir/wandb`` (``offline`` by default: no network; ``wandb sync`` uploads it later).
    Metrics are logged against ``epoch`` (W&B's own step keeps counting, so a continued run never goes back);
    final figures go to the run's summary. Console capture is off."""

    name = "wandb"

    def __init__(
        self, run_dir: Path, settings: Mapping, run_id: str | None, step: int | None, name: str, tags: dict
    ):
        import wandb

        mode = str(settings.get("mode") or "offline")
        self.run = wandb.init(
            project=settings.get("project") or "villa",
            entity=settings.get("entity"),
            group=settings.get("group"),
            name=name,
            tags=[f"{k}={v}"[:64] for k, v in tags.items()],
            config={"tags": dict(tags)},
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(run_dir),
            mode=mode,
            reinit="create_new",
            # a loaded machine can take longer than wandb's 90 s default to start its service process
            settings=wandb.Settings(console="off", silent=True, init_timeout=300),
        )
        self.run_id = self.run.id
        self.run.define_metric("epoch")
        self.defined: set[str] = set()
        self.last_step = step or 0
        if mode == "offline":
            print(
                f"wandb: offline run {self.run_id} in {run_dir / 'wandb'} "
                f"(upload: wandb sync {run_dir / 'wandb'}/offline-run-*)"
            )

    def log_params(self, params: Mapping) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key in metrics:
            if key not in self.defined:
                self.run.define_metric(key, step_metric="epoch")
                self.defined.add(key)
        self.run.log({**metrics, "epoch": step})
        self.last_step = step

    def log_summary(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.summary.update({**metrics, "epoch": self.last_step if step is None else step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow(Tracker):
    """An MLflow run in experiment ``experiment_name`` of ``tracking_uri`` (None: a local file store,
    ``file:<run folder>/mlruns``). Params are logged once (a continued run adds only new keys: MLflow
    params cannot change); a continued run goes back to RUNNING until closed."""

    name = "mlflow"

    def __init__(
        self, run_dir: Path, settings: Mapping, run_id: str | None, step: int | None, name: str, tags: dict
    ):
        uri = settings.get("tracking_uri") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.last_step = uri, step or 0
        run = None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # another store, or the run was deleted: a new run
                print(f"note: mlflow run {run_id} is not in {uri}: starting a new run")
        if run is None:
            experiment = self._experiment(str(settings.get("experiment_name") or "villa"))
            run = self.client.create_run(
                experiment, run_name=name, tags={**tags, "villa.run_dir": str(run_dir)}
            )
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.params = dict(run.data.params)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created meanwhile by another process of a sweep
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        new = {k: str(v)[:500] for k, v in flatten(params).items() if k not in self.params}
        items = [Param(k, v) for k, v in new.items()]
        for start in range(0, len(items), 100):  # (MLflow takes at most 100 params a batch)
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.params.update(new)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)
        self.last_step = step

    def log_summary(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metrics(self.last_step if step is None else step, metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_BACKEND_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers(Tracker):
    """Every tracker of a run as one :class:`Tracker`, started on first use.

    :meth:`start` connects them: ``run_ids`` (backend -> id, e.g. from a checkpoint's ``trackers``)
    continues those runs, a backend without an id starts a new one; ``step``: the last epoch whose metrics
    stand (a resumed training run's checkpoint epoch: TensorBoard drops what a continued run logged after
    it); None (evaluation adding to a finished run) keeps everything. Any ``log_*`` call starts new runs if
    :meth:`start` was not called. :attr:`run_ids` is written to ``run_dir/trackers.json``.

    :meth:`close` ends the runs; runs still open when the process exits are closed as failed. Use as a
    context manager to close them (as failed when an exception leaves the block).
    """

    name = "trackers"

    def __init__(self, settings: TrackerSettings, run_dir: str | os.PathLike, params: Mapping | None = None):
        self.settings, self.run_dir = settings, Path(run_dir)
        self.params = params
        self.backends: list[Tracker] = []
        self.started = False

    @property
    def run_ids(self) -> dict[str, str]:
        return {t.name: t.run_id for t in self.backends if t.run_id is not None}

    def start(self, run_ids: Mapping[str, str] | None = None, step: int | None = None) -> Trackers:
        if self.started or not self.settings.enabled:
            self.started = True
            return self
        self.started = True
        run_ids = dict(run_ids or {})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self._close_at_exit)
        for name, settings in self.settings.backends.items():
            backend = _BACKEND_CLASSES[name](
                self.run_dir,
                settings,
                run_ids.get(name),
                step,
                self.settings.run_name,
                dict(self.settings.tags),
            )
            self.backends.append(backend)
            if self.params is not None and name not in run_ids:  # (a continued run has them)
                backend.log_params(self.params)
        write_json(self.run_dir / RUN_IDS_FILE, self.run_ids)
        return self

    def log_params(self, params: Mapping) -> None:
        self.start()
        for backend in self.backends:
            backend.log_params(params)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.start()
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for backend in self.backends:
            backend.log_metrics(step, metrics)

    def log_summary(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.start()
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for backend in self.backends:
            backend.log_summary(metrics, step)

    def close(self, failed: bool = False) -> None:
        """End every tracker run (each is tried; the first error is raised after all have been tried)."""
        error = None
        for backend in self.backends:
            try:
                backend.close(failed)
            except Exception as err:  # a tracker failing to close must not hide the others
                error = error or err
        self.backends = []
        atexit.unregister(self._close_at_exit)
        if error is not None and not failed:
            raise VillaError(f"closing the tracker runs failed: {one_line(error)}") from error

    def _close_at_exit(self) -> None:
        try:
            self.close(failed=True)
        except Exception:  # (the process is ending: nothing left to tell)
            pass

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_tracker(
    settings: TrackerSettings | Mapping | None,
    run_dir: str | os.PathLike,
    params: Mapping | None = None,
) -> Trackers:
    """The :class:`Trackers` of a run (not started yet: :meth:`Trackers.start`, or the first ``log_*``).

    ``settings``: :class:`TrackerSettings` or a ``logger`` config node; ``params``: the run's config, logged
    when a tracker starts a new run. On any process but global rank 0 (torchrun), trackers that log nothing.
    """
    from villa.engine import distributed

    settings = TrackerSettings.of(settings)
    if distributed.global_rank() != 0:
        settings = TrackerSettings()
    return Trackers(settings, run_dir, params)


def read_run_ids(run_dir: str | os.PathLike) -> dict[str, str]:
    """``run_dir/trackers.json``: backend -> the run id the run folder's trackers last used ({} if none)."""
    path = Path(run_dir) / RUN_IDS_FILE
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def epoch_metrics(row: Mapping) -> dict[str, float]:
    """A :func:`villa.engine.training.fit` history row as tracker metrics (:data:`EPOCH_METRICS`; None left out)."""
    return {name: row[key] for key, name in EPOCH_METRICS.items() if row.get(key) is not None}


def headline_metrics(metrics: Mapping) -> dict[str, float]:
    """An evaluation's ``metrics.json`` dict as tracker figures under ``<split>/``: its top-level numbers
    (R-Precision, precision@k, AUROC; counts and the epoch left out), detection ``ap`` / ``ap50``, and the
    stage-1 mapping's figures when present (:func:`mapping_figures`)."""
    prefix = f"{metrics.get('split', 'eval')}/"
    top = {
        k: v
        for k, v in metrics.items()
        if not isinstance(v, Mapping) and k != "epoch" and not k.startswith("num_")
    }
    out = scalar_metrics(top, prefix)
    detection = metrics.get("detection")
    if isinstance(detection, Mapping):
        out.update(scalar_metrics({k: detection.get(k) for k in ("ap", "ap50")}, prefix + "detection_"))
    out.update(mapping_figures(metrics.get("mapping") or {}))
    return out


def mapping_figures(metrics: Mapping) -> dict[str, float]:
    """Stage 1's ``mapping_metrics.json`` (``{split: {precision, recall, f1, per_kind}}``) as tracker figures:
    ``mapping/<split>/<precision|recall|f1>`` and ``mapping/<split>/<kind>_f1``."""
    out = {}
    for split, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        out.update(
            scalar_metrics({k: values.get(k) for k in ("precision", "recall", "f1")}, f"mapping/{split}/")
        )
        for kind, per in (values.get("per_kind") or {}).items():
            if isinstance(per, Mapping):
                out.update(scalar_metrics({f"{kind}_f1": per.get("f1")}, f"mapping/{split}/"))
    return out

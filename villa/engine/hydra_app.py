"""Hydra glue shared by every ``python -m villa.<entry>``: config location, resolvers, one-line errors."""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from villa.storage.errors import VillaError, run_entry
from villa.storage.paths import project_dir

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_resolvers() -> None:
    """``${villa_project_dir:}`` resolves to PROJECT_DIR (env, then .env, then the repo root);
    ``${villa_name:DATA_DIR}`` to the folder under ``checkpoint_dir`` that holds a dataset's runs
    (:func:`dataset_runs_name`, with the config's ``data_root`` and ``checkpoint_dir``)."""
    OmegaConf.register_new_resolver("villa_project_dir", lambda: str(project_dir()), replace=True)
    OmegaConf.register_new_resolver("villa_name", _villa_name, replace=True)


def _villa_name(data_dir, *, _root_) -> str:
    return dataset_runs_name(data_dir, _root_.get("data_root"), _root_.get("checkpoint_dir"))


#: the record, in ``checkpoint_dir/<name>/``, of the dataset whose runs that folder holds
RUNS_RECORD = "villa_dataset.json"


def _resolved_dataset(data_dir, data_root=None) -> Path:
    """The resolved dataset folder of ``data_dir`` (a path, or a name under ``data_root``); for one that does
    not exist (yet), its absolute path with ``..`` and symbolic links resolved as far as they go."""
    from villa.storage.paths import resolve_dataset_dir

    try:
        return resolve_dataset_dir(str(data_dir), None if data_root is None else str(data_root))
    except VillaError:
        return Path(str(data_dir)).expanduser().resolve()


def _runs_owner(folder: Path) -> str | None:
    """The dataset path recorded in ``folder/villa_dataset.json``, else the one a stage-1 mapping in
    ``folder/stage1`` records it was made from; None without either."""
    import json

    for path, key in ((folder / RUNS_RECORD, None), (folder / "stage1" / "mapping_metrics.json", "inputs")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            owner = (record.get(key) if key else record).get("dataset_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(owner, str):
            return owner
    return None


def dataset_runs_name(data_dir, data_root=None, checkpoint_dir=None) -> str:
    """The name of the folder under ``checkpoint_dir`` that holds the runs of the dataset ``data_dir`` (a path,
    or a name under ``data_root``), the same for every stage.

    The dataset's RESOLVED folder name (``data_dir=.`` or ``..`` name the folder they stand for), with
    ``-<8 hex digits of the sha256 of the resolved path>`` appended when that name is empty or not printable,
    or when ``checkpoint_dir/<name>`` already holds the runs of another dataset (its ``villa_dataset.json``,
    written by :func:`claim_runs_folder`, names another path). A single path component: the folder is always
    directly inside ``checkpoint_dir``.
    """
    import hashlib

    resolved = _resolved_dataset(data_dir, data_root)
    name = resolved.name
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    if not name or not name.isprintable() or name in (".", ".."):
        return f"dataset-{digest}"
    if checkpoint_dir is not None:
        owner = _runs_owner(Path(str(checkpoint_dir)) / name)
        if owner is not None and owner != str(resolved):
            return f"{name}-{digest}"
    return name


def claim_runs_folder(cfg: DictConfig) -> None:
    """Record the resolved dataset in ``checkpoint_dir/<name>/villa_dataset.json`` when the run folder lies in
    the dataset's runs folder (:func:`dataset_runs_name`), so another dataset of the same folder name gets its
    own folder. Called by the stage adapters before a run; a folder already recorded is left as it is."""
    from villa.storage.io import write_json

    data_dir, checkpoint_dir = cfg.get("data_dir"), cfg.get("checkpoint_dir")
    if data_dir is None or checkpoint_dir is None or cfg.get("run_dir") is None:
        return
    resolved = _resolved_dataset(data_dir, cfg.get("data_root"))
    if not resolved.is_dir():
        return  # (the stage refuses it in one line)
    folder = Path(str(checkpoint_dir)) / dataset_runs_name(data_dir, cfg.get("data_root"), checkpoint_dir)
    run_dir = Path(str(cfg.run_dir)).resolve()
    if folder.resolve() in run_dir.parents and _runs_owner(folder) is None:
        write_json(folder / RUNS_RECORD, {"dataset_dir": str(resolved)})


def hydra_main(
    default_experiment: str | None = None,
    config_name: str = "default",
    generic_experiment: str | None = None,
    check: Callable[[DictConfig], None] | None = None,
) -> Callable[[Callable[[DictConfig], object]], Callable]:
    """Decorate ``main(cfg)`` as a Hydra app on ``villa/configs/<config_name>.yaml``.

    When the command line names no experiment: ``generic_experiment`` if it gives ``data_dir=`` (a user's
    own dataset: ``python -m villa.stage1 data_dir=DATA_DIR`` runs the generic ``stage1``), else
    ``default_experiment`` (the DocMNIST preset, so the published ``python -m villa.stage1`` works).
    The command line is checked first (:func:`check_command_line`), so that Hydra's own errors (an unknown
    key, an unknown experiment, bad override syntax, a missing ``???`` value) read like ours: one line
    ``error: ...`` and exit code 2. A :class:`VillaError` raised inside does the same. ``check``: the entry
    point's test of its own settings, called with the composed config as part of that first check, so a bad value
    is refused before Hydra makes the run folder.
    """

    def decorate(func: Callable[[DictConfig], object]) -> Callable[[], None]:
        @functools.wraps(func)
        def entry() -> None:
            register_resolvers()
            chosen = implied_experiment(sys.argv[1:], default_experiment, generic_experiment)
            if chosen:
                sys.argv.append(f"experiment={chosen}")
            sys.argv.extend(_non_main_rank_overrides(sys.argv[1:]))
            run_entry(check_command_line, sys.argv[1:], config_name, check)

            def task(cfg: DictConfig) -> None:
                run_entry(_configure_threads, cfg)
                run_entry(func, cfg)

            import hydra

            hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()

        return entry

    return decorate


def _configure_threads(cfg: DictConfig) -> None:
    """Torch threads for this process, before any work: ``threads`` (auto: from the cores, torchrun's processes on
    this machine and ``num_workers``; :func:`villa.engine.device.configure_threads`)."""
    from villa.engine.device import configure_threads

    configure_threads(cfg.get("threads", "auto"), int(cfg.get("num_workers", 0) or 0))


def implied_experiment(argv: Sequence[str], default: str | None, generic: str | None) -> str | None:
    """The experiment a command line runs when it names none (None when it names one)."""
    keys = {a.split("=")[0].lstrip("+~") for a in argv}
    if "experiment" in keys:
        return None
    return generic if generic and "data_dir" in keys else default


def _non_main_rank_overrides(argv: Sequence[str]) -> list[str]:
    """Under torchrun, on every rank but global rank 0: Hydra writes nothing (no ``.hydra/`` copy of the
    config, no job log file, no run folder), since only rank 0 writes a run's files. Its logging goes to
    stdout. Keys the command line sets itself are left alone; a multirun is not touched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return []
    if any(a in ("-m", "--multirun") for a in argv):
        return []
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    # the run folder becomes the working directory, which exists: Hydra's mkdir of it creates nothing
    wanted = {"hydra.output_subdir": "null", "hydra/job_logging": "stdout", "hydra.run.dir": "."}
    return [f"{key}={value}" for key, value in wanted.items() if key not in given]


def compose(overrides: Sequence[str] = (), config_name: str = "default") -> DictConfig:
    """Compose the config as the command line would (for tests, notebooks and the sweep)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


#: Hydra flags after which the pre-check stands aside (help, shell completion, other config sources)
_UNCHECKED_FLAGS = ("help", "hydra_help", "version", "shell_completion", "info", "experimental_rerun")
#: what to write for a missing mandatory (``???``) value, by key
_MISSING_HINTS = {
    "data_dir": "<dataset folder>",
    "checkpoint_dir": "<folder>",
    "task_name": "<run name>",
    "model": "<run or export folder>",
    "images": "<file, folder or glob>",
    "queries": '\'["a red star","two half moons"]\'',
    "out": "<folder>",
    "run_dir": "<stage-2 run folder>",
}


def check_command_line(
    argv: Sequence[str], config_name: str = "default", check: Callable[[DictConfig], None] | None = None
) -> None:
    """Compose the config that ``argv`` (a Hydra command line) asks for and raise a one-line
    :class:`VillaError` for what Hydra or OmegaConf would refuse: an unknown key (naming the nearest valid
    keys), an unknown config-group option such as an experiment, bad override syntax, a ``???`` value
    left unset. With ``-m/--multirun`` the first job of the sweep is checked. ``check``: the entry point's
    own test of the composed config (values outside a setting's choices), run here so that Hydra makes no run
    folder for a command that would stop at once.
    """
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:  # a bad flag: Hydra's run reports it
        return
    if any(getattr(args, flag, None) for flag in _UNCHECKED_FLAGS) or (
        args.config_path or args.config_dir or args.config_name
    ):
        return
    overrides = list(args.overrides)
    try:
        if args.multirun:
            overrides = _first_job(overrides)
        cfg = compose(overrides, config_name)
    except Exception as err:  # Hydra's and OmegaConf's errors have no common base but Exception
        if not _is_config_error(err):
            raise
        raise VillaError(_one_line(err, overrides, config_name)) from None
    # not OmegaConf.missing_keys: it resolves interpolations, and run_dir=${checkpoint_dir}/${task_name}
    # would then fail on task_name rather than name it
    container = OmegaConf.to_container(cfg, resolve=False)
    missing = sorted(key for key, value in _dotted_items(container) if value == "???")
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        values = " ".join(f"{key}={_MISSING_HINTS.get(key, '<value>')}" for key in missing)
        raise VillaError(f"{', '.join(missing)} {verb} required: add {values}")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:
        if not _is_config_error(err) or "hydra" in str(err):  # ${hydra:...} resolves only in Hydra's run
            raise
        key = getattr(err, "full_key", None)
        message = str(err).strip().splitlines()[0]
        raise VillaError(f"cannot resolve {key}: {message}" if key else message) from None
    from villa.engine.tracking import check_installed

    check_installed(cfg.get("logger"))  # (before Hydra makes the run folder)
    if check is not None:
        check(cfg)  # the entry point's own settings


def _is_config_error(err: Exception) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, HydraException | OmegaConfBaseException)


def _first_job(overrides: list[str]) -> list[str]:
    """The overrides of a multirun's first job (``a=1,2 b=x,y`` -> ``a=1 b=x``), as Hydra's sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batches[0][0] if batches and batches[0] else overrides


def _one_line(err: Exception, overrides: list[str], config_name: str) -> str:
    """Hydra's multi-line message for ``err`` as one line that names the culprit and what would be valid."""
    text = str(err).strip()
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        nearest = difflib.get_close_matches(key, _valid_keys(overrides, key, config_name), n=3, cutoff=0.5)
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key and "=" in o), "...")
        near = (
            f"; nearest valid keys: {', '.join(nearest)}"
            if nearest
            else "; no similar key (all keys: --cfg job)"
        )
        return f"unknown key '{key}'{near} (a new key needs a leading +: +{key}={value})"
    option = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if option:
        group, name = option.groups()
        choices = re.findall(r"^\t(\S+)$", text.split("Config search path:")[0], flags=re.M)
        nearest = difflib.get_close_matches(name, choices, n=len(choices), cutoff=0.0)
        what = "experiment" if group == "experiment" else f"{group} option"
        return f"unknown {what} '{name}'; available: {', '.join(nearest) or 'none'}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "hydra.cc/docs" not in line]
    if isinstance(err, _override_parse_error()):
        bad = next((o for o in overrides if _unparsable(o)), None)
        prefix = f"cannot parse override '{bad}'" if bad else "cannot parse the overrides"
        return f"{prefix}: {'; '.join(lines)}"
    return "; ".join(lines) or type(err).__name__


def _override_parse_error() -> type:
    from hydra.errors import OverrideParseException

    return OverrideParseException


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
    except Exception:
        return True
    return False


def _valid_keys(overrides: list[str], bad: str, config_name: str) -> list[str]:
    """Every dotted key of the config composed without the offending override(s)."""

    def key_of(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    for attempt in (
        [o for o in overrides if key_of(o) != bad],
        [o for o in overrides if "/" in key_of(o) or key_of(o) == "experiment"],
        [],
    ):
        try:
            cfg = compose(attempt, config_name)
        except Exception as err:
            if not _is_config_error(err):
                raise
            continue
        return [key for key, _ in _dotted_items(OmegaConf.to_container(cfg, resolve=False))]
    return []


def _dotted_items(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted key, value)`` for every key of a nested dict, parents before their children."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}", value
            yield from _dotted_items(value, f"{prefix}{key}.")


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain-dict copy of a config (stored in checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def require_stage(cfg: DictConfig, stage: str) -> None:
    """Refuse an experiment meant for another entry point."""
    if cfg.get("stage") != stage:
        raise VillaError(
            f"experiment '{cfg.get('task_name')}' is a '{cfg.get('stage')}' experiment, but this command runs '{stage}'"
        )


def training_arguments(cfg: DictConfig) -> dict:
    """The keyword arguments that every training stage's run function (``run_stage1``, ``run_stage2``) takes
    from a composed config, read as declared (``configs/default.yaml`` and the stage's experiment file); the
    stage adapters add their own keys."""
    from hydra.utils import instantiate

    from villa.engine.tracking import tracker_settings

    return {
        "device": cfg.device,
        "seed": int(cfg.seed),
        "epochs": int(cfg.epochs),
        "batch_size": int(cfg.batch_size),
        "optimizer_factory": instantiate(cfg.optimizer),
        "scheduler_factory": instantiate(cfg.scheduler) if cfg.scheduler is not None else None,
        "early_stopping_patience": cfg.early_stopping_patience,
        "amp": bool(cfg.amp),
        "compile": bool(cfg.compile),
        "resume": bool(cfg.resume),
        "num_workers": int(cfg.num_workers),
        "pin_memory": bool(cfg.pin_memory),
        "progress": bool(cfg.progress),
        "cpu_keep_freed_memory": cfg.cpu_keep_freed_memory,
        "checkpoint_every_s": float(cfg.checkpoint_every_s),
        "config": to_container(cfg),
        "logger": tracker_settings(cfg),  # (a missing tracker package: refused before any work)
    }

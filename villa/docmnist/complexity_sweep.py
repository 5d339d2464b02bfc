"""The paper's DocMNIST experiment: retrieval quality of ViLLA, its baselines and ablations against the
training data's average image-text sample complexity, over several seeds.

For every seed and target complexity the sweep runs generate -> preprocess -> stage 1 -> stage 2 of each
trained method -> evaluation of every method, under ``out_dir/s<seed>/c<T>/``. The methods
(:data:`METHODS`): ``villa``, the ``clip`` baseline, the ablations ``all_regions`` (every region with the whole
text), ``random_mapping`` (stage 1's pairs at random regions) and ``oracle`` (the ground-truth pairs: the
ceiling of a perfect stage 1), and the ``untrained`` tower. A seed regenerates the data (into
``data_root/s<seed>/``) and seeds every stage.

Each finished step leaves a marker (its output file), so a rerun skips it and a killed sweep resumes;
interrupted training resumes from ``last.pkl``. The tables gather every cell finished under ``out_dir``, so
Hydra multirun jobs, or concurrent processes over different seeds or complexities, that share ``out_dir`` add up
to one set of tables; a final plain run collects them all:

``results.csv``     one row per seed, complexity and method (:data:`RESULT_COLUMNS`)
``summary.csv``     per complexity, method and metric: n seeds, mean, std, 95% Student-t interval
``differences.csv`` per complexity and comparison (:data:`COMPARISONS`, paired by seed: the seeds share the
                    data), per metric: n, mean difference, std, 95% t-interval, whether it excludes 0
``results.png``     R-Precision against average complexity: mean lines with 95% interval bands
``env.json``        what ran the sweep (:mod:`villa.engine.environment`); every stage's run folder has its own

With trackers (``logger=tensorboard``, ``wandb``, ``mlflow`` or ``many``), each cell of a seed, complexity
and method is one tracker run (stage 2's epochs and its evaluation; stage 1 is a run of its own, method
``stage1``) tagged ``seed``, ``complexity`` and ``method``; MLflow runs share one file store,
``out_dir/mlruns``, W&B runs one group, the out_dir's name, and ``tensorboard --logdir out_dir`` shows them all.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from villa.evaluation.report import NA, fmt
from villa.storage.artifacts import damaged, file_sha256, one_line, read_json
from villa.storage.errors import VillaError
from villa.storage.io import atomic_path, write_json

DEFAULT_SEED = 23
#: every method of the sweep, in table order
METHODS = ("villa", "clip", "all_regions", "random_mapping", "oracle", "untrained")
METHOD_EXPERIMENTS = {method: f"docmnist_{method}" for method in METHODS} | {"villa": "docmnist_stage2"}
#: methods that train a stage-2 model (the untrained tower is only evaluated)
TRAINED_METHODS = tuple(m for m in METHODS if m != "untrained")
#: methods built from stage 1's mapping (stage 1 runs when one of them is asked for)
STAGE1_METHODS = ("villa", "random_mapping")
#: metric columns of ``results.csv``; ``detection_*`` is None without labelled boxes, ``mapping_f1`` is villa's
METRICS = (
    "text_to_region_r_precision",
    "region_to_text_r_precision",
    "zero_shot_auroc",
    "detection_ap",
    "detection_ap50",
    "mapping_f1",
)
RESULT_COLUMNS = ("seed", "target_sample_complexity", "avg_sample_complexity", "method", *METRICS)
#: (a, b) pairs reported as a - b in ``differences.csv``
COMPARISONS = (("villa", "clip"), ("villa", "all_regions"), ("villa", "random_mapping"), ("oracle", "villa"))
INTERVAL_COLUMNS = ("n", "mean", "std", "ci95_low", "ci95_high")
SUMMARY_COLUMNS = ("target_sample_complexity", "avg_sample_complexity", "method", "metric", *INTERVAL_COLUMNS)
DIFFERENCE_COLUMNS = (
    "target_sample_complexity",
    "avg_sample_complexity",
    "comparison",
    "metric",
    *INTERVAL_COLUMNS,
    "excludes_zero",
)
STEP_COLUMNS = ("seed", "complexity", "step", "seconds")
STEP_TIMES_FILE = "step_times.csv"
TRAINED_MARKER = "sweep_trained.json"
SETTINGS_FILE = "sweep_settings.json"
RESULTS_FILE, SUMMARY_FILE, DIFFERENCES_FILE, PLOT_FILE = (
    "results.csv",
    "summary.csv",
    "differences.csv",
    "results.png",
)

# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (scipy.stats.t.ppf; torch's StudentT has no icdf)
_T975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
    2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
    2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
    2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the 95% two-sided multiplier).

    A table for df <= 30; beyond, the Cornish-Fisher expansion around the normal quantile (error < 1e-6).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def t_interval(values: Sequence[float]) -> dict:
    """``{n, mean, std, ci95_low, ci95_high}`` of ``values`` (NaNs dropped): sample std (ddof 1) and the
    95% Student-t interval of the mean, mean -+ t(0.975, n-1) * std / sqrt(n). With one value: std and
    interval NaN (undefined); with none: everything NaN and n 0."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan, "std": math.nan}
    out["ci95_low"] = out["ci95_high"] = math.nan
    if n >= 2:
        std = float(x.std(ddof=1))
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        out.update(std=std, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


# --------------------------------------------------------------------------- layout and step times
def cell_dir(out_dir: str | Path, seed: int, complexity: int) -> Path:
    """The folder of one seed and complexity: ``out_dir/s<seed>/c<T>``."""
    return Path(out_dir) / f"s{int(seed)}" / f"c{int(complexity)}"


def _cells(out_dir: Path, must_hold: str) -> list[tuple[int, int, Path]]:
    """``(seed, complexity, out_dir/s<seed>/c<T>/<must_hold>)`` for each such file, by complexity then seed."""
    found = []
    for path in out_dir.glob(f"s*/c*/{must_hold}"):
        seed_name, cell_name = path.parent.parent.name, path.parent.name
        if seed_name[1:].isdigit() and cell_name[1:].isdigit():
            found.append((int(seed_name[1:]), int(cell_name[1:]), path))
    return sorted(found, key=lambda item: (item[1], item[0]))


def _check_layout(out_dir: Path) -> None:
    """Refuse an ``out_dir`` of the single-seed layout (``c<T>/`` directly under it): its runs would be
    invisible to the tables, and its settings name a ``seed``."""
    old = sorted(p.name for p in out_dir.glob("c*") if p.is_dir() and p.name[1:].isdigit())
    if old:
        raise VillaError(
            f"{out_dir} holds a sweep of the single-seed layout ({', '.join(old)} directly under it): move them "
            f"into {out_dir}/s<seed>/ (its seed: 'seed' in {SETTINGS_FILE}, 23 by default) and delete "
            f"{SETTINGS_FILE}, or choose another out_dir"
        )


class _Steps:
    """Prints progress per step and records each step's wall time in ``out_dir/s<seed>/c<T>/step_times.csv``.

    Per seed and complexity, so that processes sweeping different cells into one ``out_dir`` at the same
    time never rewrite each other's rows; :func:`write_step_times` gathers them into ``out_dir``.
    """

    def __init__(self, out_dir: Path, total: int):
        self.out_dir, self.total, self.done = out_dir, total, 0

    def run(self, seed: int, complexity: int, name: str, finished: bool, action):
        self.done += 1
        prefix = f"[sweep {self.done}/{self.total}] seed={seed} T={complexity} {name}"
        if finished:
            print(f"{prefix}: already done, skipped", flush=True)
            return None
        print(f"{prefix} ...", flush=True)
        started = time.perf_counter()
        out = action()
        seconds = round(time.perf_counter() - started, 1)
        print(f"{prefix}: done in {seconds:.1f}s", flush=True)
        path = cell_dir(self.out_dir, seed, complexity) / STEP_TIMES_FILE
        rows = _read_step_times(path, self.out_dir).to_dict("records") if path.is_file() else []
        rows = [r for r in rows if r["step"] != name]
        rows.append({"seed": seed, "complexity": complexity, "step": name, "seconds": seconds})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pd.DataFrame(rows, columns=list(STEP_COLUMNS)).to_csv(tmp, index=False)
        return out


def write_step_times(out_dir: str | Path) -> Path:
    """Gather every ``s<seed>/c<T>/step_times.csv`` under ``out_dir`` into ``out_dir/step_times.csv``
    (columns ``seed, complexity, step, seconds``, by seed, complexity, then step order)."""
    out_dir = Path(out_dir)
    cells = sorted(_cells(out_dir, STEP_TIMES_FILE), key=lambda item: (item[0], item[1]))
    parts = [_read_step_times(path, out_dir) for _, _, path in cells]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(STEP_COLUMNS))
    with atomic_path(out_dir / STEP_TIMES_FILE) as tmp:
        table.to_csv(tmp, index=False)
    return out_dir / STEP_TIMES_FILE


def _read_step_times(path: Path, out_dir: Path) -> pd.DataFrame:
    """One cell's ``step_times.csv`` (``seed, complexity, step, seconds``); one line if damaged."""
    fix = f"delete it (it only records step times) and re-run python -m villa.sweep out_dir={out_dir}"
    try:
        table = pd.read_csv(path)
    except Exception as err:  # empty, binary or cut mid-quote
        raise damaged(path, out_dir, f"is not a readable CSV table ({one_line(err)})", fix) from None
    if list(table.columns) != list(STEP_COLUMNS) or table[list(STEP_COLUMNS)].isna().any().any():
        raise damaged(path, out_dir, f"is damaged (expected complete rows of {', '.join(STEP_COLUMNS)})", fix)
    return table


def _stage_overrides(
    experiment: str, dataset_dir: Path, run_root: Path, common: dict, extra: dict
) -> list[str]:
    values = {
        "experiment": experiment,
        "data_dir": str(dataset_dir),
        "checkpoint_dir": str(run_root),
        "resume": True,
        **common,
        **extra,
    }
    return [f"{key}={'null' if value is None else value}" for key, value in _dotted_keys(values).items()]


def _tracker_overrides(trackers, out_dir: Path, cell: dict) -> list[str]:
    """A stage's overrides for the sweep's trackers (:class:`villa.engine.tracking.TrackerSettings`): the same
    loggers and settings, MLflow's file store ``out_dir/mlruns`` and W&B's group the out_dir's name unless
    given, and the tags with the cell's ``seed``, ``complexity`` and ``method``."""
    out = [f"logger=[{','.join(['csv', *trackers.backends])}]"]
    for backend, settings in trackers.backends.items():
        settings = dict(settings)
        if backend == "mlflow" and not settings.get("tracking_uri"):
            settings["tracking_uri"] = (out_dir / "mlruns").resolve().as_uri()
        if backend == "wandb" and not settings.get("group"):
            settings["group"] = out_dir.resolve().name
        out += [f"logger.{backend}.{key}={_override_value(value)}" for key, value in settings.items()]
    tags = {**trackers.tags, **cell}
    return out + [f"++tags.{key}={_override_value(value)}" for key, value in tags.items()]


def _override_value(value) -> str:
    """``value`` as a Hydra override value: null, a number or boolean as is, any string quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _dotted_keys(values: dict) -> dict:
    """Nested settings as Hydra's dotted keys (``{"optimizer": {"lr": 1e-3}}`` -> ``{"optimizer.lr": 1e-3}``), so
    that ``+stage1.optimizer.lr=1e-3`` on the sweep's command line changes one key of the stage's optimiser
    instead of replacing the whole node (Hydra's override grammar has no dict literal)."""
    from villa.engine.tracking import flatten

    return flatten(values)


def _distinct_ints(values: Sequence, what: str, minimum: int) -> list[int]:
    """``values`` as ints in their order, duplicates dropped; one line if empty or not whole numbers."""
    out = []
    for value in values:
        if isinstance(value, bool) or not float(value).is_integer() or int(value) < minimum:
            raise VillaError(f"{what} must be whole numbers >= {minimum}, got {value!r}")
        if int(value) not in out:
            out.append(int(value))
    if not out:
        raise VillaError(f"{what} is empty: give at least one")
    return out


def check_methods(methods: Sequence[str]) -> list[str]:
    """The sweep's methods asked for, in :data:`METHODS` order; one line for an unknown name or none."""
    methods = [str(m) for m in methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise VillaError(f"unknown method '{unknown[0]}' in methods: use any of {', '.join(METHODS)}")
    if not methods:
        raise VillaError(f"methods is empty: give at least one of {', '.join(METHODS)}")
    return [m for m in METHODS if m in methods]


def run_sweep(
    complexities: Sequence[int],
    attribute_budget: int,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (DEFAULT_SEED,),
    methods: Sequence[str] = METHODS,
    val_attribute_budget: int = 10000,
    test_attribute_budget: int = 10000,
    data_root: str | Path | None = None,
    encoder: str = "default",
    clip_weights: str | None = None,
    device: str = "auto",
    stage1: dict | None = None,
    stage2: dict | None = None,
    progress: bool = True,
    logger: dict | None = None,
    tags: dict | None = None,
) -> pd.DataFrame:
    """Run (or resume) the sweep over ``seeds`` x ``complexities`` for ``methods`` and return the results
    table of every cell finished under ``out_dir`` (the tables and the plot are written there too).
    ``logger``: the trackers of every stage (a ``logger`` config node, e.g. ``{"tensorboard": {}}``), their
    runs tagged with ``tags`` and each cell's seed, complexity and method."""
    from villa.datasets import Dataset
    from villa.engine.environment import write_environment
    from villa.engine.hydra_app import compose
    from villa.engine.tracking import TrackerSettings
    from villa.evaluation.run import evaluate_from_config
    from villa.features.preprocess import preprocess_dataset
    from villa.mapping.run import run_stage1_from_config
    from villa.vlm.run import run_stage2_from_config

    complexities = _distinct_ints(complexities, "complexities", 1)
    seeds = _distinct_ints(seeds, "seeds", 0)
    methods = check_methods(methods)
    trackers = TrackerSettings.of(logger, tags)  # (a missing tracker package: refused before any work)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_layout(out_dir)
    data_root = Path(data_root) if data_root is not None else out_dir / "data"
    stage1, stage2 = dict(stage1 or {}), dict(stage2 or {})
    # seeds, complexities and methods are not settings: adding them to an out_dir is how a sweep grows
    _check_settings(
        out_dir,
        {
            "attribute_budget": attribute_budget,
            "val_attribute_budget": val_attribute_budget,
            "test_attribute_budget": test_attribute_budget,
            "encoder": encoder,
            "clip_weights": clip_weights,
            "stage1": stage1,
            "stage2": stage2,
        },
    )
    needs_stage1 = any(m in STAGE1_METHODS for m in methods)
    trained = [m for m in methods if m in TRAINED_METHODS]
    per_cell = 2 + int(needs_stage1) + len(trained) + len(methods)
    steps = _Steps(out_dir, total=per_cell * len(seeds) * len(complexities))
    # the current seed's MNIST digit pools, loaded by its first generate step
    digit_pools: dict[int, dict] = {}
    write_environment(out_dir, "sweep", seed=seeds[0] if len(seeds) == 1 else seeds, device=device)

    for seed in seeds:
        common = {
            "seed": seed,
            "device": device,
            "encoder": encoder,
            "clip_weights": clip_weights,
            "progress": progress,
        }
        seed_data_root = data_root / f"s{seed}"  # dataset names carry budget and complexity, not the seed
        for complexity in complexities:
            run_root = cell_dir(out_dir, seed, complexity)
            record_path = run_root / "dataset.json"

            def generate(seed=seed, complexity=complexity, record_path=record_path, root=seed_data_root):
                from villa.docmnist.mnist import load_mnist_pools

                if seed not in digit_pools:  # from data_root's MNIST (torchvision files or cache)
                    digit_pools.clear()  # one seed's pools at a time (~55 MB each)
                    digit_pools[seed] = load_mnist_pools(seed, data_root)
                result = generate_shared(
                    root,
                    digit_pools=digit_pools[seed],
                    attribute_budget=attribute_budget,
                    target_sample_complexity=complexity,
                    seed=seed,
                    val_attribute_budget=val_attribute_budget,
                    test_attribute_budget=test_attribute_budget,
                    progress=progress,
                )
                record = {
                    "dataset_dir": str(result.dataset_dir),
                    "seed": seed,
                    "avg_train_complexity": result.average_complexity["train"],
                    "split_sizes": result.split_sizes,
                    "average_complexity": result.average_complexity,
                }
                write_json(record_path, record)

            steps.run(seed, complexity, "generate", record_path.is_file(), generate)
            record = _read_marker(record_path, out_dir, ("dataset_dir",))
            dataset_dir = Path(record["dataset_dir"])
            if not dataset_dir.is_dir():
                raise VillaError(
                    f"{record_path} names {dataset_dir}, which is gone: delete {record_path} and rerun"
                )

            preprocessed = run_root / "preprocessed.json"

            def preprocess(dataset_dir=dataset_dir, marker=preprocessed):
                # two complexities can share one dataset: embedding it again would change the embeddings
                # under the first one's stage-1 mapping, which later steps would then refuse
                if _embedded_by(dataset_dir, encoder, clip_weights):
                    print(f"embeddings of {dataset_dir} already computed by {encoder}, reused", flush=True)
                else:
                    preprocess_dataset(
                        dataset_dir,
                        encoder=encoder,
                        clip_weights=clip_weights,
                        device=device,
                        progress=progress,
                    )
                write_json(marker, {"encoder": encoder, "clip_weights": clip_weights})

            embedded = (
                preprocessed.is_file() and _read_marker(preprocessed, out_dir).get("encoder") == encoder
            )
            steps.run(seed, complexity, "preprocess", embedded, preprocess)

            def tracked(method: str, seed=seed, complexity=complexity) -> list[str]:
                cell = {"seed": seed, "complexity": complexity, "method": method}
                return _tracker_overrides(trackers, out_dir, cell)

            stage1_dir = run_root / "docmnist_stage1"
            if needs_stage1:
                overrides1 = _stage_overrides("docmnist_stage1", dataset_dir, run_root, common, stage1)
                cfg1 = compose(overrides1 + tracked("stage1"))
                steps.run(
                    seed,
                    complexity,
                    "stage1",
                    _mapping_is_current(stage1_dir, dataset_dir),
                    lambda c=cfg1: run_stage1_from_config(c),
                )

            cell_methods = list(methods)
            if "oracle" in cell_methods and not Dataset.open(dataset_dir).has_region_labels:
                print(f"note: {dataset_dir} has no region labels: oracle skipped", flush=True)
                cell_methods.remove("oracle")
                steps.total -= 2
            for method in (m for m in cell_methods if m in TRAINED_METHODS):
                experiment = METHOD_EXPERIMENTS[method]
                overrides = dict(stage2)
                if method in STAGE1_METHODS:
                    overrides["stage_1_ckpt_dir"] = str(stage1_dir)
                cfg2 = compose(
                    _stage_overrides(experiment, dataset_dir, run_root, common, overrides) + tracked(method)
                )
                done_marker = run_root / experiment / TRAINED_MARKER

                def train(c=cfg2, marker=done_marker):
                    run_stage2_from_config(c)
                    write_json(marker, {"finished": True})

                steps.run(seed, complexity, f"{method} stage2", done_marker.is_file(), train)
            for method in cell_methods:
                experiment = METHOD_EXPERIMENTS[method]
                extra = {"stage_1_ckpt_dir": str(stage1_dir)} if method in STAGE1_METHODS else {}
                cfg_eval = compose(
                    _stage_overrides(experiment, dataset_dir, run_root, common, extra) + tracked(method)
                )
                steps.run(
                    seed,
                    complexity,
                    f"{method} evaluate",
                    (run_root / experiment / "metrics.json").is_file(),
                    lambda c=cfg_eval: evaluate_from_config(c),
                )

    results = collect_results(out_dir)
    write_results(out_dir, results)
    write_step_times(out_dir)
    return results


def _mapping_is_current(stage1_dir: Path, dataset_dir: Path) -> bool:
    """Whether stage 1 is done for this cell: its mapping exists and was made from the cell's current dataset
    (:func:`villa.mapping.schema.check_mapping_inputs`); a mapping an older run left behind is redone."""
    from villa.mapping.schema import check_mapping_inputs

    try:
        check_mapping_inputs(stage1_dir, dataset_dir)
    except VillaError:
        return False
    return True


def _marker_fix(out_dir: Path) -> str:
    return f"delete it and re-run python -m villa.sweep out_dir={out_dir} (the step it marks runs again)"


def _read_marker(path: Path, out_dir: Path, required: Sequence[str] = ()) -> dict:
    """A step's JSON record (``dataset.json``, ``preprocessed.json``, ``metrics.json`` ...): one line if damaged."""
    return read_json(path, root=out_dir, fix=_marker_fix(out_dir), required=required)


def read_split_metrics(
    out_dir: str | Path, complexity: int, split: str = "test", *, seed: int = DEFAULT_SEED
) -> dict:
    """Stage-1 ``{precision, recall, f1, ...}`` of one split of complexity ``complexity`` and ``seed`` in a sweep."""
    from villa.mapping.schema import read_mapping_metrics

    out_dir = Path(out_dir)
    run_dir = cell_dir(out_dir, seed, complexity) / "docmnist_stage1"
    metrics = read_mapping_metrics(run_dir, fix=_marker_fix(out_dir))
    values = metrics.get(split)
    if not isinstance(values, dict) or not all(k in values for k in ("precision", "recall", "f1")):
        raise damaged(
            run_dir / "mapping_metrics.json", out_dir, f"has no {split} metrics", _marker_fix(out_dir)
        )
    return values


def generate_shared(data_root: str | Path, digit_pools=None, **params):
    """``generate_docmnist(data_root=data_root, **params)`` safe beside other sweep processes.

    Targets T and T+1 can give the same dataset folder (pair counts are even), and sweep processes may run
    at the same time into one ``data_root``. So each process generates into a private scratch folder and
    moves the dataset in with one rename, which fails when the folder is already there; the folder already
    there is then reused, untouched (with whatever region embeddings were written into it meanwhile),
    provided it holds the same annotation table. A folder under the final name is always complete
    (generation writes it atomically), so there is nothing to wait for. Returns the
    :class:`~villa.docmnist.generate.GenerationResult` with ``dataset_dir`` in ``data_root``.
    """
    from villa.docmnist.generate import DEFAULT_SEED, generate_docmnist
    from villa.docmnist.mnist import load_mnist_pools

    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    if digit_pools is None:  # from data_root's MNIST (torchvision files or cache), not the scratch folder's
        digit_pools = load_mnist_pools(params.get("seed", DEFAULT_SEED), data_root)
    scratch = Path(tempfile.mkdtemp(prefix=".generate.", dir=data_root))
    try:
        result = generate_docmnist(data_root=scratch, digit_pools=digit_pools, overwrite=False, **params)
        final = data_root / result.dataset_dir.name
        try:
            os.rename(result.dataset_dir, final)  # atomic; fails if another process's folder is there
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if _annotations_digest(final) != _annotations_digest(result.dataset_dir):
                raise VillaError(
                    f"{final} already holds another DocMNIST dataset (other seed or budgets?): "
                    f"delete it or choose another data_root"
                ) from None
            print(f"dataset {final} already generated, reused", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(result, dataset_dir=final)


def _embedded_by(dataset_dir: Path, encoder: str, clip_weights: str | None) -> bool:
    """Whether ``dataset_dir`` holds attribute, text and region embeddings by ``encoder`` (and the weights file
    ``clip_weights``, when given as a path) of its current annotation table."""
    from villa.features.embeddings import ATTR_EMBS_FILE, REGION_EMBS_DIR, TEXT_EMBS_DIR, read_manifest
    from villa.storage.artifacts import cached_sha256

    try:
        manifests = [read_manifest(dataset_dir / folder) for folder in (REGION_EMBS_DIR, TEXT_EMBS_DIR)]
    except VillaError:
        return False
    recorded = (manifests[0].get("encoder_config") or {}).get("clip_weights")
    weights = None if clip_weights is None else str(Path(clip_weights).expanduser().resolve())
    return (
        all(m["encoder"] == encoder for m in manifests)
        and (weights is None or recorded == weights)
        and (dataset_dir / ATTR_EMBS_FILE).is_file()
        and manifests[0].get("annotations_sha256") == cached_sha256(dataset_dir / "annotations.feather")
    )


def _annotations_digest(dataset_dir: Path) -> str | None:
    path = dataset_dir / "annotations.feather"
    return file_sha256(path) if path.is_file() else None


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix runs of different settings in one ``out_dir`` (finished steps would be reused silently),
    and to write into a folder that is not a sweep's (it has no settings file and holds anything but Hydra's
    records).

    Seeds, complexities and methods are not part of the settings: adding them to an ``out_dir`` (or Hydra
    multirun jobs or concurrent processes over them sharing it) is how a sweep grows.
    """
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # plain JSON types, as they read back
    # a folder of the user's (no settings file, other contents than Hydra's records) is not written into;
    # hidden names are left out (Hydra's .hydra, a concurrent sweep's settings file being written)
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if not p.name.startswith(".") and p.name not in ("sweep.log", "multirun")
    )
    if not path.is_file() and foreign:
        raise VillaError(
            f"{out_dir} is not a sweep folder (no {SETTINGS_FILE}) and holds other files ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty out_dir"
        )
    if path.is_file():
        previous = read_json(
            path,
            root=out_dir,
            fix=f"delete it and re-run the sweep with the settings it was started with (out_dir={out_dir})",
        )
        if previous != settings:
            changed = sorted(
                k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k)
            )
            raise VillaError(
                f"{out_dir} holds a sweep with other settings ({', '.join(changed)} differ): "
                f"choose another out_dir or delete that folder"
            )
        return
    write_json(path, settings)


# --------------------------------------------------------------------------- tables
def _detection(metrics: dict, path: Path, out_dir: Path) -> tuple[float | None, float | None]:
    """``(ap, ap50)`` of a ``metrics.json``'s ``detection`` entry; ``(None, None)`` without one."""
    entry = metrics.get("detection")
    if entry is None:
        return None, None
    values = (entry.get("ap"), entry.get("ap50")) if isinstance(entry, dict) else ("bad", "bad")
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        raise damaged(path, out_dir, "has a 'detection' entry without numeric ap/ap50", _marker_fix(out_dir))
    return values


def collect_results(out_dir: str | Path) -> pd.DataFrame:
    """One row per (seed, complexity, method) for every cell under ``out_dir`` whose method has metrics,
    by complexity, seed, then :data:`METHODS` order (columns :data:`RESULT_COLUMNS`)."""
    out_dir = Path(out_dir)
    rows = []
    for seed, complexity, record_path in _cells(out_dir, "dataset.json"):
        run_root = record_path.parent
        record = _read_marker(record_path, out_dir)
        mapping_path = run_root / "docmnist_stage1" / "mapping_metrics.json"
        mapping_f1 = (
            read_split_metrics(out_dir, complexity, seed=seed)["f1"] if mapping_path.is_file() else None
        )
        for method, experiment in METHOD_EXPERIMENTS.items():
            metrics_path = run_root / experiment / "metrics.json"
            if not metrics_path.is_file():
                continue
            metrics = _read_marker(
                metrics_path,
                out_dir,
                ("text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc"),
            )
            ap, ap50 = _detection(metrics, metrics_path, out_dir)
            rows.append(
                {
                    "seed": seed,
                    "target_sample_complexity": complexity,
                    "avg_sample_complexity": record.get("avg_train_complexity"),
                    "method": method,
                    "text_to_region_r_precision": metrics["text_to_region_r_precision"],
                    "region_to_text_r_precision": metrics["region_to_text_r_precision"],
                    "zero_shot_auroc": metrics["zero_shot_auroc"],
                    "detection_ap": ap,
                    "detection_ap50": ap50,
                    "mapping_f1": mapping_f1 if method == "villa" else None,
                }
            )
    table = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    # float columns: a metric without a value (None) is NaN, written as an empty CSV cell
    return table.astype({"avg_sample_complexity": float, **{m: float for m in METRICS}})


def _method_order(methods: pd.Series) -> pd.Series:
    return methods.map({m: i for i, m in enumerate(METHODS)})


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per complexity, method and metric (:data:`SUMMARY_COLUMNS`): seeds n, mean, std and the 95%
    Student-t interval of the mean. ``avg_sample_complexity`` is the mean over the seeds' datasets. Metrics
    without any value (detection on data without boxes, mapping F1 of other methods) have no row."""
    rows = []
    frame = results.sort_values(["target_sample_complexity"], kind="stable")
    for (complexity, method), group in frame.groupby(["target_sample_complexity", "method"], sort=False):
        for metric in METRICS:
            stats = t_interval(pd.to_numeric(group[metric], errors="coerce"))
            if stats["n"]:
                rows.append(
                    {
                        "target_sample_complexity": complexity,
                        "avg_sample_complexity": float(group["avg_sample_complexity"].mean()),
                        "method": method,
                        "metric": metric,
                        **stats,
                    }
                )
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    if table.empty:
        return table
    order = table.assign(_m=_method_order(table["method"]), _k=table["metric"].map(METRICS.index))
    return order.sort_values(["target_sample_complexity", "_m", "_k"], kind="stable").drop(
        columns=["_m", "_k"]
    )


def differences(results: pd.DataFrame) -> pd.DataFrame:
    """Per complexity and comparison a - b of :data:`COMPARISONS` and per metric (:data:`DIFFERENCE_COLUMNS`):
    the seeds' differences paired by seed (each seed shares one dataset and stage 1 between methods), their
    n, mean, std, 95% t-interval, and ``excludes_zero`` (the interval lies on one side of 0; empty below two
    seeds). ``avg_sample_complexity``: the mean over the paired seeds' datasets."""
    keys = ["seed", "target_sample_complexity"]
    metrics = [m for m in METRICS if m != "mapping_f1"]
    rows = []
    for complexity in sorted(results["target_sample_complexity"].unique()):
        cell = results[results["target_sample_complexity"] == complexity]
        for a, b in COMPARISONS:
            paired = cell[cell["method"] == a].merge(
                cell[cell["method"] == b], on=keys, suffixes=("_a", "_b")
            )
            if paired.empty:
                continue
            for metric in metrics:
                diff = pd.to_numeric(paired[f"{metric}_a"], errors="coerce") - pd.to_numeric(
                    paired[f"{metric}_b"], errors="coerce"
                )
                stats = t_interval(diff)
                if not stats["n"]:
                    continue
                excludes = None
                if stats["n"] >= 2:
                    excludes = bool(stats["ci95_low"] > 0 or stats["ci95_high"] < 0)
                rows.append(
                    {
                        "target_sample_complexity": int(complexity),
                        "avg_sample_complexity": float(paired["avg_sample_complexity_a"].mean()),
                        "comparison": f"{a} - {b}",
                        "metric": metric,
                        **stats,
                        "excludes_zero": excludes,
                    }
                )
    return pd.DataFrame(rows, columns=list(DIFFERENCE_COLUMNS))


def write_results(out_dir: str | Path, results: pd.DataFrame) -> dict[str, Path]:
    """Write ``results.csv``, ``summary.csv``, ``differences.csv`` and ``results.png`` (R-Precision against
    average complexity: a line per method through the seeds' means, with its 95% interval as a band when
    there are two seeds or more). Returns ``{"results", "summary", "differences", "plot"}`` -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / RESULTS_FILE,
        "summary": out_dir / SUMMARY_FILE,
        "differences": out_dir / DIFFERENCES_FILE,
        "plot": out_dir / PLOT_FILE,
    }
    summary = summarize(results)
    tables = {"results": results, "summary": summary, "differences": differences(results)}
    for name, table in tables.items():
        with atomic_path(paths[name]) as tmp:
            table.to_csv(tmp, index=False, float_format="%.2f")

    seeds = results.groupby("target_sample_complexity")["seed"].nunique().max() if len(results) else 0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    panels = (
        ("text_to_region_r_precision", "text -> region"),
        ("region_to_text_r_precision", "region -> text"),
    )
    for ax, (metric, title) in zip(axes, panels):
        rows = summary[summary["metric"] == metric]
        for method in METHODS:
            line = rows[rows["method"] == method].sort_values("avg_sample_complexity")
            if line.empty:
                continue
            style = {"linestyle": "--", "color": "grey"} if method == "untrained" else {}  # the floor
            (drawn,) = ax.plot(line["avg_sample_complexity"], line["mean"], marker="o", label=method, **style)
            if (line["n"] >= 2).any():
                ax.fill_between(
                    line["avg_sample_complexity"],
                    line["ci95_low"],
                    line["ci95_high"],
                    color=drawn.get_color(),
                    alpha=0.18,
                    linewidth=0,
                )
        ax.set_xlabel("average training sample complexity (region-attribute pairs / image)")
        ax.set_ylabel("R-Precision (%)")
        spread = f"mean of {seeds} seeds, 95% t-interval" if seeds and seeds > 1 else "one seed"
        ax.set_title(f"DocMNIST {title} retrieval (test split; {spread})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(paths["plot"]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return paths


def format_results(results: pd.DataFrame) -> str:
    """The results table as aligned text; a metric without a value prints as "n/a"."""
    if results.empty:
        return "(no finished runs)"
    return results.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep=NA)


def format_summary(results: pd.DataFrame, metric: str = "text_to_region_r_precision") -> str:
    """``metric`` per complexity and method as ``mean [low, high]`` over the seeds, then the paired
    differences (``*``: the 95% interval excludes 0). Empty when no cell has two seeds."""
    summary = summarize(results)
    rows = summary[summary["metric"] == metric]
    if rows.empty or rows["n"].max() < 2:
        return ""

    def cell(row) -> str:
        if row["n"] < 2:
            return f"{fmt(row['mean'], '.1f')} (n=1)"
        return f"{fmt(row['mean'], '.1f')} [{fmt(row['ci95_low'], '.1f')}, {fmt(row['ci95_high'], '.1f')}]"

    means = rows.assign(value=rows.apply(cell, axis=1)).pivot(
        index="target_sample_complexity", columns="method", values="value"
    )
    means = means[[m for m in METHODS if m in means.columns]].fillna("")
    lines = [f"{metric}: mean [95% t-interval] over seeds", means.to_string()]
    diffs = differences(results)
    diffs = diffs[diffs["metric"] == metric]
    if not diffs.empty:
        marked = diffs.assign(
            value=diffs.apply(lambda r: cell(r) + (" *" if r["excludes_zero"] is True else ""), axis=1)
        )
        table = marked.pivot(index="target_sample_complexity", columns="comparison", values="value").fillna(
            ""
        )
        order = [f"{a} - {b}" for a, b in COMPARISONS]
        lines += [
            "paired differences (* : interval excludes 0)",
            table[[c for c in order if c in table]].to_string(),
        ]
    return "\n".join(lines)

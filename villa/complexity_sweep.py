"""The paper's DocMNIST experiment: retrieval quality of ViLLA, CLIP and the untrained encoder against
the training data's average image-text sample complexity.

For every target complexity the sweep runs generate -> preprocess -> stage 1 -> ViLLA stage 2 ->
CLIP baseline -> evaluation of the three, under ``out_dir/c<T>/``. Each finished step leaves a marker
(its output file), so a rerun skips it and a killed sweep resumes; interrupted training resumes from
``last.pkl``. ``results.csv`` and ``results.png`` gather every complexity finished under ``out_dir``,
so Hydra multirun jobs that share ``out_dir`` add up to one table. Different complexities may also run
as concurrent processes sharing ``out_dir`` (e.g. on one GPU); a final plain run then collects them all.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from villa.artifacts import damaged, one_line, read_json
from villa.errors import VillaError
from villa.io import atomic_path, write_json

RESULT_COLUMNS = (
    "target_sample_complexity",
    "avg_sample_complexity",
    "method",
    "text_to_region_r_precision",
    "region_to_text_r_precision",
    "zero_shot_auroc",
    "mapping_f1",
)
METHOD_EXPERIMENTS = {"villa": "docmnist_stage2", "clip": "docmnist_clip", "untrained": "docmnist_untrained"}
STEP_TIMES_FILE = "step_times.csv"
TRAINED_MARKER = "sweep_trained.json"
SETTINGS_FILE = "sweep_settings.json"


class _Steps:
    """Prints progress per step and records each step's wall time in ``out_dir/c<T>/step_times.csv``.

    Per complexity, so that processes sweeping different complexities into one ``out_dir`` at the same
    time never rewrite each other's rows; :func:`write_step_times` gathers them into ``out_dir``.
    """

    def __init__(self, out_dir: Path, total: int):
        self.out_dir, self.total, self.done = out_dir, total, 0

    def run(self, complexity: int, name: str, finished: bool, action):
        self.done += 1
        prefix = f"[sweep {self.done}/{self.total}] T={complexity} {name}"
        if finished:
            print(f"{prefix}: already done, skipped", flush=True)
            return None
        print(f"{prefix} ...", flush=True)
        started = time.perf_counter()
        out = action()
        seconds = round(time.perf_counter() - started, 1)
        print(f"{prefix}: done in {seconds:.1f}s", flush=True)
        path = self.out_dir / f"c{complexity}" / STEP_TIMES_FILE
        rows = _read_step_times(path, self.out_dir).to_dict("records") if path.is_file() else []
        rows = [r for r in rows if r["step"] != name]
        rows.append({"complexity": complexity, "step": name, "seconds": seconds})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        return out


def write_step_times(out_dir: str | Path) -> Path:
    """Gather every ``c<T>/step_times.csv`` under ``out_dir`` into ``out_dir/step_times.csv``
    (columns ``complexity, step, seconds``, by complexity then step order)."""
    out_dir = Path(out_dir)
    parts = [_read_step_times(p, out_dir) for p in _complexity_dirs(out_dir, STEP_TIMES_FILE)]
    table = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["complexity", "step", "seconds"])
    )
    with atomic_path(out_dir / STEP_TIMES_FILE) as tmp:
        table.to_csv(tmp, index=False)
    return out_dir / STEP_TIMES_FILE


def _read_step_times(path: Path, out_dir: Path) -> pd.DataFrame:
    """One complexity's ``step_times.csv`` (``complexity, step, seconds``); one line if damaged."""
    fix = f"delete it (it only records step times) and re-run python -m villa.sweep out_dir={out_dir}"
    try:
        table = pd.read_csv(path)
    except Exception as err:  # empty, binary or cut mid-quote
        raise damaged(path, out_dir, f"is not a readable CSV table ({one_line(err)})", fix) from None
    columns = ("complexity", "step", "seconds")
    if list(table.columns) != list(columns) or table[list(columns)].isna().any().any():
        raise damaged(path, out_dir, "is damaged (expected complete rows of complexity, step, seconds)", fix)
    return table


def _complexity_dirs(out_dir: Path, must_hold: str) -> list[Path]:
    """``out_dir/c<T>/<must_hold>`` paths that exist, in increasing T."""
    found = [p for p in out_dir.glob(f"c*/{must_hold}") if p.parent.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name[1:]))


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
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


def run_sweep(
    complexities: Sequence[int],
    attribute_budget: int,
    out_dir: str | Path,
    *,
    val_attribute_budget: int = 10000,
    test_attribute_budget: int = 10000,
    data_root: str | Path | None = None,
    seed: int = 23,
    encoder: str = "default",
    clip_weights: str | None = None,
    device: str = "auto",
    stage1: dict | None = None,
    stage2: dict | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or resume) the sweep and return the results table (also written to ``out_dir``)."""
    from villa.evaluation.run import evaluate_from_config
    from villa.hydra_app import compose
    from villa.mapping.run import run_stage1_from_config
    from villa.preprocess import preprocess_dataset
    from villa.vlm.run import run_stage2_from_config

    complexities = [int(c) for c in complexities]
    if not complexities:
        raise VillaError("complexities is empty: give at least one target sample complexity")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root) if data_root is not None else out_dir / "data"
    stage1, stage2 = dict(stage1 or {}), dict(stage2 or {})
    _check_settings(
        out_dir,
        {
            "attribute_budget": attribute_budget,
            "val_attribute_budget": val_attribute_budget,
            "test_attribute_budget": test_attribute_budget,
            "seed": seed,
            "encoder": encoder,
            "clip_weights": clip_weights,
            "stage1": stage1,
            "stage2": stage2,
        },
    )
    common = {
        "seed": seed,
        "device": device,
        "encoder": encoder,
        "clip_weights": clip_weights,
        "progress": progress,
    }
    steps = _Steps(out_dir, total=8 * len(complexities))

    for complexity in complexities:
        run_root = out_dir / f"c{complexity}"
        record_path = run_root / "dataset.json"

        def generate(complexity=complexity, record_path=record_path):
            result = generate_shared(
                data_root,
                attribute_budget=attribute_budget,
                target_sample_complexity=complexity,
                seed=seed,
                val_attribute_budget=val_attribute_budget,
                test_attribute_budget=test_attribute_budget,
                progress=progress,
            )
            record = {
                "dataset_dir": str(result.dataset_dir),
                "avg_train_complexity": result.average_complexity["train"],
                "split_sizes": result.split_sizes,
                "average_complexity": result.average_complexity,
            }
            write_json(record_path, record)

        steps.run(complexity, "generate", record_path.is_file(), generate)
        record = _read_marker(record_path, out_dir, ("dataset_dir",))
        dataset_dir = Path(record["dataset_dir"])
        if not dataset_dir.is_dir():
            raise VillaError(
                f"{record_path} names {dataset_dir}, which is gone: delete {record_path} and rerun"
            )

        preprocessed = run_root / "preprocessed.json"

        def preprocess(dataset_dir=dataset_dir, marker=preprocessed):
            preprocess_dataset(
                dataset_dir, encoder=encoder, clip_weights=clip_weights, device=device, progress=progress
            )
            write_json(marker, {"encoder": encoder, "clip_weights": clip_weights})

        embedded = preprocessed.is_file() and _read_marker(preprocessed, out_dir).get("encoder") == encoder
        steps.run(complexity, "preprocess", embedded, preprocess)

        stage1_dir = run_root / "docmnist_stage1"
        cfg1 = compose(_stage_overrides("docmnist_stage1", dataset_dir, run_root, common, stage1))
        steps.run(
            complexity,
            "stage1",
            (stage1_dir / "mapping_metrics.json").is_file(),
            lambda c=cfg1: run_stage1_from_config(c),
        )

        for method in ("villa", "clip"):
            experiment = METHOD_EXPERIMENTS[method]
            overrides = {**stage2, "stage_1_ckpt_dir": str(stage1_dir)} if method == "villa" else stage2
            cfg2 = compose(_stage_overrides(experiment, dataset_dir, run_root, common, overrides))
            done_marker = run_root / experiment / TRAINED_MARKER

            def train(c=cfg2, marker=done_marker):
                run_stage2_from_config(c)
                write_json(marker, {"finished": True})

            steps.run(complexity, f"{method} stage2", done_marker.is_file(), train)
        for method, experiment in METHOD_EXPERIMENTS.items():
            cfg_eval = compose(_stage_overrides(experiment, dataset_dir, run_root, common, {}))
            steps.run(
                complexity,
                f"{method} evaluate",
                (run_root / experiment / "metrics.json").is_file(),
                lambda c=cfg_eval: evaluate_from_config(c),
            )

    results = collect_results(out_dir)
    write_results(out_dir, results)
    write_step_times(out_dir)
    return results


def _marker_fix(out_dir: Path) -> str:
    return f"delete it and re-run python -m villa.sweep out_dir={out_dir} (the step it marks runs again)"


def _read_marker(path: Path, out_dir: Path, required: Sequence[str] = ()) -> dict:
    """A step's JSON record (``dataset.json``, ``preprocessed.json``, ``metrics.json`` ...): one line if damaged."""
    return read_json(path, root=out_dir, fix=_marker_fix(out_dir), required=required)


def read_split_metrics(out_dir: str | Path, complexity: int, split: str = "test") -> dict:
    """Stage-1 ``{precision, recall, f1, ...}`` of one split of complexity ``complexity`` in a sweep."""
    from villa.mapping.schema import read_mapping_metrics

    out_dir = Path(out_dir)
    run_dir = out_dir / f"c{complexity}" / "docmnist_stage1"
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


def _annotations_digest(dataset_dir: Path) -> str | None:
    path = dataset_dir / "annotations.feather"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix runs of different settings in one ``out_dir`` (finished steps would be reused silently).

    Complexities are not part of the settings: adding complexities to an ``out_dir`` (or Hydra multirun jobs
    over complexities sharing it) is how a sweep grows.
    """
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # plain JSON types, as they read back
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


def collect_results(out_dir: str | Path) -> pd.DataFrame:
    """One row per (complexity, method) for every complexity under ``out_dir`` with all metrics present."""
    out_dir = Path(out_dir)
    rows = []
    for record_path in _complexity_dirs(out_dir, "dataset.json"):
        run_root = record_path.parent
        record = _read_marker(record_path, out_dir)
        mapping_path = run_root / "docmnist_stage1" / "mapping_metrics.json"
        mapping_f1 = (
            read_split_metrics(out_dir, int(run_root.name[1:]))["f1"] if mapping_path.is_file() else None
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
            rows.append(
                {
                    "target_sample_complexity": int(run_root.name[1:]),
                    "avg_sample_complexity": record.get("avg_train_complexity"),
                    "method": method,
                    "text_to_region_r_precision": metrics["text_to_region_r_precision"],
                    "region_to_text_r_precision": metrics["region_to_text_r_precision"],
                    "zero_shot_auroc": metrics["zero_shot_auroc"],
                    "mapping_f1": mapping_f1 if method == "villa" else None,
                }
            )
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def write_results(out_dir: str | Path, results: pd.DataFrame) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.png`` (R-Precision against average complexity, a line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    csv_path, png_path = out_dir / "results.csv", out_dir / "results.png"
    with atomic_path(csv_path) as tmp:
        results.to_csv(tmp, index=False, float_format="%.2f")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (
        ("text_to_region_r_precision", "text -> region"),
        ("region_to_text_r_precision", "region -> text"),
    )
    for ax, (column, title) in zip(axes, panels):
        for method, group in results.groupby("method", sort=False):
            group = group.sort_values("avg_sample_complexity")
            ax.plot(group["avg_sample_complexity"], group[column], marker="o", label=method)
        ax.set_xlabel("average training sample complexity (region-attribute pairs / image)")
        ax.set_ylabel("R-Precision (%)")
        ax.set_title(f"DocMNIST {title} retrieval (test split)")
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return csv_path, png_path


def format_results(results: pd.DataFrame) -> str:
    """The results table as aligned text."""
    if results.empty:
        return "(no finished runs)"
    return results.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep="")

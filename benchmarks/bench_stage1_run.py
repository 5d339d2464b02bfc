"""Stage 1 as a user runs it (training + mapping of every split), this tree against a baseline, on one dataset.

    python benchmarks/bench_stage1_run.py --data-dir DIR --device cuda [--seeds 23 24] [--baseline-rev 3c02482]
        [--baseline-src DIR] [--variants default,no_graphs,loader] [--epochs 30]

Each run is a fresh process (this file with ``--worker``) that imports ``villa`` from one tree and calls
:func:`villa.mapping.run.run_stage1_from_config` on the composed ``experiment=stage1`` config (all its
defaults: 30 epochs, batch 48, AdamW 1e-4, mapping with the last weights), as ``python -m villa.stage1`` does.
``baseline`` imports the package of ``git archive <baseline-rev> villa`` (or of ``--baseline-src``, a folder
holding a ``villa`` package, for machines without the git history); ``current`` a copy of this tree's
package (uncommitted changes included). Variants of the current tree (``--variants``):

* ``default``: the defaults (on CUDA: data resident on the device, each training step one CUDA graph);
* ``no_graphs``: ``cuda_graphs=false`` (resident data, eager steps);
* ``loader``: ``resident_data_mb=0`` (the DataLoader path the baseline also takes).

Reported per run: the process wall time (start to exit, imports included), the ``run_stage1`` call
(dataset load, training, checkpoints, mapping of every split), the training loop alone (sum of
``metrics.csv`` seconds: train + validation passes, checkpoint writes excluded), and val/test mapping F1.
The sides run one after the other, their order reversed from one seed to the next (so no side always
meets a cold machine first); the header names the GPU, the CPU cores and the load. Same seed, same data, same
hyper-parameters on every side: the F1s must agree within seed noise (the
seed-to-seed spread is printed when several seeds run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _trees import baseline_tree, current_tree, worker_env

VARIANTS = {
    "default": [],
    "no_graphs": ["cuda_graphs=false"],
    "loader": ["resident_data_mb=0"],
}


def worker(args) -> None:
    started = time.perf_counter()
    import torch

    import villa
    from villa.mapping.run import run_stage1_from_config

    try:
        from villa.engine.hydra_app import compose
    except ImportError:  # a baseline tree from before villa/engine/
        from villa.hydra_app import compose

    overrides = [
        "experiment=stage1",
        f"data_dir={args.data_dir}",
        f"run_dir={args.run_dir}",
        f"device={args.device}",
        f"seed={args.seed}",
        f"epochs={args.epochs}",
        "progress=false",
        *args.override,
    ]
    cfg = compose(overrides)
    imported = time.perf_counter() - started
    t = time.perf_counter()
    result = run_stage1_from_config(cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    call = time.perf_counter() - t
    epochs = sum(row["seconds"] for row in result.fit.history)  # (the run's metrics.csv rows)
    out = {
        "imports_s": imported,
        "run_stage1_s": call,
        "epochs_s": epochs,
        "val_f1": result.metrics.get("val", {}).get("f1"),
        "test_f1": result.metrics.get("test", {}).get("f1"),
        "villa_file": villa.__file__,
    }
    Path(args.out).write_text(json.dumps(out))


def baseline(args, dest: Path) -> Path:
    """The baseline package: a copy of ``--baseline-src``'s, or ``git archive <--baseline-rev> villa``."""
    return (
        current_tree(dest, Path(args.baseline_src))
        if args.baseline_src
        else baseline_tree(args.baseline_rev, dest)
    )


def run(label: str, tree: Path, overrides: list[str], seed: int, args, tmp: Path) -> dict:
    out, run_dir = tmp / f"{label}_{seed}.json", tmp / f"run_{label}_{seed}"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--run-dir", str(run_dir),
        "--data-dir", str(args.data_dir), "--device", args.device, "--seed", str(seed), "--epochs", str(args.epochs),
    ] + [f"--override={o}" for o in overrides]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(tree), cwd=tmp, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(f"{label} seed {seed} FAILED:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
        return {}
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    result = json.loads(out.read_text()) | {"wall_s": wall, "notes": notes}
    print(
        f"{label:10s} seed {seed}: process {wall:6.1f} s | run_stage1 {result['run_stage1_s']:6.1f} s | "
        f"training epochs {result['epochs_s']:6.1f} s | val F1 {_f1(result['val_f1'])} test F1 "
        f"{_f1(result['test_f1'])} [{result['villa_file']}]" + (f" | {'; '.join(notes)}" if notes else ""),
        flush=True,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _f1(value) -> str:
    return "-" if value is None else f"{value:.2f}"  # (None: a dataset without region labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[23])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--baseline-rev", default="3c02482", help="'' skips the baseline")
    parser.add_argument("--baseline-src", default=None, help="a folder with the baseline's villa package")
    parser.add_argument("--variants", default="default,no_graphs,loader")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]}: use any of {', '.join(VARIANTS)}")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"data {args.data_dir}, device {args.device} ({gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}), "
        f"seeds {args.seeds}, load {os.getloadavg()}",
        flush=True,
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_stage1_run_") as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        (tmp / "cur").mkdir()
        trees = {"current": current_tree(tmp / "cur")}
        if args.baseline_rev or args.baseline_src:
            trees["baseline"] = baseline(args, tmp / "base")
        sides = [("baseline", "baseline", [])] if "baseline" in trees else []
        sides += [(v if v != "default" else "current", "current", VARIANTS[v]) for v in variants]
        for i, seed in enumerate(args.seeds):
            # (the order flips from seed to seed, so no side always runs first on a cold machine)
            for label, tree, overrides in sides if i % 2 == 0 else sides[::-1]:
                results.setdefault(label, []).append(run(label, trees[tree], overrides, seed, args, tmp))
    print(f"\nload after: {os.getloadavg()}")
    print("| side | seeds | process wall (s) | run_stage1 (s) | training epochs (s) | val F1 | test F1 |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        runs = [r for r in runs if r]
        if not runs:
            continue

        def col(key, fmt, runs=runs):
            return " / ".join("-" if r[key] is None else format(r[key], fmt) for r in runs)

        print(
            f"| {label} | {len(runs)} | {col('wall_s', '.1f')} | {col('run_stage1_s', '.1f')} | "
            f"{col('epochs_s', '.1f')} | {col('val_f1', '.2f')} | {col('test_f1', '.2f')} |"
        )


if __name__ == "__main__":
    main()

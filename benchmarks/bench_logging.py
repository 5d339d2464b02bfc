"""What experiment tracking costs a stage-2 epoch on the CPU: ``logger=csv`` against ``logger=many``
(TensorBoard + W&B offline + MLflow file store), alternating in one process, on the same data and seed.

    python benchmarks/bench_logging.py --data-dir DIR [--pairs clip] [--stage-1-ckpt-dir DIR]
        [--epochs 3] [--repeats 3] [--batch-size 64] [--threads 0]
    python benchmarks/bench_logging.py --generate DIR [--attribute-budget 30000 --complexity 16] ...

``--generate`` makes (once) the DocMNIST dataset of the given budget and target complexity under DIR and
preprocesses it with the ``default`` encoder; 30000 / 16 is the paper's ``docmnist_30000_15.2``.

Each run is :func:`villa.vlm.run.run_stage2` with ``--epochs`` epochs (no early stopping), in a fresh run
folder, alternating csv, many, csv, many, ... ``--repeats`` times each. An *epoch* is timed from the end of
one epoch's logging to the end of the next one's (everything the loop does for an epoch: training, validation,
checkpoint hand-off, ``metrics.csv``, the trackers' calls, and whatever the trackers' threads and processes
take from the CPU meanwhile), so the first epoch of a run (after the trackers start) is left out. Also
printed: the time inside the trackers' per-epoch calls, and the one-off start (imports, run creation) and
close of the trackers, which happen once per run, outside the epochs. Both modes must give the same losses (to 1e-4).

Goal: ``logger=many`` costs at most 2% of an epoch (ratio of the median epochs <= 1.02).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GOAL = 1.02
MODES = {
    "csv": {"csv": {}},
    "many": {
        "csv": {},
        "tensorboard": {"dir": "tensorboard"},
        "wandb": {"mode": "offline", "project": "villa-bench"},
        "mlflow": {"tracking_uri": None, "experiment_name": "villa-bench"},
    },
}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


class Clock:
    """Timestamps of the trackers' calls in the training loop (wraps :class:`villa.engine.tracking.Trackers`)."""

    def __init__(self):
        import villa.engine.tracking as tracking

        self.reset()
        clock = self

        def timed(name, method):
            def call(self, *args, **kwargs):
                started = time.perf_counter()
                try:
                    return method(self, *args, **kwargs)
                finally:
                    clock.calls.append((name, started, time.perf_counter()))

            return call

        for name in ("start", "log_metrics", "close"):
            setattr(tracking.Trackers, name, timed(name, getattr(tracking.Trackers, name)))

    def reset(self) -> None:
        self.calls: list[tuple[str, float, float]] = []

    def summary(self) -> dict:
        epochs = [(s, e) for name, s, e in self.calls if name == "log_metrics"]
        ends = [e for _, e in epochs]
        return {
            "epoch_s": [b - a for a, b in zip(ends, ends[1:])],  # epochs 2.. (each ends with its logging)
            "log_call_s": [e - s for s, e in epochs[1:]],
            "start_s": sum(e - s for name, s, e in self.calls if name == "start"),
            "close_s": sum(e - s for name, s, e in self.calls if name == "close"),
        }


def generate(root: Path, budget: int, complexity: int) -> Path:
    from villa.docmnist.generate import generate_docmnist
    from villa.features.preprocess import preprocess_dataset

    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"bench_logging_{budget}_{complexity}.txt"
    if marker.is_file():
        return Path(marker.read_text().strip())
    result = generate_docmnist(
        attribute_budget=budget,
        target_sample_complexity=complexity,
        seed=23,
        val_attribute_budget=max(budget // 3, 1),
        test_attribute_budget=0,
        data_root=root,
        progress=True,
        overwrite=True,
    )
    preprocess_dataset(result.dataset_dir, encoder="default", device="cpu", progress=True)
    marker.write_text(str(result.dataset_dir))
    return result.dataset_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a preprocessed dataset (default encoder)")
    source.add_argument("--generate", help="make a DocMNIST dataset under this folder (once) and use it")
    parser.add_argument("--attribute-budget", type=int, default=30000)
    parser.add_argument("--complexity", type=int, default=16)
    parser.add_argument("--pairs", default="clip", help="stage-2 pairs (villa needs --stage-1-ckpt-dir)")
    parser.add_argument("--stage-1-ckpt-dir", default=None)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch of a run is not timed)")

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_SILENT"] = "true"
    import torch

    from villa.engine.environment import cpu_model
    from villa.engine.training import read_metrics
    from villa.vlm.run import run_stage2

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = (
        generate(Path(args.generate), args.attribute_budget, args.complexity)
        if args.generate
        else args.data_dir
    )
    clock = Clock()
    scratch = Path(tempfile.mkdtemp(prefix="bench_logging."))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"data: {data_dir}, pairs {args.pairs}, batch {args.batch_size}, {args.epochs} epochs a run")
    print(f"load before: {uptime()}", flush=True)
    runs = []
    try:
        for repeat in range(args.repeats):
            for mode in MODES:
                run_dir = scratch / f"{mode}_{repeat}"
                clock.reset()
                run_stage2(
                    data_dir=data_dir,
                    run_dir=run_dir,
                    stage_1_ckpt_dir=args.stage_1_ckpt_dir,
                    pairs=args.pairs,
                    device="cpu",
                    seed=23,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    early_stopping_patience=None,
                    progress=False,
                    logger=MODES[mode],
                    config={"benchmark": "bench_logging", "mode": mode},
                )
                timing = clock.summary()
                losses = [(r["train_loss"], r["val_loss"]) for r in read_metrics(run_dir)]
                runs.append({"mode": mode, "repeat": repeat, "losses": losses, **timing})
                print(
                    f"  {mode:>4} run {repeat + 1}: epochs 2-{args.epochs} "
                    f"{', '.join(f'{s:.2f}' for s in timing['epoch_s'])} s; tracker calls "
                    f"{1000 * statistics.mean(timing['log_call_s']):.1f} ms/epoch; start {timing['start_s']:.2f} s, "
                    f"close {timing['close_s']:.2f} s",
                    flush=True,
                )
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load after: {uptime()}")

    def pooled(mode, key):
        return [v for r in runs if r["mode"] == mode for v in r[key]]

    csv_epoch, many_epoch = (statistics.median(pooled(m, "epoch_s")) for m in MODES)
    ratio = many_epoch / csv_epoch
    calls = statistics.mean(pooled("many", "log_call_s"))
    start = statistics.mean(r["start_s"] for r in runs if r["mode"] == "many")
    close = statistics.mean(r["close_s"] for r in runs if r["mode"] == "many")
    # (multi-threaded CPU kernels are not bitwise reproducible: equal to float32 rounding)
    reference = runs[0]["losses"]
    same = all(
        len(r["losses"]) == len(reference)
        and all(
            abs(a - b) <= 1e-4 * abs(b) for row, ref in zip(r["losses"], reference) for a, b in zip(row, ref)
        )
        for r in runs
    )
    print(
        f"median epoch: logger=csv {csv_epoch:.3f} s, logger=many {many_epoch:.3f} s, ratio {ratio:.4f} "
        f"({100 * (ratio - 1):+.2f}%; goal <= {100 * (GOAL - 1):.0f}%: {'met' if ratio <= GOAL else 'NOT met'})"
    )
    print(
        f"logger=many: {1000 * calls:.1f} ms in the trackers' calls per epoch ({100 * calls / csv_epoch:.2f}% of "
        f"an epoch); once per run: start {start:.2f} s, close {close:.2f} s"
    )
    print(f"same losses in every run (to 1e-4): {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""float32 against bf16 on the CPU: stage-1 mapping F1 and ViLLA's retrieval over seeds, same data.

    python benchmarks/cpu_precision.py --data-dir DIR --out OUT [--seeds 23,24,25] [--epochs 15] [--batch-size 64]

For each seed and each precision (``amp=false``: float32; ``amp=true``: bf16 on a CPU with native bf16), runs
the commands a user runs, each in its own process (the allocator setting that bf16 brings is process-wide):
``python -m villa.stage1 experiment=stage1``, ``python -m villa.stage2 experiment=stage2`` and
``python -m villa.evaluate experiment=stage2``, with ``device=cpu``, into ``OUT/<precision>/s<seed>``. Stage 2
trains on the mapping of the same precision's stage 1. Alternates the precisions within a seed so that a
change in the machine's load touches both.

Prints per run: stage-1 val/test mapping F1, stage-2 wall seconds and its summed epoch seconds, test
text->region and region->text R-Precision and zero-shot AUROC; then per precision the mean and the 95%
interval over seeds (t distribution), and the bf16 - float32 difference per seed with its interval. Writes
every row to ``OUT/cpu_precision.csv``. A finished run (its ``metrics.json``) is read, not run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from villa.docmnist.complexity_sweep import t_interval

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"float32": "amp=false", "bf16": "amp=true"}
METRICS = ("text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc")


def interval(values: list[float]) -> str:
    """``mean [low, high]``: the 95% t interval of the mean (just the mean for one value)."""
    stats = t_interval(values)
    if stats["n"] < 2:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} [{stats['ci95_low']:.2f}, {stats['ci95_high']:.2f}]"


def command(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", *args], check=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    return time.perf_counter() - start


def one_run(data_dir: Path, out: Path, precision: str, seed: int, epochs: int, batch_size: int) -> dict:
    ckpt = out / precision / f"s{seed}"
    common = [f"data_dir={data_dir}", f"checkpoint_dir={ckpt}", "device=cpu", "progress=false", f"seed={seed}",
              PRECISIONS[precision]]  # fmt: skip
    name = data_dir.name
    stage2_dir = ckpt / name / "stage2"
    row = {"precision": precision, "seed": seed}
    if not (stage2_dir / "metrics.json").exists():
        row["stage1_s"] = command("villa.stage1", "experiment=stage1", *common)
        row["stage2_s"] = command(
            "villa.stage2", "experiment=stage2", *common, f"epochs={epochs}", f"batch_size={batch_size}"
        )
        command("villa.evaluate", "experiment=stage2", *common)
    mapping = json.loads((ckpt / name / "stage1" / "mapping_metrics.json").read_text())
    row["stage1_val_f1"], row["stage1_test_f1"] = mapping["val"]["f1"], mapping["test"]["f1"]
    with open(stage2_dir / "metrics.csv", newline="") as f:
        epochs_done = list(csv.DictReader(f))
    row["stage2_epoch_s_sum"] = sum(float(r["seconds"]) for r in epochs_done)
    row["stage2_epochs"] = len(epochs_done)
    metrics = json.loads((stage2_dir / "metrics.json").read_text())
    metrics = metrics.get("metrics", metrics)
    row.update({k: metrics[k] for k in METRICS})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="23,24,25")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data_dir, out = args.data_dir.resolve(), args.out.resolve()
    rows = []
    for i, seed in enumerate(seeds):
        order = list(PRECISIONS) if i % 2 == 0 else list(PRECISIONS)[::-1]
        for precision in order:
            row = one_run(data_dir, out, precision, seed, args.epochs, args.batch_size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "cpu_precision.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    figures = ("stage1_val_f1", "stage1_test_f1", *METRICS, "stage2_epoch_s_sum")
    print(f"\n| figure | float32 | bf16 | bf16 - float32 (per seed) |  ({len(seeds)} seeds: {args.seeds})")
    print("|---|---|---|---|")
    by = {p: {r["seed"]: r for r in rows if r["precision"] == p} for p in PRECISIONS}
    for key in figures:
        f32 = [by["float32"][s][key] for s in seeds]
        b16 = [by["bf16"][s][key] for s in seeds]
        diff = [b - a for a, b in zip(f32, b16)]
        print(f"| {key} | {interval(f32)} | {interval(b16)} | {interval(diff)} |")


if __name__ == "__main__":
    main()

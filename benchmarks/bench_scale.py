"""Memory that does not grow with the dataset: peak memory of preprocessing and stage 2 at 5,000 and
20,000 images, and stage-2 throughput with images cached in memory vs decoded per batch.

For each size N it builds a COCO-format set with the synthetic generator and imports it (skipped when already
there), then runs every step as a child process and reports its peak memory:

* ``peak RSS``: the largest single process of the step (``ru_maxrss`` from ``wait4``, exact);
* ``peak tree PSS``: the sum of PSS (shared pages split between their users) over the step's process tree
  (DataLoader workers included), sampled every 0.1 s -- the memory the step really holds.

``<work>/<step>_<N>.mem.tsv`` traces both every 2 s (flat lines: memory does not creep up within a run).

Steps: preprocessing (the default encoder, rich region features); stage 1 for one epoch (it makes the ViLLA
region-text pairs); one stage-2 epoch with ViLLA pairs at the default settings (``image_cache_mb=1024``,
``num_workers=0``: the images stay decoded in memory when they fit 1 GiB) and streaming (``image_cache_mb=0``,
``num_workers=--workers``: decoded per batch in DataLoader workers).

Throughput (``--docmnist``): on a DocMNIST set, one stage-2 epoch (ViLLA pairs of a one-epoch stage 1) cached vs
streaming, in the same run, repeated ``--repeats`` times alternating; the epoch time comes from ``metrics.csv``.

    python benchmarks/bench_scale.py --sizes=5000,20000 --workers=2 --docmnist=docmnist_30000_15.2
    python benchmarks/bench_scale.py --sizes=5000 --steps=preprocess      # one step only

Everything goes under ``--work`` (default ``/tmp/villa_scale``); a table with the commands, the machine and
``uptime`` is printed at the end (and appended as JSON lines to ``<work>/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("preprocess", "stage1", "stage2_default", "stage2_stream")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> str:
    cores = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()} {platform.machine()}, {cores} cores, {mem:.0f} GiB, python {platform.python_version()}"


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (through /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS of its largest process and peak PSS of its process tree (MB)."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        peak = {"pss": 0, "procs": 1}
        done = threading.Event()

        def sample():
            # every 2 s a line of the memory trace: seconds, RSS of the step's main process, tree PSS (MB)
            with open(log.with_suffix(".mem.tsv"), "w") as trace:
                trace.write("seconds\trss_mb\ttree_pss_mb\n")
                last = 0.0
                while not done.wait(0.1):
                    pids = _tree(proc.pid)
                    pss = sum(_pss_kb(p) for p in pids)
                    peak["pss"] = max(peak["pss"], pss)
                    peak["procs"] = max(peak["procs"], len(pids))
                    now = time.perf_counter() - started
                    if now - last >= 2:
                        trace.write(f"{now:.0f}\t{_rss_kb(proc.pid) // 1024}\t{pss // 1024}\n")
                        trace.flush()
                        last = now

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "command": shlex.join(cmd),
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "peak_tree_pss_mb": round(peak["pss"] / 1024),
        "processes": peak["procs"],
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "log": str(log),
    }
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"step failed ({proc.returncode}): {result['command']}\n{tail}")
    return result


def build(n: int, work: Path, py: str) -> Path:
    """The N-image COCO-format set, imported (cached under ``work``)."""
    raw, data = work / f"shapes_{n}", work / f"data_{n}"
    if not (raw / "captions.json").is_file():
        subprocess.run(
            [py, "-m", "villa.datasets.shapes", f"--out={raw}", f"--images={n}", "--height=130-170",
             "--width=180-220", "--objects=1-6", "--no_progress"],
            check=True, cwd=REPO,
        )  # fmt: skip
    if not (data / "dataset.json").is_file():
        subprocess.run(
            [py, "-m", "villa.ingest", "coco", f"--images={raw / 'images'}", f"--instances={raw / 'instances.json'}",
             f"--captions={raw / 'captions.json'}", f"--out={data}", "--overwrite", "--no_progress"],
            check=True, cwd=REPO, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return data


def stage2_cmd(py, data, ckpt, task, cache_mb, workers, extra=()) -> list[str]:
    return [
        py, "-m", "villa.stage2", "experiment=stage2", f"data_dir={data}", f"checkpoint_dir={ckpt}",
        f"task_name={task}", f"stage_1_ckpt_dir={ckpt}/{Path(data).name}/stage1", "epochs=1", "device=cpu",
        "progress=false", f"image_cache_mb={cache_mb}", f"num_workers={workers}", *extra,
    ]  # fmt: skip


def epoch_seconds(run_dir: Path) -> dict:
    """The last epoch's seconds, from the ``metrics.csv`` the child process's ``fit`` wrote."""
    from villa.engine.training import read_metrics

    row = read_metrics(run_dir)[-1]
    return {"epoch_s": row["seconds"], "data_s": row["data_seconds"]}


def scale_rows(args, py: str, work: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        data = build(n, work, py)
        ckpt = work / "ckpt"
        steps = {
            "preprocess": [py, "preprocess/preprocess_dataset.py", f"--data_dir={data}", "--device=cpu", "--no_progress"],
            "stage1": [py, "-m", "villa.stage1", "experiment=stage1", f"data_dir={data}", f"checkpoint_dir={ckpt}",
                       "epochs=1", "device=cpu", "progress=false"],
            "stage2_default": stage2_cmd(py, data, ckpt, "stage2_default", 1024, 0, args.stage2_overrides),
            "stage2_stream": stage2_cmd(py, data, ckpt, "stage2_stream", 0, args.workers, args.stage2_overrides),
        }  # fmt: skip
        for step in args.steps:
            row = {"images": n, "step": step, **measure(steps[step], work / f"{step}_{n}.log")}
            if step.startswith("stage2"):
                row.update(epoch_seconds(ckpt / data.name / step))
            row["uptime"] = uptime()
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(work / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return rows


def throughput_rows(args, py: str, work: Path) -> list[dict]:
    """Stage-2 epoch time on DocMNIST, cached vs streaming, alternating in one run."""
    from villa.storage.paths import resolve_dataset_dir

    data = resolve_dataset_dir(args.docmnist)
    ckpt = work / "ckpt_docmnist"
    if not (data / "region_embs" / "manifest.json").is_file():
        subprocess.run(
            [py, "preprocess/preprocess_dataset.py", f"--data_dir={data}", "--no_progress"],
            check=True,
            cwd=REPO,
        )
    if not (ckpt / data.name / "stage1" / "mapping_train.feather").is_file():
        subprocess.run(
            [py, "-m", "villa.stage1", "experiment=stage1", f"data_dir={data}", f"checkpoint_dir={ckpt}", "epochs=1",
             "device=cpu", "progress=false"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    variants = {
        "cached": stage2_cmd(py, data, ckpt, "cached", 1024, 0, args.stage2_overrides),
        "streaming": stage2_cmd(py, data, ckpt, "streaming", 0, args.workers, args.stage2_overrides),
    }
    rows = []
    order = ["cached", "streaming", "streaming", "cached"] * ((args.repeats + 1) // 2)
    for i, name in enumerate(order[: 2 * args.repeats]):
        row = {
            "dataset": data.name,
            "variant": name,
            **measure(variants[name], work / f"docmnist_{name}_{i}.log"),
        }
        row.update(epoch_seconds(ckpt / data.name / name), uptime=uptime())
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(work / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000", type=lambda s: [int(v) for v in s.split(",") if v])
    parser.add_argument("--steps", default=",".join(STEPS), type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streaming runs")
    parser.add_argument(
        "--docmnist", default=None, help="DocMNIST set for the throughput comparison (skipped if unset)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="cached/streaming pairs in the throughput comparison"
    )
    parser.add_argument("--work", default="/tmp/villa_scale", type=Path)
    parser.add_argument(
        "--stage2_overrides", default="", type=lambda s: s.split(), help="extra Hydra overrides for stage 2"
    )
    args = parser.parse_args()
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        raise SystemExit(f"unknown steps {bad}: use {', '.join(STEPS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    print(f"machine: {machine()}\nstart: {uptime()}", flush=True)
    rows = scale_rows(args, py, args.work) if args.sizes else []
    through = throughput_rows(args, py, args.work) if args.docmnist else []

    print(f"\nmachine: {machine()}\nend: {uptime()}\n")
    if rows:
        print(
            "| images | step | peak RSS (largest process) | peak tree PSS | processes | wall | epoch | load (1 min, start/end) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            epoch = f"{r['epoch_s']:.0f} s" if "epoch_s" in r else ""
            print(
                f"| {r['images']:,} | {r['step']} | {r['peak_rss_mb']:,} MB | {r['peak_tree_pss_mb']:,} MB | "
                f"{r['processes']} | {r['wall_s']:.0f} s | {epoch} | {r['load_1min'][0]} / {r['load_1min'][1]} |"
            )
        by = {(r["images"], r["step"]): r["peak_rss_mb"] for r in rows}
        if len(args.sizes) > 1:
            small, large = min(args.sizes), max(args.sizes)
            for step in args.steps:
                if (small, step) in by and (large, step) in by:
                    print(
                        f"{step}: {large:,} / {small:,} images peak RSS ratio {by[large, step] / by[small, step]:.2f}"
                    )
    if through:
        print(
            "\n| variant | stage-2 epoch (metrics.csv) | waiting for data | wall | peak RSS | peak tree PSS | load |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in through:
            print(
                f"| {r['variant']} | {r['epoch_s']:.1f} s | {r['data_s']:.1f} s | {r['wall_s']:.0f} s | "
                f"{r['peak_rss_mb']:,} MB | {r['peak_tree_pss_mb']:,} MB | {r['load_1min'][0]} / {r['load_1min'][1]} |"
            )

        def mean(variant: str) -> float:
            times = [r["epoch_s"] for r in through if r["variant"] == variant]
            return sum(times) / max(1, len(times))

        print(f"streaming / cached epoch time: {mean('streaming') / mean('cached'):.3f}")
    print("\ncommands:")
    for r in rows + through:
        print("  " + r["command"])


if __name__ == "__main__":
    main()

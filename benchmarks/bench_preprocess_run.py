"""Whole preprocessing runs: this tree against a baseline commit, in one run, on the same dataset.

    python benchmarks/bench_preprocess_run.py --data-dir DIR [--baseline-rev d0f7810] [--repeats 2]
        [--encoder default] [--threads 0]

Each measurement is :func:`villa.features.preprocess.preprocess_dataset` (every split: text embeddings, region
embeddings and, for the untrained towers, the rich descriptor) in a fresh worker process (this file with
``--worker``), writing into its own scratch copy of the dataset (annotations copied, images linked; the
dataset itself is never written). ``current`` imports ``villa`` from a copy of this tree's package taken at
the start, ``baseline`` from ``git archive <baseline-rev> villa`` (see ``_trees.py``); the sides alternate
``--repeats`` times. Printed per run: wall seconds of the call, its text and region seconds and the model's
forward seconds (the function's own timings), regions/s and peak RSS; then the medians, their ratio, and the
largest difference between the two sides' region and text embeddings (they must agree to float rounding:
``TOL``; the script exits 1 when they do not).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _trees import baseline_tree, current_tree, rev_parse, worker_env
from bench_preprocess import scratch_copy

TOL = 1e-4  # largest |difference| of an embedding entry, relative to the largest entry
KEYS = ("seconds", "text_seconds", "region_seconds", "forward_seconds")


def worker(args) -> None:
    import numpy as np
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import villa
    from villa.features.embeddings import RegionEmbeddings, TextEmbeddingCache
    from villa.features.preprocess import preprocess_dataset

    data = scratch_copy(Path(args.data_dir), Path(args.scratch))
    start = time.perf_counter()
    summary = preprocess_dataset(data, encoder=args.encoder, device="cpu", progress=False)
    wall = time.perf_counter() - start
    regions = RegionEmbeddings.open(data)
    ids = sorted(regions.mapping["image_id"].tolist())
    region_rows = regions.gather_packed(ids)[0].numpy()
    text = TextEmbeddingCache.open(data)
    order = sorted(text.index)
    np.save(Path(args.out).with_suffix(".regions.npy"), region_rows)
    np.save(Path(args.out).with_suffix(".text.npy"), text.embs[[text.index[t] for t in order]])
    out = {
        "villa_file": villa.__file__,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **{k: summary.get(k) for k in (*KEYS, "num_images", "num_regions", "regions_per_s")},
    }
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--baseline-rev", default="d0f7810")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encoder", default="default")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in each worker; 0: torch's default"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import numpy as np

    data_dir = Path(args.data_dir).resolve()
    from villa.engine.environment import cpu_model

    rev = rev_parse(args.baseline_rev)
    cpu = cpu_model()
    print(
        f"preprocessing {data_dir}, encoder {args.encoder}; baseline git {rev[:7]}, current = this tree; {cpu}"
    )
    results: dict[str, list[dict]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_run_") as tmp:
        tmp = Path(tmp)
        trees = {
            "baseline": baseline_tree(rev, Path(tempfile.mkdtemp(dir=tmp))),
            "current": current_tree(Path(tempfile.mkdtemp(dir=tmp))),
        }
        for i in range(args.repeats):
            for label in ("baseline", "current"):
                out = tmp / f"{label}_{i}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
                       "--scratch", str(tmp / f"{label}_{i}"), "--data-dir", str(data_dir),
                       "--encoder", args.encoder, "--threads", str(args.threads)]  # fmt: skip
                subprocess.run(cmd, env=worker_env(trees[label]), check=True, cwd=tmp)
                r = json.loads(out.read_text())
                results[label].append(r)
                print(f"  {label:8s} wall {r['wall_s']:6.1f} s  text {r['text_seconds']:5.1f} s  regions "
                      f"{r['region_seconds']:5.1f} s (forward {r['forward_seconds']:5.1f} s)  "
                      f"{r['num_regions'] / r['region_seconds']:6.1f} regions/s  peak RSS {r['peak_rss_gb']:.2f} GB  "
                      f"threads {r['threads']}", flush=True)  # fmt: skip
        arrays = {
            label: [np.load(tmp / f"{label}_0.{kind}.npy") for kind in ("regions", "text")]
            for label in ("baseline", "current")
        }
    images = results["current"][0]["num_images"]
    print(
        f"\n| {images} images, {results['current'][0]['num_regions']} regions | baseline ({rev[:7]}) | current | ratio |"
    )
    print("|---|---|---|---|")
    for key in ("wall_s", *KEYS[1:]):
        base = statistics.median(r[key] for r in results["baseline"])
        cur = statistics.median(r[key] for r in results["current"])
        print(f"| {key} (median of {args.repeats}) | {base:.1f} | {cur:.1f} | **{base / cur:.2f}x** |")
    base = statistics.median(r["wall_s"] for r in results["baseline"])
    cur = statistics.median(r["wall_s"] for r in results["current"])
    print(f"| images/s | {images / base:.1f} | {images / cur:.1f} | |")
    problems = []
    for name, b, c in zip(("region", "text"), arrays["baseline"], arrays["current"]):
        rel = float(np.abs(b - c).max() / max(np.abs(b).max(), 1e-12)) if b.shape == c.shape else float("inf")
        print(f"{name} embeddings: largest difference {rel:.1e} of the largest entry (tolerance {TOL:g})")
        if rel > TOL:
            problems.append(name)
    if problems:
        print("EMBEDDINGS DIFFER: " + ", ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()

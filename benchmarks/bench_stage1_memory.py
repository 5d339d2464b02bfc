"""Stage-1 peak memory (RSS) follows the data, not its largest image or its vocabulary.

    PYTHONPATH=$PWD python benchmarks/bench_stage1_memory.py [--images 5000] [--dim 384] [--big-boxes 100]
        [--attributes 500] [--attributes-dim 256] [--baseline-tree DIR] [--work DIR]

Writes three synthetic, already preprocessed datasets into ``--work`` (a temporary folder by default; removed
afterwards) and runs the real stage 1 (``villa.mapping.run.run_stage1``: training, then the mapping of every
split with its metrics) on each in a fresh process, reporting that process's peak RSS:

- ``base``: ``--images`` images (70/15/15 train/val/test) of 1 to 9 regions each, 20 attributes, ``--dim``-d
  region embeddings, region labels (so the mapping metrics run too), one sentence per attribute in the text;
- ``big``: the same set, except that its first training image has ``--big-boxes`` regions;
- ``vocab``: the same images with ``--attributes`` attributes and ``--attributes-dim``-d embeddings.

Goals: ``big`` within 10% of ``base``; ``vocab`` under 3 GB. The mapping model holds ``2 K (D^2 + D)``
parameters, and training keeps four copies (weights, gradients, AdamW's two moments) plus checkpoint
snapshots, whatever the data: the ``vocab`` set's dimension is chosen so that the data, not the model, is
what the figure measures (the line "model state" prints that share).

``--baseline-tree DIR`` runs the same datasets with another checkout's ``villa`` (e.g. a ``git worktree`` of an
older commit) in the same way, for a before/after table. Each run is one epoch at batch 48 on one thread
(``--threads``); the figures are peak RSS of the whole process (Python, torch and the data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
GB = 1e9


def make_dataset(
    root: Path, images: int, attributes: int, dim: int, big_boxes: int = 0, seed: int = 0
) -> dict:
    """A preprocessed dataset (annotations, vocabulary, region and attribute embeddings) at ``root``.

    Region counts, labels and embeddings come from ``seed`` alone, so sets of one seed differ only where the
    arguments say (``big_boxes``: the first image's region count; ``attributes``/``dim``). Returns its sizes."""
    import torch

    from villa.datasets import Vocabulary, write_dataset
    from villa.features.embeddings import save_attr_embs, write_region_embeddings

    rng = np.random.default_rng(seed)
    names = [f"attr{k:03d}" for k in range(attributes)]
    counts = rng.integers(1, 10, images)
    if big_boxes:
        counts[0] = big_boxes
    total = int(counts.sum())
    # each region carries one or two attributes; an image's text mentions all of its regions' attributes
    first = rng.integers(0, attributes, total)
    second = np.where(rng.random(total) < 0.5, rng.integers(0, attributes, total), -1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    labels = [[names[a]] + ([names[b]] if b >= 0 and b != a else []) for a, b in zip(first, second)]
    splits = np.asarray(["train", "val", "test"])[
        np.searchsorted([0.70, 0.85], rng.random(images), side="right")
    ]
    splits[0] = "train"
    rows = {k: [] for k in ("image_id", "image_filepath", "image_size", "split", "text", "region_coord",
                            "num_regions", "reg_to_attr")}  # fmt: skip
    for i in range(images):
        regions = labels[bounds[i] : bounds[i + 1]]
        mentioned = sorted({a for region in regions for a in region})
        side = 10 if counts[i] > 9 else 3  # a grid of 84-pixel cells
        rows["image_id"].append(i)
        rows["image_filepath"].append(f"images/{i:06d}.png")
        rows["image_size"].append([84 * side, 84 * side])
        rows["split"].append(str(splits[i]))
        rows["text"].append(" . ".join(f"the value is {a}" for a in mentioned))
        rows["region_coord"].append(
            [
                [84 * (c % side), 84 * (c // side), 84 * (c % side) + 84, 84 * (c // side) + 84]
                for c in range(counts[i])
            ]
        )
        rows["num_regions"].append(int(counts[i]))
        rows["reg_to_attr"].append(regions)
    root.mkdir(parents=True)
    write_dataset(root, rows, Vocabulary.from_names(names), source="bench_stage1_memory")
    directions = rng.normal(size=(attributes, dim)).astype(np.float32)
    embs = directions[first] + np.where((second >= 0)[:, None], directions[second], 0)  # [M, D]
    embs += 0.3 * rng.normal(size=embs.shape).astype(np.float32)
    write_region_embeddings(root, np.arange(images), counts, embs, encoder="default")
    attr = torch.from_numpy(rng.normal(size=(attributes, dim)).astype(np.float32))
    save_attr_embs(root, {a: attr[k] / attr[k].norm() for k, a in enumerate(names)})
    return {
        "images": images,
        "regions": total,
        "max_regions": int(counts.max()),
        "attributes": attributes,
        "dim": dim,
    }


def worker(data_dir: str, run_dir: str, epochs: int, threads: int) -> dict:
    """Stage 1 on ``data_dir`` in this (fresh) process; its peak RSS and wall seconds."""
    import resource

    import torch

    torch.set_num_threads(threads)
    from villa.mapping.run import run_stage1

    start = time.perf_counter()
    run_stage1(data_dir, run_dir, epochs=epochs, batch_size=48, device="cpu", progress=False, seed=0)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_bytes": peak_kib * 1024, "seconds": seconds}


def run_worker(tree: Path, data_dir: Path, run_dir: Path, epochs: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    out = run_dir.with_suffix(".json")
    cmd = [
        sys.executable,
        str(HERE),
        "--worker",
        str(data_dir),
        str(run_dir),
        str(out),
        str(epochs),
        str(threads),
    ]
    done = subprocess.run(cmd, env=env, cwd=run_dir.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"stage 1 failed with {tree} on {data_dir}:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        data_dir, run_dir, out, epochs, threads = sys.argv[2:7]
        Path(out).write_text(json.dumps(worker(data_dir, run_dir, int(epochs), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=384, help="region embedding size (the default encoder's)")
    parser.add_argument("--big-boxes", type=int, default=100)
    parser.add_argument("--attributes", type=int, default=500)
    parser.add_argument("--attributes-dim", type=int, default=256, help="embedding size of the vocab set")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--baseline-tree", default=None, help="another checkout whose villa runs the same sets"
    )
    parser.add_argument(
        "--work", default=None, help="folder for the datasets and runs (default: a temporary one)"
    )
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_stage1_memory."))
    work.mkdir(parents=True, exist_ok=True)
    from villa.engine.environment import cpu_model  # (not at the top: the worker may run an older villa tree)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{args.threads} thread(s), python {platform.python_version()}", flush=True)  # fmt: skip
    try:
        sets = {
            "base": make_dataset(work / "data" / "base", args.images, 20, args.dim),
            "big": make_dataset(work / "data" / "big", args.images, 20, args.dim, big_boxes=args.big_boxes),
            "vocab": make_dataset(work / "data" / "vocab", args.images, args.attributes, args.attributes_dim),
        }
        trees = {"villa": REPO}
        if args.baseline_tree:
            trees = {"baseline": Path(args.baseline_tree).resolve(), **trees}
        results = {}
        for label, tree in trees.items():
            for name, sizes in sets.items():
                run_dir = work / "runs" / f"{label}_{name}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                results[label, name] = run_worker(
                    tree, work / "data" / name, run_dir, args.epochs, args.threads
                )
                peak = results[label, name]["peak_rss_bytes"]
                print(f"{label:8s} {name:5s} {sizes['images']} images, {sizes['regions']} regions (largest "
                      f"{sizes['max_regions']}), {sizes['attributes']} attributes, dim {sizes['dim']}: peak RSS "
                      f"{peak / GB:.2f} GB, {results[label, name]['seconds']:.0f} s", flush=True)  # fmt: skip
        vocab = sets["vocab"]
        model_state = 4 * 2 * vocab["attributes"] * (vocab["dim"] ** 2 + vocab["dim"]) * 4
        print(f"model state of the vocab set (weights, gradients, AdamW moments): {model_state / GB:.2f} GB")
        for label in trees:
            base, big = (results[label, s]["peak_rss_bytes"] for s in ("base", "big"))
            vocab_peak = results[label, "vocab"]["peak_rss_bytes"]
            print(
                f"{label:8s} one {args.big_boxes}-box image: {big / base:.3f}x the peak without it "
                f"(goal <= 1.10: {'met' if big <= 1.10 * base else 'NOT met'});  {args.attributes} attributes: "
                f"{vocab_peak / GB:.2f} GB (goal < 3 GB: {'met' if vocab_peak < 3 * GB else 'NOT met'})"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

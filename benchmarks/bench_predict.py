"""Prediction speed with the model loaded once: images/s of ``Model.ground`` on 640x480 images, 10 queries.

    python benchmarks/bench_predict.py [--model=villa/example_model] [--images=20] [--proposals=100] [--queries=10]
        [--threads=1,2]

Measured in this process, per image (each image a fresh JPEG file, as ``python -m villa.predict`` reads them):

- ``ground, proposals:K``: ``model.ground(path, queries, "proposals:K")``: decode, propose, one tower forward for
  every proposal, score, NMS (the proposer may return fewer than K boxes: their mean count is printed);
- ``ground, K given boxes``: the same with exactly K boxes given (the proposer's, topped up with random boxes),
  so the tower embeds K regions;
- baselines: the proposer alone (``villa.regions.propose_regions``) and the bare tower forward
  (``model.image_model(images, boxes)``, K boxes, image already decoded and on the device).

Each torch thread count of ``--threads`` is measured in turn. The goal: at least 2 images/s on 2 CPU cores with
the ``default`` encoder. Prints the CPU model, core count and load average; on a shared machine wall times are
inflated (and extra threads can slow a contended machine down), so CPU milliseconds per image are printed too.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from villa.engine.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, items) -> tuple[float, float, list]:
    """(wall s per item, CPU s per item, results) of ``fn`` over ``items``."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = [fn(x) for x in items]
    n = max(len(items), 1)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "villa" / "example_model"))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--proposals", type=int, default=100)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument(
        "--threads", default="1,2", help="torch thread counts to measure (default: %(default)s)"
    )
    parser.add_argument("--work", default="/tmp/villa_bench_predict")
    args = parser.parse_args(argv)

    import torch

    import villa
    from villa.datasets.shapes import CATEGORIES, COLOURS, make_shapes_coco
    from villa.regions import propose_regions

    model = villa.load(args.model)
    folder = Path(args.work) / f"shapes_640x480_{args.images}"
    if not (folder / "captions.json").is_file():
        make_shapes_coco(folder, num_images=args.images + 2, seed=7, height=(480, 480), width=(640, 640),
                         object_size=(40, 120), progress=False)  # fmt: skip
    paths = sorted((folder / "images").glob("*.jpg"))
    warmup, paths = paths[:2], paths[2 : 2 + args.images]
    queries = [f"a {c} {s}" for c in COLOURS for s in CATEGORIES][: args.queries]
    spec = f"proposals:{args.proposals}"
    for p in warmup:
        model.ground(p, queries, spec)

    # the same K boxes per image for the "given boxes" and bare-tower rows
    rng = np.random.default_rng(0)
    fixed = []
    for p in paths:
        boxes = propose_regions(model.prepare(p).pixels, args.proposals).boxes
        extra = args.proposals - len(boxes)
        xy = rng.uniform(0, [600, 440], size=(extra, 2))
        wh = rng.uniform(20, 200, size=(extra, 2))
        filler = np.concatenate([xy, np.minimum(xy + wh, [640, 480])], 1).astype(np.float32)
        fixed.append(np.concatenate([boxes, filler])[: args.proposals])

    counts = [len(propose_regions(model.prepare(p).pixels, args.proposals).boxes) for p in paths]
    prepared = [model.prepare(p) for p in paths]

    @torch.no_grad()
    def bare(item):
        image, boxes = item
        rows = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes)], 1)
        return model.image_model(image.tower, rows)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"model: {model.source} (encoder {model.encoder_name}); {len(paths)} images 640x480, {len(queries)} queries, "
          f"{spec} (mean {np.mean(counts):.1f} boxes returned)\n")  # fmt: skip
    print("| torch threads | step | images/s (wall) | ms/image (wall) | CPU ms/image |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in str(args.threads).split(",")):
        torch.set_num_threads(threads)
        model.ground(warmup[0], queries, spec)
        ground_wall, ground_cpu, rows = timed(lambda p: model.ground(p, queries, spec), paths)
        given_wall, given_cpu, _ = timed(
            lambda pb: model.ground(pb[0], queries, pb[1]), list(zip(paths, fixed))
        )
        propose_wall, propose_cpu, _ = timed(
            lambda p: propose_regions(model.prepare(p).pixels, args.proposals), paths
        )
        tower_wall, tower_cpu, _ = timed(bare, list(zip(prepared, fixed)))
        for name, wall, cpu in (
            (f"**ground, {spec}**", ground_wall, ground_cpu),
            (f"ground, {args.proposals} given boxes", given_wall, given_cpu),
            (f"baseline: proposer alone ({spec})", propose_wall, propose_cpu),
            (f"baseline: bare tower forward, {args.proposals} boxes", tower_wall, tower_cpu),
        ):
            print(f"| {threads} | {name} | {1 / wall:.2f} | {1000 * wall:.0f} | {1000 * cpu:.0f} |")
    print(
        f"\nload average after: {os.getloadavg()[0]:.2f}; goal: >= 2 images/s for 'ground, {spec}' on 2 cores"
    )


if __name__ == "__main__":
    main()

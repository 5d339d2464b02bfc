"""Grounding quality on held-out shapes images: does the top-scoring box for a shape's prompt hit that shape?

    python benchmarks/bench_grounding.py [--villa=villa/example_model] [--clip=/tmp/villa_example/export_clip]
        [--encoder=default] [--images=300 --seed=1] [--regions=proposals] [--score=sigmoid|cosine] [--csv=FILE]

Held-out images come from ``python -m villa.datasets.shapes --seed=1`` (the example model trained on seed 0's
images), made here into ``--work``. For every image and every shape category its captions mention (the
vocabulary's text matcher, as in training) that is in the image, each model grounds the category's prompt
(``Model.ground``, top 1: the sigmoid score against the training vocabulary, with proposals its geometric mean
with the proposal's objectness; ``--score=cosine``: the box of highest raw cosine instead) among two candidate
sets:

- ``proposals``: the region proposer's boxes (``--regions``; the same boxes for every model);
- ``ground-truth boxes``: the image's own instance boxes (every shape of the image): which one is the star?

A hit is a top box with IoU >= 0.5 with a box of that category. Models: ViLLA (``--villa``), the CLIP baseline
trained the same way (``--clip``), and the encoder's untrained tower given the same vocabulary. Prints a table
(hit rates in percent, with the number of (image, shape) pairs) and the proposals' recall (the share of pairs for
which some proposal hits: the ceiling of the proposals column).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def heldout_set(work: Path, images: int, seed: int) -> tuple[Path, list[dict]]:
    """Make (once) the held-out set; return its folder and one record per image: path, boxes [N, 4] (x0, y0, x1,
    y1), category names [N], captions joined."""
    from villa.datasets.shapes import make_shapes_coco

    folder = work / f"shapes_heldout_seed{seed}_{images}"
    if not (folder / "captions.json").is_file():
        make_shapes_coco(folder, num_images=images, seed=seed, progress=False)
    instances = json.loads((folder / "instances.json").read_text())
    captions = json.loads((folder / "captions.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    records = {
        im["id"]: {"path": folder / "images" / im["file_name"], "boxes": [], "labels": [], "text": []}
        for im in instances["images"]
    }
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        records[ann["image_id"]]["boxes"].append([x, y, x + w, y + h])
        records[ann["image_id"]]["labels"].append(names[ann["category_id"]])
    for cap in captions["annotations"]:
        records[cap["image_id"]]["text"].append(cap["caption"])
    out = []
    for image_id in sorted(records):
        r = records[image_id]
        out.append({"path": r["path"], "boxes": np.asarray(r["boxes"], dtype=np.float64).reshape(-1, 4),
                    "labels": r["labels"], "text": " ".join(r["text"])})  # fmt: skip
    return folder, out


def _shown(source: str) -> str:
    """A model's source, relative to the repository when inside it."""
    path = Path(source)
    return (
        str(path.resolve().relative_to(ROOT))
        if path.is_absolute() and path.resolve().is_relative_to(ROOT)
        else source
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--villa", default=str(ROOT / "villa" / "example_model"), help="ViLLA model (run or export)"
    )
    parser.add_argument(
        "--clip", default="/tmp/villa_example/export_clip", help="CLIP baseline (run or export)"
    )
    parser.add_argument(
        "--encoder", default=None, help="untrained tower's encoder (default: the ViLLA model's)"
    )
    parser.add_argument("--images", type=int, default=300, help="held-out images (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=1, help="held-out seed, not the training seed 0 (default: 1)"
    )
    parser.add_argument("--regions", default="proposals", help="proposal spec (default: %(default)s)")
    parser.add_argument("--work", default="/tmp/villa_bench_grounding", help="where the held-out set is made")
    parser.add_argument("--score", default="sigmoid", choices=("sigmoid", "cosine"),
                        help="rank boxes by Model.ground's score (default) or by the raw cosine")  # fmt: skip
    parser.add_argument("--csv", default=None, help="also write the table here")
    args = parser.parse_args(argv)

    import villa
    from villa.regions import box_iou, parse_region_spec

    start = time.time()
    trained = {"ViLLA": villa.load(args.villa), "CLIP baseline": villa.load(args.clip)}
    vocabulary = trained["ViLLA"].vocabulary
    encoder = args.encoder or trained["ViLLA"].encoder_name
    models = {
        f"untrained tower ({encoder})": villa.load(f"untrained:{encoder}", vocabulary=vocabulary),
        **trained,
    }
    folder, records = heldout_set(Path(args.work), args.images, args.seed)
    spec = parse_region_spec(args.regions, ("proposals",), what="--regions")
    names = vocabulary.names
    mentioned = vocabulary.match_matrix([r["text"] for r in records])  # [N, K]

    hits = {name: {"proposals": 0, "boxes": 0} for name in models}
    pairs = recall = 0
    for r, mentions in zip(records, mentioned):
        present = set(r["labels"])
        queries = [n for n, m in zip(names, mentions) if m and n in present]
        if not queries:
            continue
        pairs += len(queries)
        prepared = {name: m.prepare(r["path"]) for name, m in models.items()}
        proposals = spec.boxes_for(image=next(iter(prepared.values())).pixels)
        truth = {q: r["boxes"][[lab == q for lab in r["labels"]]] for q in queries}
        for q in queries:
            recall += bool(len(proposals) and (box_iou(proposals, truth[q]) >= 0.5).any())
        for name, model in models.items():
            # proposals by their spec, so that ground weighs them by their objectness (the same boxes for every
            # model: the proposer is deterministic); the ground-truth boxes as given
            for kind, candidates in (("proposals", str(spec)), ("boxes", r["boxes"])):
                if not len(candidates) or (kind == "proposals" and not len(proposals)):
                    continue
                if args.score == "sigmoid":  # what Model.ground returns first
                    rows = model.ground(prepared[name], queries, candidates, top_k=1, nms_iou=None)
                    tops = [(row["query"], row["box"]) for row in rows]
                else:  # the raw cosine instead
                    boxes, labels, _, cosines = model.score(prepared[name], queries, candidates)
                    tops = [(q, boxes[int(np.argmax(cosines[:, j]))]) for j, q in enumerate(labels)]
                for query, box in tops:
                    hits[name][kind] += bool((box_iou([box], truth[query]) >= 0.5).any())

    table = [
        {
            "model": name,
            "source": _shown(models[name].source),
            "proposals_hit_rate": 100 * hits[name]["proposals"] / max(pairs, 1),
            "gt_boxes_hit_rate": 100 * hits[name]["boxes"] / max(pairs, 1),
            "pairs": pairs,
        }
        for name in models
    ]
    print(f"held-out shapes: {len(records)} images (python -m villa.datasets.shapes --seed={args.seed} "
          f"--images={args.images}, in {folder}), {pairs} (image, mentioned shape) pairs; regions {spec}; "
          f"boxes ranked by {args.score}")  # fmt: skip
    from villa.engine.environment import cpu_model

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min)")
    print()
    print(f"| model | top box hits the shape: among {spec} (%) | among the ground-truth boxes (%) |")
    print("|---|---|---|")
    for row in table:
        print(f"| {row['model']} | {row['proposals_hit_rate']:.1f} | {row['gt_boxes_hit_rate']:.1f} |")
    print(
        f"\nproposal recall (some proposal has IoU >= 0.5 with the shape): {100 * recall / max(pairs, 1):.1f}%"
    )
    print(f"({time.time() - start:.0f} s)")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()

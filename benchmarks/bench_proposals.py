"""Region proposals: recall of the ground-truth boxes and proposals per second, villa's proposer beside the
alternatives it was chosen over.

    python benchmarks/bench_proposals.py [--shapes=DIR] [--docmnist=DATASET_DIR] [--images=200] [--workers=2]

Data: a COCO-format shapes set (``--shapes``: a folder with ``images/`` and ``instances.json``; default: a fresh
``python -m villa.datasets.shapes --images=N --seed=1 --height=240-240 --width=320-320`` set of 320x240 JPEGs)
and a DocMNIST dataset folder (``--docmnist``; default: a fresh one from the generator, seed 1, ~100 test images),
whose ground-truth boxes are its grid cells. Recall: the fraction of ground-truth boxes that some proposal among
the image's top k overlaps with IoU >= 0.5 / 0.7.

Proposers compared (all deterministic, none with learned weights except the last):

- ``villa``: :func:`villa.regions.propose_regions` (selective-search grouping of Felzenszwalb segments, ranked by
  superpixel straddling x colour contrast, NMS 0.7);
- ``ss-level``: the same candidates ranked as selective search ranks them (by hierarchy level, later first);
- ``ss-straddling`` / ``ss-contrast``: the same candidates ranked by one cue alone;
- ``windows``: multi-scale sliding windows (sides 1/5..1 of the shorter image side, aspect 1:2, 1:1, 2:1,
  stride half a window) ranked by villa's objectness score;
- ``tower-energy``: the same windows ranked by ImageNet MobileNetV2 feature energy (mean channel norm of
  ``features[:14]`` inside the window minus in its ring): objectness from an image tower's own feature map.

Speed: images per second of ``villa`` in one process, and over ``--workers`` processes
(:func:`villa.regions.propose_for_files`, decoding included).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from villa.engine.environment import cpu_model
from villa.regions import box_iou, nms
from villa.regions import proposals as P

KS = (10, 25, 50, 100)
IOUS = (0.5, 0.7)


def load_shapes(folder: Path, limit: int) -> list[tuple[np.ndarray, np.ndarray, Path]]:
    data = json.loads((folder / "instances.json").read_text())
    boxes: dict[int, list] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    out = []
    for record in data["images"][:limit]:
        path = folder / "images" / record["file_name"]
        out.append(
            (np.asarray(Image.open(path).convert("RGB")), np.asarray(boxes.get(record["id"], [])), path)
        )
    return out


def load_docmnist(folder: Path, limit: int) -> list[tuple[np.ndarray, np.ndarray, Path]]:
    from villa.datasets import Dataset

    dataset = Dataset.open(folder)
    frame = dataset.annotations("test").head(limit)
    paths = dataset.image_paths(frame["image_filepath"].tolist())
    return [
        (np.asarray(Image.open(p).convert("RGB")), np.asarray([list(b) for b in coords], float), p)
        for p, coords in zip(paths, frame["region_coord"])
    ]


# --------------------------------------------------------------------------- the alternatives
def candidates(image: np.ndarray):
    """villa's candidate boxes (working pixels), their hierarchy level, the segment labels and histograms."""
    work, scale = P._working_image(image)
    labels = P._segment(work)
    sizes, boxes, hist = P._segment_stats(labels, work)
    every = P._hierarchical_boxes(labels, sizes, boxes, hist)
    level = np.arange(len(every), dtype=np.float64)  # later merges = higher levels
    rounded, first = np.unique(every, axis=0, return_index=True)
    keep = ((rounded[:, 2:] - rounded[:, :2]) >= P.MIN_SIDE).all(1)
    return rounded[keep], level[first][keep], labels, hist, work, scale


def cues(labels, hist, boxes):
    """(straddling, contrast) of ``boxes``, as villa's score computes them."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    rings = np.stack([boxes[:, 0] - widths / 2, boxes[:, 1] - heights / 2,
                      boxes[:, 2] + widths / 2, boxes[:, 3] + heights / 2], 1)  # fmt: skip
    sizes, inside, outer = P._label_counts(labels, boxes, rings)
    straddling = 1.0 - np.minimum(inside, sizes[:, None] - inside).sum(0) / np.maximum(inside.sum(0), 1)
    p, q = inside.T @ hist, (outer - inside).T @ hist
    has_ring = q.sum(1) > 0
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    q = q / np.maximum(q.sum(1, keepdims=True), 1e-12)
    contrast = np.where(has_ring, 0.5 * ((p - q) ** 2 / np.maximum(p + q, 1e-12)).sum(1), 0.0)
    return straddling, contrast


def windows(height: int, width: int) -> np.ndarray:
    out = []
    short = min(height, width)
    for fraction in (1.0, 0.75, 0.5, 1 / 3, 0.25, 0.2):
        for aspect in (1.0, 0.5, 2.0):
            w = min(width, fraction * short * np.sqrt(aspect))
            h = min(height, fraction * short / np.sqrt(aspect))
            xs = np.arange(0, width - w + 1e-6, max(w / 2, 1))
            ys = np.arange(0, height - h + 1e-6, max(h / 2, 1))
            gx, gy = np.meshgrid(xs, ys)
            out.append(np.stack([gx.ravel(), gy.ravel(), gx.ravel() + w, gy.ravel() + h], 1))
    return np.unique(np.round(np.concatenate(out)), axis=0)


class TowerEnergy:
    """Window objectness from ImageNet MobileNetV2's stride-16 feature map (no training, no labels)."""

    def __init__(self):
        from villa.encoders import get_encoder

        self.model = get_encoder("mobilenet_v2").build_image_model().eval()

    def energy(self, work: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(work)).permute(2, 0, 1)[None].float() / 255
            fmap = self.model.feature_map(x)[0]  # ImageNet-normalised, stride 16
        return fmap.norm(dim=0).numpy()  # [h/16, w/16]

    def scores(self, work: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        e = self.energy(work)
        gh, gw = e.shape
        integral = np.pad(e, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        h, w = work.shape[:2]

        def mean_in(b):
            x0 = np.clip(np.floor(b[:, 0] / w * gw), 0, gw).astype(int)
            x1 = np.clip(np.ceil(b[:, 2] / w * gw), 0, gw).astype(int)
            y0 = np.clip(np.floor(b[:, 1] / h * gh), 0, gh).astype(int)
            y1 = np.clip(np.ceil(b[:, 3] / h * gh), 0, gh).astype(int)
            total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            return total, np.maximum((x1 - x0) * (y1 - y0), 1)

        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        rings = np.stack(
            [boxes[:, 0] - bw / 2, boxes[:, 1] - bh / 2, boxes[:, 2] + bw / 2, boxes[:, 3] + bh / 2], 1
        )
        inner, inner_area = mean_in(boxes)
        outer, outer_area = mean_in(rings)
        ring_area = np.maximum(outer_area - inner_area, 1)
        return inner / inner_area - (outer - inner) / ring_area


def ranked(method: str, image: np.ndarray, tower: TowerEnergy | None) -> np.ndarray:
    """The top 100 boxes of ``method`` (image pixels), best first."""
    if method == "villa":
        return P.propose_regions(image, max(KS)).boxes
    boxes, level, labels, hist, work, scale = candidates(image)
    if method in ("windows", "tower-energy"):
        boxes = windows(*work.shape[:2])
    if method == "tower-energy":
        score = tower.scores(work, boxes)
    elif method == "ss-level":
        score = level
    else:
        straddling, contrast = cues(labels, hist, boxes)
        score = {"ss-straddling": straddling, "ss-contrast": contrast}.get(method, straddling * contrast)
    keep = nms(boxes, score, P.NMS_IOU)[: max(KS)]
    return boxes[keep] / scale


def recall_table(items, method: str, tower) -> dict:
    hits = {(k, t): 0 for k in KS for t in IOUS}
    total = 0
    start = time.perf_counter()
    for image, truth, _ in items:
        boxes = ranked(method, image, tower)
        total += len(truth)
        if len(truth) == 0:
            continue
        for k in KS:
            best = box_iou(truth, boxes[:k]).max(1) if len(boxes) else np.zeros(len(truth))
            for t in IOUS:
                hits[(k, t)] += int((best >= t).sum())
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "images/s": len(items) / seconds,
        **{f"R@{k} IoU{t}": 100 * hits[(k, t)] / max(total, 1) for k in KS for t in IOUS},
    }


def make_shapes(root: Path, images: int) -> Path:
    from villa.datasets.shapes import make_shapes_coco

    return make_shapes_coco(
        root / "shapes", images, seed=1, height=(240, 240), width=(320, 320), progress=False
    )


def make_docmnist(root: Path) -> Path:
    from villa.docmnist.generate import generate_docmnist

    result = generate_docmnist(attribute_budget=2000, target_sample_complexity=16, seed=1, val_attribute_budget=200,
                               test_attribute_budget=1500, data_root=root / "docmnist", progress=False)  # fmt: skip
    return result.dataset_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", type=Path, default=None)
    parser.add_argument("--docmnist", type=Path, default=None)
    parser.add_argument("--images", type=int, default=200, help="images per set (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel speed run")
    parser.add_argument("--methods", default="villa,ss-level,ss-straddling,ss-contrast,windows,tower-energy")
    args = parser.parse_args()
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    print(f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        shapes = args.shapes or make_shapes(Path(tmp), args.images)
        docmnist = args.docmnist or make_docmnist(Path(tmp))
        sets = {"shapes": load_shapes(shapes, args.images), "docmnist": load_docmnist(docmnist, args.images)}
        methods = [m for m in args.methods.split(",") if m]
        tower = TowerEnergy() if "tower-energy" in methods else None
        for name, items in sets.items():
            height, width = items[0][0].shape[:2]
            rows = [recall_table(items, m, tower) for m in methods]
            table = pd.DataFrame(rows).round(1)
            print(
                f"\n{name}: {len(items)} images ({width}x{height} first), {sum(len(t) for _, t, _ in items)} boxes"
            )
            print(table.to_string(index=False))
        paths = [p for _, _, p in sets["shapes"]]
        start = time.perf_counter()
        P.propose_for_files(paths, 50, workers=1, progress=False)
        one = len(paths) / (time.perf_counter() - start)
        start = time.perf_counter()
        P.propose_for_files(paths, 50, workers=args.workers, progress=False)
        many = len(paths) / (time.perf_counter() - start)
        print(f"\nvilla on the shapes files (decoding included): {one:.1f} images/s in one process, "
              f"{many:.1f} images/s over {args.workers} processes; load {os.getloadavg()[0]:.2f} at the end")  # fmt: skip


if __name__ == "__main__":
    main()

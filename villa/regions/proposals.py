"""The region proposer: candidate object boxes from pixels alone, with no learned weights, on a CPU.

This is the one place in villa that turns an image into candidate boxes; the importers
(``--regions=proposals``), zero-shot detection and prediction all call :func:`propose_regions`.

**Algorithm** (``docs/regions.md`` has the measurements behind each choice):

1. *Working resolution.* The image is resized (aspect kept, bilinear) so that its longer side is at most
   :data:`WORK_SIDE` pixels; boxes are scaled back at the end. Cost no longer grows with the image's size,
   so a 4000-pixel photo costs what a 320-pixel one does.
2. *Segmentation.* Felzenszwalb-Huttenlocher graph segmentation (scikit-image) with scale
   :data:`SEGMENT_SCALE`, smoothing sigma :data:`SEGMENT_SIGMA` and a smallest segment of 0.05% of the
   image (at least 10 pixels).
3. *Hierarchical grouping* (selective search, Uijlings et al., IJCV 2013): starting from the segments,
   the two adjacent regions with the highest similarity are merged until one region is left; the
   similarity is the sum of colour similarity (intersection of 25-bin-per-channel RGB histograms), size
   similarity (``1 - (size_i + size_j) / image``) and fill similarity (``1 - (bbox_ij - size_i - size_j)
   / image``). Every region of the hierarchy, segments included, gives its bounding box: the candidates.
   Boxes narrower or lower than :data:`MIN_SIDE` working pixels are dropped.
4. *Score* of a candidate box (the documented ranking): **superpixel straddling x colour contrast**, the
   objectness cues of Alexe et al. (TPAMI 2012) computed on the same segments. Straddling is
   ``1 - sum_s min(|s in box|, |s outside box|) / |box|`` over segments ``s``: 1 when no segment crosses
   the box's border. Colour contrast is the chi-squared distance between the colour histogram of the box
   and that of the ring around it (the box enlarged to twice its width and height, clipped to the image);
   0 for a box whose ring is empty (the whole image). Both lie in [0, 1], so does the score.
5. *Non-maximum suppression* at IoU :data:`NMS_IOU`, then the ``max_regions`` best boxes.

Same image, same boxes: every step is deterministic (ties keep the lower index).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from villa.storage.errors import VillaError

#: proposals per image when a spec gives no K (``--regions=proposals``)
DEFAULT_MAX_PROPOSALS = 30
#: the working resolution's longer side (pixels)
WORK_SIDE = 320
#: Felzenszwalb's scale (larger: larger segments) and Gaussian pre-smoothing
SEGMENT_SCALE = 100.0
SEGMENT_SIGMA = 0.8
#: smallest segment, as a fraction of the working image's pixels (and at least 10 pixels)
MIN_SEGMENT_FRACTION = 0.0005
#: candidate boxes must be at least this many working pixels wide and high
MIN_SIDE = 8
#: IoU above which a lower-scoring candidate is suppressed
NMS_IOU = 0.7
#: colour histogram bins per RGB channel (grouping similarity and colour contrast)
HISTOGRAM_BINS = 25
#: the score's label counts are taken on every STRIDE-th working pixel in each direction
_COUNT_STRIDE = 2
#: segments per block of the label-count integral images (bounds their memory)
_LABEL_BLOCK = 64


class Proposals(NamedTuple):
    """An image's proposals, best first: ``boxes`` float32 ``[K, 4]`` (x0, y0, x1, y1 in the pixels of the
    image as given) and ``scores`` float32 ``[K]`` in [0, 1]."""

    boxes: np.ndarray
    scores: np.ndarray


def smallest_image_side() -> int:
    """The smallest height or width that can hold a proposal (an image below it gets none)."""
    return MIN_SIDE


def propose_regions(image: np.ndarray, max_regions: int = DEFAULT_MAX_PROPOSALS) -> Proposals:
    """The ``max_regions`` best candidate boxes of ``image`` (uint8 ``[H, W, 3]``), best first.

    See the module docstring for the algorithm. An image smaller than :func:`smallest_image_side` in height
    or width has no proposal (empty arrays); any larger image has at least one (its whole extent is always
    a candidate).
    """
    if max_regions < 1:
        raise VillaError(f"the number of proposals must be at least 1, got {max_regions}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        return Proposals(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    work, scale = _working_image(image)
    labels = _segment(work)
    sizes, boxes, hist = _segment_stats(labels, work)
    candidates = _hierarchical_boxes(labels, sizes, boxes, hist)
    candidates = np.unique(candidates, axis=0)  # sorted rows: a deterministic order
    sides = candidates[:, 2:] - candidates[:, :2]
    candidates = candidates[(sides >= MIN_SIDE).all(1)]
    scores = _objectness(labels, hist, candidates)
    from villa.regions.boxes import nms

    keep = nms(candidates, scores, NMS_IOU)[:max_regions]
    out = candidates[keep] / scale
    out = np.minimum(out, [width, height, width, height])
    return Proposals(out.astype(np.float32), scores[keep].astype(np.float32))


# --------------------------------------------------------------------------- steps
def _working_image(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image at the working resolution and the factors ``[4]`` (sx, sy, sx, sy, each <= 1) that map box
    coordinates of the image to the working image's (per axis: rounding, and the smallest side kept at
    :data:`MIN_SIDE`, make them differ)."""
    height, width = image.shape[:2]
    scale = min(1.0, WORK_SIDE / max(height, width))
    if scale == 1.0:
        return image, np.ones(4)
    from PIL import Image

    size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=3.0))
    sx, sy = size[0] / width, size[1] / height
    return resized, np.array([sx, sy, sx, sy])


def _segment(work: np.ndarray) -> np.ndarray:
    """Felzenszwalb segment labels ``[h, w]`` int64, numbered 0..n-1."""
    from skimage.segmentation import felzenszwalb

    h, w = work.shape[:2]
    min_size = max(10, int(h * w * MIN_SEGMENT_FRACTION))
    labels = felzenszwalb(work, scale=SEGMENT_SCALE, sigma=SEGMENT_SIGMA, min_size=min_size)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(h, w).astype(np.int64)


def _segment_stats(labels: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment: pixel counts ``[n]``, bounding boxes ``[n, 4]`` (x0, y0, x1, y1, exclusive ends) and
    L1-normalised RGB histograms ``[n, 3 * HISTOGRAM_BINS]``."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n).astype(np.float64)
    ys, xs = np.divmod(np.arange(h * w), w)
    x0 = np.full(n, w, np.int64)
    y0 = np.full(n, h, np.int64)
    x1 = np.zeros(n, np.int64)
    y1 = np.zeros(n, np.int64)
    np.minimum.at(x0, flat, xs)
    np.minimum.at(y0, flat, ys)
    np.maximum.at(x1, flat, xs)
    np.maximum.at(y1, flat, ys)
    boxes = np.stack([x0, y0, x1 + 1, y1 + 1], 1).astype(np.float64)
    bins = HISTOGRAM_BINS
    quantised = np.minimum(work.reshape(-1, 3).astype(np.int64) * bins // 256, bins - 1)
    hist = np.concatenate(
        [np.bincount(flat * bins + quantised[:, c], minlength=n * bins).reshape(n, bins) for c in range(3)], 1
    ).astype(np.float64)
    hist /= np.maximum(hist.sum(1, keepdims=True), 1)
    return sizes, boxes, hist


def _adjacent_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of segments that touch horizontally or vertically, each once, sorted."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    differ = a != b
    low, high = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
    n = int(labels.max()) + 1
    pairs = np.unique(low * n + high)
    return np.divmod(pairs, n)


def _hierarchical_boxes(
    labels: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, hist: np.ndarray
) -> np.ndarray:
    """Selective search's greedy grouping: the bounding box ``[2n - 1, 4]`` of every region it forms.

    Each step merges the adjacent pair of highest similarity (colour + size + fill, each in [0, 1]);
    ties go to the pair created first (heap order on (similarity, i, j)). The loop runs n - 1 merges over
    a few hundred segments: Python-level, a few milliseconds.
    """
    n = len(sizes)
    total = float(labels.size)
    size = sizes.tolist()
    box = [b for b in boxes]
    colour = [h for h in hist]
    first, second = _adjacent_pairs(labels)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for i, j in zip(first.tolist(), second.tolist()):
        neighbours[i].add(j)
        neighbours[j].add(i)

    def similarity(i: int, j: int) -> float:
        bi, bj = box[i], box[j]
        union = (max(bi[2], bj[2]) - min(bi[0], bj[0])) * (max(bi[3], bj[3]) - min(bi[1], bj[1]))
        return (
            float(np.minimum(colour[i], colour[j]).sum())
            + (1.0 - (size[i] + size[j]) / total)
            + (1.0 - (union - size[i] - size[j]) / total)
        )

    heap = [(-similarity(i, j), i, j) for i, j in zip(first.tolist(), second.tolist())]
    heapq.heapify(heap)
    alive = [True] * n
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        merged = len(size)
        total_size = size[i] + size[j]
        size.append(total_size)
        bi, bj = box[i], box[j]
        box.append(np.array([min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])]))
        colour.append((colour[i] * size[i] + colour[j] * size[j]) / total_size)
        alive[i] = alive[j] = False
        alive.append(True)
        around = (neighbours[i] | neighbours[j]) - {i, j}
        neighbours.append(around)
        for k in sorted(around):
            neighbours[k].discard(i)
            neighbours[k].discard(j)
            neighbours[k].add(merged)
            heapq.heappush(heap, (-similarity(merged, k), merged, k))
    return np.asarray(box, dtype=np.float64).reshape(-1, 4)


def _objectness(labels: np.ndarray, hist: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Superpixel straddling x colour contrast ``[C]`` of candidate ``boxes [C, 4]`` (working pixels)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    rings = np.stack(
        [
            boxes[:, 0] - widths / 2,
            boxes[:, 1] - heights / 2,
            boxes[:, 2] + widths / 2,
            boxes[:, 3] + heights / 2,
        ],
        1,
    )
    sizes, inside, outer = _label_counts(labels, boxes, rings)  # [n], [n, C], [n, C]
    area = np.maximum(inside.sum(0), 1)
    straddling = 1.0 - np.minimum(inside, sizes[:, None] - inside).sum(0) / area
    box_hist = inside.T @ hist  # [C, 75]
    ring_hist = (outer - inside).T @ hist
    has_ring = ring_hist.sum(1) > 0
    p = box_hist / np.maximum(box_hist.sum(1, keepdims=True), 1e-12)
    q = ring_hist / np.maximum(ring_hist.sum(1, keepdims=True), 1e-12)
    chi2 = 0.5 * ((p - q) ** 2 / np.maximum(p + q, 1e-12)).sum(1)
    contrast = np.where(has_ring, chi2, 0.0)
    return np.clip(straddling, 0, 1) * np.clip(contrast, 0, 1)


def _label_counts(
    labels: np.ndarray, boxes: np.ndarray, rings: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of each segment: in total ``[n]``, inside each box ``[n, C]`` and inside each ring box
    ``[n, C]``, counted on the label map sampled every ``_COUNT_STRIDE`` pixels, from per-segment integral
    images built ``_LABEL_BLOCK`` segments at a time (memory: block x pixels / stride^2 int32)."""
    grid = labels[::_COUNT_STRIDE, ::_COUNT_STRIDE]
    h, w = grid.shape
    n = int(labels.max()) + 1

    def corners(b: np.ndarray) -> tuple[np.ndarray, ...]:
        c = np.clip(np.rint(b / _COUNT_STRIDE).astype(np.int64), 0, [w, h, w, h])
        return c[:, 0], c[:, 1], c[:, 2], c[:, 3]

    box_c, ring_c = corners(boxes), corners(rings)
    sizes = np.zeros(n, np.float64)
    inside = np.zeros((n, len(boxes)), np.float64)
    outer = np.zeros((n, len(boxes)), np.float64)
    ys, xs = np.mgrid[0:h, 0:w]
    for start in range(0, n, _LABEL_BLOCK):
        stop = min(n, start + _LABEL_BLOCK)
        in_block = (grid >= start) & (grid < stop)
        onehot = np.zeros((stop - start, h + 1, w + 1), np.int32)
        onehot[grid[in_block] - start, ys[in_block] + 1, xs[in_block] + 1] = 1
        integral = onehot.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
        sizes[start:stop] = integral[:, -1, -1]
        for out, (x0, y0, x1, y1) in ((inside, box_c), (outer, ring_c)):
            out[start:stop] = (
                integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
            )
    return sizes, inside, outer


# --------------------------------------------------------------------------- many images
def _propose_file(args: tuple[str, int]) -> Proposals | str:
    path, max_regions = args
    from villa.datasets.images import decode_image

    try:
        image = decode_image(path)
    except VillaError as err:
        return str(err)
    return propose_regions(image, max_regions)


def propose_for_files(
    paths: Sequence[str | os.PathLike],
    max_regions: int = DEFAULT_MAX_PROPOSALS,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> list[Proposals | str]:
    """:func:`propose_regions` for every image file, in order (a file that cannot be decoded gives its error
    line instead). ``workers`` processes share the work (default: the usable cores, at most 8; 0 or 1 runs
    in this process); results do not depend on it."""
    from tqdm.auto import tqdm

    jobs = [(str(Path(p)), int(max_regions)) for p in paths]
    if workers is None:
        workers = min(
            8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    bar = tqdm(total=len(jobs), desc="proposing regions", unit="img", disable=not progress)
    out: list[Proposals | str] = []
    try:
        if workers <= 1 or len(jobs) < 8:
            for job in jobs:
                out.append(_propose_file(job))
                bar.update()
        else:
            import multiprocessing

            # forked workers start at once and share the parent's imports; one torch thread each
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(workers, initializer=_one_thread) as pool:
                for result in pool.imap(_propose_file, jobs, chunksize=4):
                    out.append(result)
                    bar.update()
    finally:
        bar.close()
    return out


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass

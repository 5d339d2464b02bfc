"""Zero-shot detection: score every candidate region against every attribute prompt, evaluate with pycocotools.

The paper's real-world metric (COCO AP50 of zero-shot detection). Each candidate region (a region proposal,
a grid cell, or a given box) yields one detection per attribute: the region's box, the attribute as
category, and a score from the region/attribute embeddings (:func:`region_scores`). As in COCO detectors
(detectron2's ``TEST.DETECTIONS_PER_IMAGE``, RegionCLIP's zero-shot inference), each image's detections go
through per-class non-maximum suppression (IoU ``nms_iou``, default 0.5) and only the image's
``max_detections_per_image`` (COCO's 100) best across all attributes are kept. ``pycocotools.COCOeval`` (bbox)
then matches them to ground-truth objects per image and attribute, so a detection counts only when its box
overlaps an object carrying that attribute: COCO AP averages IoU thresholds .50:.95, AP50 takes IoU >= .5.

The cap also keeps a COCO-scale call tractable: pycocotools holds every detection as a Python dict (~1 KB
each), so 5,000 images x 20 regions x 80 attributes = 8M detections would need ~8 GB, while the top 100 per
image leave 500k. Before NMS each image keeps its ``PRE_NMS_PER_IMAGE`` best (region, attribute) pairs, as
detectors keep their top-k candidates before NMS, which bounds the NMS work per image.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from villa.storage.errors import VillaError

SCORES = ("sigmoid", "softmax", "cosine")
DEFAULT_TAU = 0.07
COCO_MAX_DETECTIONS = 100
#: IoU above which a detection of the same image and attribute with a lower score is suppressed
DEFAULT_NMS_IOU = 0.5
#: (region, attribute) candidates each image keeps before NMS (at least 10x the per-image cap)
PRE_NMS_PER_IMAGE = 1000
# pycocotools' "all" area range; the small/medium/large ranges are skipped (not reported; 4x the work).
_AREA_ALL = [0.0, 1e5**2]
_CHUNK = 16384  # regions per similarity block: bounds float64 memory for large M


def _array(x, name: str, dtype=None) -> np.ndarray:
    """A numpy array (no copy when already one of ``dtype``) from a list, array or (possibly GPU) tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise VillaError(f"{name} is not a numeric array: {err}") from None


def _int_ids(x, name: str, length: int | None = None) -> np.ndarray:
    arr = _array(x, name)
    if arr.ndim != 1:
        raise VillaError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and len(arr) != length:
        raise VillaError(f"{name} has {len(arr)} entries, expected {length}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise VillaError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _boxes(x, name: str, length: int) -> np.ndarray:
    arr = _array(x, name, np.float64)
    if arr.size == 0 and length == 0:
        arr = arr.reshape(0, 4)  # an empty list has shape (0,)
    if arr.ndim != 2 or arr.shape[1] != 4 or len(arr) != length:
        raise VillaError(f"{name} must have shape [{length}, 4] (x0, y0, x1, y1), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise VillaError(f"{name} holds non-finite coordinates")
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VillaError(
            f"{name}[{i}] = {arr[i].tolist()} is not (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0"
        )
    return arr


def _embeddings(x, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(_array(x, name, np.float64))
    if t.ndim != 2:
        raise VillaError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise VillaError(f"{name} holds non-finite values")
    return t


def region_scores(
    region_embs, attr_embs, score: str = "sigmoid", tau: float = DEFAULT_TAU, background_embs=None
) -> np.ndarray:
    """Scores ``[M, K]`` (float64) of every region for every text (attribute prompt or free-text query).

    region_embs ``[M, D]``, attr_embs ``[K, D]``, any scale (all are L2-normalised here).

    - ``"sigmoid"``: ``sigmoid((cos(r, a) - b(r)) / tau)``, where ``b(r)`` is the region's mean cosine to the
      ``background_embs`` ``[B, D]`` (default: the K texts themselves). Each text is scored on its own, so a
      text never needs competitors to get a meaningful score (an attribute alone in its kind, or a single
      query, is not 1.0 everywhere), and a region that resembles every text equally scores 0.5.
    - ``"softmax"``: softmax over the K texts of cosine / tau (the zero-shot classifier's probability of
      each text given the region, RegionCLIP's score): the texts compete.
    - ``"cosine"``: the cosine similarity.
    """
    if score not in SCORES:
        raise VillaError(f"unknown detection score '{score}': use one of {', '.join(SCORES)}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        tau = float("nan")
    if not (tau > 0 and math.isfinite(tau)):
        raise VillaError(f"tau must be a positive number, got {tau!r}")
    regions = _embeddings(region_embs, "region_embs")
    attrs = _embeddings(attr_embs, "attr_embs")
    if regions.shape[1] != attrs.shape[1]:
        raise VillaError(
            f"region_embs have dim {regions.shape[1]} but attr_embs have dim {attrs.shape[1]}: "
            "they must come from the same encoder"
        )
    attrs = torch.nn.functional.normalize(attrs.double(), dim=1)
    if background_embs is None:
        background = attrs.mean(0)  # mean cosine = cosine with the mean of the unit vectors
    else:
        bg = _embeddings(background_embs, "background_embs")
        if bg.shape[1] != attrs.shape[1] or len(bg) == 0:
            raise VillaError(f"background_embs must be [B >= 1, {attrs.shape[1]}], got {tuple(bg.shape)}")
        background = torch.nn.functional.normalize(bg.double(), dim=1).mean(0)
    out = np.empty((regions.shape[0], attrs.shape[0]), dtype=np.float64)
    # Blocks of regions: a float64 copy of all M x D embeddings would dominate memory at COCO scale.
    for start in range(0, regions.shape[0], _CHUNK):
        unit = torch.nn.functional.normalize(regions[start : start + _CHUNK].double(), dim=1)
        block = unit @ attrs.T
        if score == "softmax":
            block = torch.softmax(block / tau, dim=1)
        elif score == "sigmoid":
            block = torch.sigmoid((block - (unit @ background)[:, None]) / tau)
        out[start : start + len(block)] = block.numpy()
    return out


def with_objectness(scores: np.ndarray, objectness: np.ndarray) -> np.ndarray:
    """The geometric mean ``[M, K]`` of class scores ``[M, K]`` in [0, 1] and the regions' objectness ``[M]`` in
    [0, 1]: what a detection (or a grounded box) scores when its region comes from the region proposer."""
    return np.sqrt(np.clip(scores, 0, None) * np.clip(objectness, 0, None)[:, None])


def objects_from_multi_hot(image_ids, boxes, multi_hot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand multi-label objects into one ground-truth object per (box, attribute).

    image_ids ``[N]`` int, boxes ``[N, 4]``, multi_hot bool ``[N, K]`` -> (gt_image_ids ``[G]``,
    gt_boxes ``[G, 4]``, gt_labels ``[G]``) with G = multi_hot.sum(): a DocMNIST cell that is 'three', 'red',
    'circle' and 'small' becomes four objects with the same box, one per attribute class.
    """
    hot = _array(multi_hot, "multi_hot").astype(bool)
    ids = _int_ids(image_ids, "image_ids")
    if hot.ndim != 2 or len(hot) != len(ids):
        raise VillaError(f"multi_hot must have shape [{len(ids)}, K], got {tuple(hot.shape)}")
    box = _boxes(boxes, "boxes", len(ids))
    rows, labels = np.nonzero(hot)  # row-major: each box's attributes in vocabulary order
    return ids[rows], box[rows], labels.astype(np.int64)


def _top_per_image(scores: np.ndarray, image_ids: np.ndarray, k: int) -> np.ndarray:
    """Flat indices into ``scores [M, K]`` of each image's ``k`` best (region, attribute) pairs, ascending.

    Ties keep the lower flat index (stable sorts), so the kept set is deterministic; returning the indices
    in their original order keeps pycocotools' own (stable) tie-breaking independent of this step.
    """
    flat = scores.ravel()
    flat_img = np.repeat(image_ids, scores.shape[1])
    order = np.argsort(-flat, kind="stable")
    order = order[np.argsort(flat_img[order], kind="stable")]  # by image, best score first within it
    sorted_img = flat_img[order]
    starts = np.flatnonzero(np.r_[True, sorted_img[1:] != sorted_img[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < k])


def _select_detections(
    scores: np.ndarray,
    image_ids: np.ndarray,
    boxes: np.ndarray,
    nms_iou: float | None,
    max_per_image: int | None,
) -> np.ndarray:
    """Flat indices into ``scores [M, E]`` of the detections kept, ascending: per image the top
    ``PRE_NMS_PER_IMAGE`` (region, attribute) pairs, per-class NMS at ``nms_iou`` (None: none), then the
    ``max_per_image`` best (None: all). ``image_ids [M]``, ``boxes [M, 4]`` belong to the regions."""
    if scores.size == 0:
        return np.zeros(0, np.int64)
    if nms_iou is None:
        if max_per_image is None:
            return np.arange(scores.size)
        return _top_per_image(scores, image_ids, max_per_image)
    from villa.regions import nms

    candidates = (
        np.arange(scores.size)
        if max_per_image is None  # all detections are kept: so are all candidates
        else _top_per_image(scores, image_ids, max(PRE_NMS_PER_IMAGE, 10 * max_per_image))
    )
    regions, attrs = np.divmod(candidates, scores.shape[1])
    owner = image_ids[regions]
    order = np.argsort(owner, kind="stable")  # candidates grouped by image, ascending flat index within
    candidates, regions, attrs, owner = candidates[order], regions[order], attrs[order], owner[order]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    ends = np.r_[starts[1:], len(owner)]
    flat_scores = scores.ravel()
    kept = []
    for start, end in zip(starts.tolist(), ends.tolist()):  # one NMS call per image, over its candidates
        idx = slice(start, end)
        keep = nms(boxes[regions[idx]], flat_scores[candidates[idx]], nms_iou, groups=attrs[idx])
        if max_per_image is not None:
            keep = keep[:max_per_image]  # nms returns the best first
        kept.append(candidates[idx][keep])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _coco_anns(image_ids: np.ndarray, boxes: np.ndarray, cats: np.ndarray, scores=None) -> list[dict]:
    """pycocotools annotation dicts (ids from 1: COCOeval treats id 0 as 'unmatched'); boxes as [x, y, w, h]."""
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    area = (xywh[:, 2] * xywh[:, 3]).tolist()
    cols = zip(image_ids.tolist(), cats.tolist(), xywh.tolist(), area, strict=True)
    if scores is None:
        return [
            {"id": i, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": 0}
            for i, (im, c, b, a) in enumerate(cols, start=1)
        ]
    return [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": 0, "score": s}
        for i, ((im, c, b, a), s) in enumerate(zip(cols, scores.tolist(), strict=True), start=1)
    ]


def _coco(images: list[dict], categories: list[dict], anns: list[dict]):
    from pycocotools.coco import COCO

    # Built in memory rather than through COCO.loadRes: loadRes adds a polygon 'segmentation' to every
    # detection (memory that bbox evaluation never reads) and fails on an empty result list.
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": anns}
    coco.createIndex()
    return coco


def zero_shot_detection(
    region_embs,
    attr_embs,
    attribute_names: Sequence[str],
    region_image_ids,
    region_boxes,
    gt_image_ids,
    gt_boxes,
    gt_labels,
    image_sizes: Mapping[int, tuple[int, int]],
    *,
    score: str = "sigmoid",
    tau: float = DEFAULT_TAU,
    background_embs=None,
    region_objectness=None,
    nms_iou: float | None = DEFAULT_NMS_IOU,
    max_detections_per_image: int | None = COCO_MAX_DETECTIONS,
    attributes: Sequence[str] | None = None,
    verbose: bool = False,
) -> dict:
    """Zero-shot detection COCO AP (IoU .50:.95) and AP50, overall and per attribute, in percent.

    Inputs (numpy arrays, tensors or lists):

    - region_embs ``[M, D]``: embeddings of the M regions (any scale; normalised here).
    - attr_embs ``[K, D]``: text embeddings of the K attribute prompts; attribute_names ``[K]``.
    - region_image_ids ``[M]`` int and region_boxes ``[M, 4]`` (x0, y0, x1, y1 pixels): where each region
      is. Regions may be the ground-truth boxes or imported proposals (many then overlap no object).
    - gt_image_ids ``[G]`` int, gt_boxes ``[G, 4]`` (x0, y0, x1, y1), gt_labels ``[G]`` int in [0, K): the
      ground-truth objects, one per (box, attribute); a multi-label box appears once per label (see
      :func:`objects_from_multi_hot`).
    - image_sizes: image_id -> (height, width) for every evaluated image. These images are the COCO image
      set: detections in an image without ground truth are false positives, objects in an image without
      regions are missed.

    Options: ``score``, ``tau`` and ``background_embs`` as in :func:`region_scores` (``"sigmoid"``, the default,
    scores each attribute on its own; ``"softmax"`` makes the K attributes compete; ``"cosine"``); ``nms_iou``:
    per-class NMS within each image at this IoU (None: no NMS); ``max_detections_per_image``: keep each
    image's top detections across attributes after NMS (COCO's 100; None keeps all, memory ~1 KB per
    detection); ``region_objectness`` ``[M]`` in [0, 1] (optional, e.g. the region proposer's scores): a
    detection's score becomes the geometric mean of its class score and its region's objectness
    (:func:`with_objectness`; RegionCLIP's zero-shot inference with proposal scores), so that background
    regions rank below objects;
    ``attributes``: names of the attributes to evaluate (default all), the others still take part in the
    softmax but yield no detections; ``verbose``: let pycocotools print.

    Returns ``{"ap", "ap50", "num_detections", "num_gt", "num_images", "score", "nms_iou",
    "max_detections_per_image", "per_attribute": {name: {"ap", "ap50", "num_gt"}}}``. Per-attribute AP is None
    for an attribute without ground truth; the overall figures average the attributes with ground truth
    (pycocotools' mean over entries > -1) and are NaN when there is none (the evaluation report writes null).
    """
    from pycocotools.cocoeval import COCOeval

    names = [str(n) for n in attribute_names]
    if len(set(names)) != len(names):
        raise VillaError("attribute_names has duplicates")
    scores = region_scores(region_embs, attr_embs, score, tau, background_embs)
    num_regions, num_attrs = scores.shape
    if region_objectness is not None:
        objectness = _array(region_objectness, "region_objectness", np.float64).reshape(-1)
        if len(objectness) != num_regions or not np.isfinite(objectness).all() or (objectness < 0).any():
            raise VillaError(f"region_objectness must be {num_regions} finite values >= 0")
        if score == "cosine":
            raise VillaError("region_objectness needs a score in [0, 1]: use score='sigmoid' or 'softmax'")
        scores = with_objectness(scores, objectness)
    if num_attrs != len(names):
        raise VillaError(f"attr_embs has {num_attrs} rows but attribute_names has {len(names)} names")
    if num_attrs == 0:
        raise VillaError("no attributes to detect")
    reg_img = _int_ids(region_image_ids, "region_image_ids", num_regions)
    reg_box = _boxes(region_boxes, "region_boxes", num_regions)
    gt_img = _int_ids(gt_image_ids, "gt_image_ids")
    gt_box = _boxes(gt_boxes, "gt_boxes", len(gt_img))
    gt_lab = _int_ids(gt_labels, "gt_labels", len(gt_img))
    if gt_lab.size and (gt_lab.min() < 0 or gt_lab.max() >= num_attrs):
        raise VillaError(
            f"gt_labels must index the {num_attrs} attributes, got values in [{gt_lab.min()}, {gt_lab.max()}]"
        )
    if max_detections_per_image is not None and (
        isinstance(max_detections_per_image, bool)
        or not isinstance(max_detections_per_image, numbers.Integral)
        or max_detections_per_image < 1
    ):
        raise VillaError(
            f"max_detections_per_image must be a positive integer or None, got {max_detections_per_image!r}"
        )

    sizes = {}
    for key, hw in image_sizes.items():
        try:
            height, width = (int(v) for v in hw)
        except (TypeError, ValueError):
            raise VillaError(f"image_sizes[{key!r}] must be (height, width), got {hw!r}") from None
        sizes[int(key)] = (height, width)
    for ids, name in ((reg_img, "region_image_ids"), (gt_img, "gt_image_ids")):
        missing = np.setdiff1d(ids, np.fromiter(sizes, dtype=np.int64, count=len(sizes)))
        if missing.size:
            raise VillaError(
                f"{name} has {missing.size} image id(s) missing from image_sizes, e.g. {int(missing[0])}"
            )

    if attributes is None:
        evaluated = np.arange(num_attrs)
    else:
        index = {n: k for k, n in enumerate(names)}
        unknown = [a for a in attributes if a not in index]
        if unknown:
            raise VillaError(
                f"attributes to evaluate not among attribute_names: {', '.join(map(str, unknown))}"
            )
        evaluated = np.array(sorted({index[a] for a in attributes}), dtype=np.int64)
    scores = scores[:, evaluated]  # [M, E]
    keep_gt = np.isin(gt_lab, evaluated)
    gt_img, gt_box, gt_lab = gt_img[keep_gt], gt_box[keep_gt], gt_lab[keep_gt]

    if nms_iou is not None and not (isinstance(nms_iou, numbers.Real) and 0 < nms_iou <= 1):
        raise VillaError(f"nms_iou must be in (0, 1] or None, got {nms_iou!r}")
    flat = _select_detections(scores, reg_img, reg_box, nms_iou, max_detections_per_image)
    if max_detections_per_image is None:
        # COCOeval caps each (image, attribute) at maxDets: set it to the most regions any image has.
        max_dets = int(np.unique(reg_img, return_counts=True)[1].max()) if num_regions else 1
    else:
        max_dets = int(max_detections_per_image)
    det_region, det_col = np.divmod(flat, len(evaluated))

    # COCO category id = attribute index + 1 (COCO ids start at 1).
    images = [{"id": i, "height": h, "width": w} for i, (h, w) in sorted(sizes.items())]
    categories = [{"id": int(k) + 1, "name": names[k]} for k in evaluated]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = _coco(images, categories, _coco_anns(gt_img, gt_box, gt_lab + 1))
        dets = _coco_anns(
            reg_img[det_region], reg_box[det_region], evaluated[det_col] + 1, scores.ravel()[flat]
        )
        coco_dt = _coco(images, categories, dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(sizes)
        evaluator.params.catIds = [c["id"] for c in categories]
        evaluator.params.maxDets = [max_dets]
        evaluator.params.areaRng = [_AREA_ALL]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()

    # precision [T iou thresholds, R recall points, E categories, 1 area, 1 maxDets]; -1 = no ground truth.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    t50 = int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, 0.5))[0])

    def mean_pct(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean() * 100) if valid.size else float("nan")

    gt_counts = np.bincount(gt_lab, minlength=num_attrs)
    per_attribute = {}
    for e, k in enumerate(evaluated):  # E <= K entries: a loop over attributes, not detections
        has_gt = bool((precision[:, :, e] > -1).any())
        per_attribute[names[k]] = {
            "ap": mean_pct(precision[:, :, e]) if has_gt else None,
            "ap50": mean_pct(precision[t50, :, e]) if has_gt else None,
            "num_gt": int(gt_counts[k]),
        }
    return {
        "ap": mean_pct(precision),
        "ap50": mean_pct(precision[t50]),
        "num_detections": len(dets),
        "num_gt": len(gt_lab),
        "num_images": len(sizes),
        "score": score,
        "nms_iou": nms_iou,
        "max_detections_per_image": max_detections_per_image,
        "per_attribute": per_attribute,
    }


def format_detection(metrics: dict) -> str:
    """A small table: one row per attribute (AP, AP50, ground-truth objects), then the mean."""

    def cell(v) -> str:
        return "     -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"

    per = metrics.get("per_attribute", {})
    width = max([len("attribute"), *(len(n) for n in per)])
    lines = [
        f"zero-shot detection ({metrics.get('score')} scores, {metrics.get('num_detections')} detections, "
        f"{metrics.get('num_gt')} ground-truth objects)",
        f"  {'attribute':<{width}}      AP    AP50    #gt",
    ]
    lines += [f"  {n:<{width}}  {cell(m['ap'])}  {cell(m['ap50'])}  {m['num_gt']:5d}" for n, m in per.items()]
    lines.append(f"  {'mean':<{width}}  {cell(metrics.get('ap'))}  {cell(metrics.get('ap50'))}")
    return "\n".join(lines)

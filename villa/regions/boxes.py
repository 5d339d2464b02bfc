"""Box arithmetic shared by importers, the proposer, detection and prediction. Boxes are ``[x0, y0, x1, y1]``
pixel coordinates (x1 > x0, y1 > y0), float."""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[A, B]`` of boxes ``a [A, 4]`` and ``b [B, 4]``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def clip_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``[M, 4]`` boxes to their images (``heights``/``widths``: ``[M]`` or scalars); return (clipped,
    kept) where kept = positive area left (a box of zero area, or wholly outside its image, is dropped)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(1)
    boxes = np.nan_to_num(boxes)
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], 0, widths),
            np.clip(boxes[:, 1], 0, heights),
            np.clip(boxes[:, 2], 0, widths),
            np.clip(boxes[:, 3], 0, heights),
        ],
        axis=1,
    )
    kept = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, kept


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, groups: np.ndarray | None = None
) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    boxes ``[N, 4]``, scores ``[N]``; ``groups`` ``[N]`` int (optional): boxes of different groups never
    suppress each other (per-class NMS). A box is dropped when its IoU with a kept, better-scoring box of its
    group exceeds ``iou_threshold``. Ties in score keep the lower index first (stable), so the result is
    deterministic. Runs torchvision's NMS kernel.
    """
    import torch
    from torchvision.ops import batched_nms

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    # a stable order first: torchvision sorts by score alone, so equal scores would keep an unspecified order
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(order), dtype=np.float32)
    rank[order] = np.arange(len(order), 0, -1, dtype=np.float32)  # strictly decreasing in the stable order
    idxs = (
        torch.zeros(len(boxes), dtype=torch.int64) if groups is None else torch.from_numpy(np.asarray(groups))
    )
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(rank), idxs.long(), float(iou_threshold))
    return keep.numpy().astype(np.int64)

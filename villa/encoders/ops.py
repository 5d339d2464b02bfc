"""Operations the region image towers share: the recipe's RoIAlign and activation checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torchvision.ops import roi_align

#: RoI output size of the reference region recipe (RoIAlign to 14x14 on the stride-16 map)
ROI_SIZE = 14


def checkpointed(model: torch.nn.Module, fn: Callable, *args):
    """``fn(*args)``; when ``model.activation_checkpointing`` is set and the call trains (``model.training``,
    grad enabled), its activations are not kept for the backward pass but recomputed there
    (``torch.utils.checkpoint``, non-reentrant): less memory for one more forward of ``fn``.

    The recomputation runs with every BatchNorm's running statistics frozen, so a checkpointed model
    updates them once per step as without checkpointing: outputs, gradients and running statistics equal
    the plain forward's.
    """
    if not (getattr(model, "activation_checkpointing", False) and model.training and torch.is_grad_enabled()):
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _stats_frozen(model))
    )


@contextlib.contextmanager
def _stats_frozen(model: torch.nn.Module):
    """BatchNorm layers in training mode leave their running statistics and batch count untouched."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in norms
    ]
    for m in norms:
        # running = (1 - 0) * running + 0 * batch: unchanged (track_running_stats=False would make the
        # recomputation save other tensors than the forward did, which torch.utils.checkpoint refuses)
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def roi_align_boxes(
    features: torch.Tensor, boxes: torch.Tensor, image_width: int, size: int = ROI_SIZE
) -> torch.Tensor:
    """The recipe's RoIAlign: ``[B, C, h, w]`` maps and ``[M, 5]`` pixel boxes ``(batch index, x0, y0, x1, y1)`` of
    images ``image_width`` wide -> ``[M, C, size, size]`` in ``features.dtype`` (adaptive sampling, half-pixel
    aligned), computed in at least float32 as under autocast.

    When a gradient flows to ``features`` on a CPU this runs :func:`roi_align_separable` (the same values, to
    float rounding): torchvision's CPU backward kernel is serial and took about a third of a stage-2 training
    step on 2 cores, while the separable form's backward is two matrix products per image.
    """
    if features.device.type == "cpu" and features.requires_grad and torch.is_grad_enabled():
        return roi_align_separable(features, boxes, features.shape[-1] / image_width, size)
    # in at least float32, boxes included: a bf16 box coordinate past 256 px is rounded to 2 px
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        crops = roi_align(
            features.to(dtype),
            boxes.to(device=features.device, dtype=dtype),
            output_size=(size, size),
            spatial_scale=features.shape[-1] / image_width,
            sampling_ratio=0,
            aligned=True,
        )
    return crops.to(features.dtype)


@torch.compiler.disable  # its per-image loop sizes come from the boxes: a compiled graph would specialise on each
def roi_align_separable(
    features: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, size: int = ROI_SIZE
) -> torch.Tensor:
    """RoIAlign (``aligned=True``, ``sampling_ratio=0``) as ``Wy[m] @ features[b_m, c] @ Wx[m].T``.

    Args:
        features: ``[B, C, h, w]`` (channels-last memory reads without a copy).
        boxes: ``[M, 5]`` rows ``(batch_index, x0, y0, x1, y1)`` in image pixels.
        spatial_scale: feature pixels per image pixel.
    Returns:
        ``[M, C, size, size]`` in ``features.dtype`` (channels-last memory), computed in at least float32 like
        torchvision's RoIAlign under autocast. Per image, one matrix product over x for all its regions and one
        batched product over y; a region's row order in ``boxes`` is kept.
    """
    b, c, h, w = features.shape
    m = len(boxes)
    dtype = torch.promote_types(features.dtype, torch.float32)
    boxes = boxes.to(device=features.device, dtype=torch.promote_types(dtype, boxes.dtype))
    image_of_box = boxes[:, 0].long()
    order = torch.argsort(image_of_box, stable=True)
    in_order = bool((order == torch.arange(m, device=order.device)).all())
    if not in_order:
        boxes, image_of_box = boxes[order], image_of_box[order]
    wy, wx = roi_align_axis_weights(boxes, spatial_scale, h, w, size)  # [M, S, h], [M, S, w]
    wy, wx = wy.to(dtype), wx.to(dtype)
    # [h, w, C] per image: views when channels-last; unbind's backward is one stack, not one full-size add per image
    per_image = features.permute(0, 2, 3, 1).unbind(0)
    crops, start = [], 0
    with torch.autocast(features.device.type, enabled=False):
        for image, count in enumerate(torch.bincount(image_of_box, minlength=b).tolist()):
            if not count:
                continue
            mine = slice(start, start + count)
            start += count
            # x: [1, n * S, w] @ [h, w, C] -> [h, n * S, C]; then y: [n, S, h] @ [n, h, S * C] -> [n, S, S * C]
            along_x = torch.matmul(wx[mine].reshape(1, count * size, w), per_image[image].to(dtype))
            along_x = along_x.view(h, count, size * c).transpose(0, 1)
            crops.append(torch.bmm(wy[mine], along_x))
    out = torch.cat(crops) if crops else features.new_zeros((0, size, size * c), dtype=dtype)
    if not in_order:
        out = out[torch.argsort(order)]
    return out.to(features.dtype).view(m, size, size, c).permute(0, 3, 1, 2)


def _axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, bins: int) -> torch.Tensor:
    """RoIAlign's bilinear weights along one axis, averaged over each bin's samples: ``[M, bins, size]``.

    Mirrors torchvision's CPU/CUDA kernel for ``aligned=True, sampling_ratio=0``: ``ceil(length / bins)``
    samples per bin at ``start + bin * b + (i + 0.5) * b / grid``; a sample outside ``[-1, size]`` counts
    zero, one below 0 is clamped to 0, one at or past ``size - 1`` reads the last row only.
    ``start``/``length``: ``[M]`` in feature-map pixels.
    """
    bin_size = length / bins  # [M]
    grid = torch.ceil(length / bins).clamp(min=0)  # samples per bin; 0 for an empty box (output 0)
    samples = max(int(grid.max()), 1) if len(grid) else 1
    i = torch.arange(samples, dtype=start.dtype, device=start.device)
    b = torch.arange(bins, dtype=start.dtype, device=start.device)
    # same operation order as the kernel: start + bin * bin_size + (i + .5) * bin_size / grid
    pos = (
        start[:, None, None]
        + b[None, :, None] * bin_size[:, None, None]
        + (i + 0.5)[None, None, :] * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None]
    )  # [M, bins, samples]
    used = (i[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low, pos)
    frac = pos - low
    high = (low + 1).clamp(max=size - 1)
    scale = used.to(start.dtype) / grid.clamp(min=1)[:, None, None]
    weights = start.new_zeros((len(start), bins, size))
    weights.scatter_add_(2, low.long(), (1 - frac) * scale)
    weights.scatter_add_(2, high.long(), frac * scale)
    return weights


def roi_align_axis_weights(
    boxes: torch.Tensor, spatial_scale: float, height: int, width: int, output_size: int = ROI_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIAlign's (``aligned=True``, ``sampling_ratio=0``) y and x weights ``([M, S, H], [M, S, W])``.

    Every output bin of RoIAlign averages bilinear samples on a grid, and both the grid and the bilinear
    weights factor into a y part and an x part, so crop ``m`` is ``Wy[m] @ features[b_m, c] @ Wx[m].T``
    for every channel ``c`` (:func:`roi_align_matrices` makes that one matrix per region).

    Args:
        boxes: ``[M, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
        spatial_scale: feature pixels per image pixel.
        height, width: the feature map's size.
    """
    # aligned=True: pixel centres at +0.5; at least float32, like the RoIAlign kernels (float64 stays float64)
    coords = boxes[:, 1:].to(torch.promote_types(boxes.dtype, torch.float32)) * spatial_scale - 0.5
    wy = _axis_weights(coords[:, 1], coords[:, 3] - coords[:, 1], height, output_size)
    wx = _axis_weights(coords[:, 0], coords[:, 2] - coords[:, 0], width, output_size)
    return wy, wx

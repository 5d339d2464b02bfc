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
    images ``image_width`` wide -> ``[M, C, size, size]`` (adaptive sampling, half-pixel aligned)."""
    return roi_align(
        features,
        boxes.to(device=features.device, dtype=features.dtype),
        output_size=(size, size),
        spatial_scale=features.shape[-1] / image_width,
        sampling_ratio=0,
        aligned=True,
    )

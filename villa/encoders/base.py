"""The encoder abstraction and its registry.

An :class:`Encoder` is a *pair*: a text tower (``encode_text``) and the recipe for a region image
tower (``build_image_model``), both producing vectors of the same dimension ``dim``. Encoders are
selected by name through :func:`villa.encoders.get_encoder`; a new one is a class decorated with
:func:`register_encoder`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torchvision.ops import roi_align

from villa.errors import VillaError

if TYPE_CHECKING:
    from villa.encoders.clip_resnet import RegionImageEncoder

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


class Encoder(abc.ABC):
    """A text tower plus the recipe of a region image tower, both ``dim``-dimensional.

    Attributes:
        name: the registry name; it is written into embedding manifests and checked by later stages.
        dim: embedding dimension D of both towers.
        config: JSON-able dict, enough to rebuild the encoder (``get_encoder(**config)``-style keys).
        device: the device of the text tower.
    """

    name: str
    dim: int
    device: torch.device
    #: stage-1 region embeddings written by preprocessing: ``"reference"`` (the reference recipe, docs/method.md section 3.2, through
    #: ``build_image_model()``) or ``"rich"`` (:mod:`villa.encoders.rich`, for untrained towers)
    default_region_features: str = "reference"
    #: resize policy applied when images are decoded (never inside the model): upscale so that the
    #: shorter side is at least this many pixels; None leaves small images as they are
    image_min_side: int | None = None
    #: resize policy applied when images are decoded: downscale so that the longer side is at most
    #: this many pixels; None leaves large images as they are
    image_max_side: int | None = None

    @property
    @abc.abstractmethod
    def config(self) -> dict:
        """JSON-able description of this encoder (name, weights, architecture)."""

    @property
    def has_text_tower(self) -> bool:
        """False when the weights hold no text tower (e.g. a visual-only CLIP checkpoint)."""
        return True

    @abc.abstractmethod
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embed ``texts``: float32 ``[N, D]`` on CPU, NOT normalised, no grad."""

    @property
    def text_token_limit(self) -> int | None:
        """The most tokens the text tower reads (special tokens included): :meth:`encode_text` truncates
        longer texts. None: no limit known."""
        return None

    def count_text_tokens(self, texts: list[str]) -> list[int]:
        """How many tokens each text has for the text tower, special tokens included, before truncation
        (compare with :attr:`text_token_limit`). Towers without a limit return zeros."""
        return [0] * len(texts)

    @abc.abstractmethod
    def build_image_model(self) -> RegionImageEncoder:
        """A fresh region image tower (on CPU, eval mode) holding this encoder's initial weights.

        Any ``nn.Module`` with ``output_dim`` and ``forward(images [B, 3, H, W] in [0, 1], boxes [M, 5])
        -> [M, D]`` (e.g. :class:`~villa.encoders.clip_resnet.RegionImageEncoder`).
        """


#: name -> factory(name, clip_weights, device) -> Encoder
_REGISTRY: dict[str, Callable[..., Encoder]] = {}
#: prefix (e.g. "hf:") -> factory(name, clip_weights, device) -> Encoder; the name carries the argument
_PREFIXES: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str, *, prefix: bool = False):
    """Class/function decorator: make ``factory(name=..., clip_weights=..., device=...)`` available.

    With ``prefix=True`` the factory serves every name starting with ``name`` (e.g. ``"hf:"``
    followed by a folder), and receives the full name.
    """

    def decorate(factory):
        table = _PREFIXES if prefix else _REGISTRY
        if name in table:
            raise ValueError(f"encoder '{name}' registered twice")
        table[name] = factory
        return factory

    return decorate


def registered_names() -> list[str]:
    """Registered encoder names; prefix families are shown as ``prefix<...>``."""
    return sorted(_REGISTRY) + [f"{p}<...>" for p in sorted(_PREFIXES)]


def lookup_factory(name: str) -> Callable[..., Encoder]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return factory
    raise VillaError(f"unknown encoder '{name}': choose one of {', '.join(registered_names())}")

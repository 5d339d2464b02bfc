"""The encoder abstraction and its registry.

An :class:`Encoder` is a *pair*: a text tower (``encode_text``) and the recipe for a region image
tower (``build_image_model``), both producing vectors of the same dimension ``dim``. Encoders are
selected by name through :func:`villa.encoders.get_encoder`; a new one is a class decorated with
:func:`register_encoder`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from villa.storage.errors import VillaError


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
    def encode_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        """Embed ``texts``: float32 ``[N, D]`` on CPU, NOT normalised, no grad; ``batch_size`` texts per forward
        (None: the tower's default)."""

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
    def build_image_model(self) -> torch.nn.Module:
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

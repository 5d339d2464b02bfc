"""Region image tower around CLIP's modified ResNet (imported from open_clip, not copied).

Reference recipe (docs/method.md section 3.2): images (float in [0, 1], no mean/std normalisation) go through
the stem and layer1-3; every region box is RoIAligned (14x14, ``spatial_scale = feat_w / img_w``,
``sampling_ratio=0``, ``aligned=True``) from that feature map; the crops go through layer4 (stride 2
-> 7x7) and the attention pool (built for ``image_size=224``, i.e. a 7x7 grid).

``RegionImageEncoder.forward`` computes exactly that function (to float32 rounding) in a cheaper order
when the feature map is small (DocMNIST: 5x5 maps, 14x14 crops): RoIAlign is linear in the feature map
and separable in y and x, so it is a per-region matrix ``[196, H*W]`` applied with one batched matmul
(no per-sample CPU loop, and its backward is a matmul too); and because it is linear, layer4's first
1x1 convolutions (``conv1`` and the downsample's conv) commute with it and run on the small per-image
map instead of on 196 (or 49) positions per region. See :func:`roi_align_matrices` and
:meth:`RegionImageEncoder.forward`; ``tests/test_stage2_speed.py`` checks outputs, gradients and BatchNorm
statistics against the reference recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from torch import nn

from villa.encoders.ops import ROI_SIZE, checkpointed, roi_align_axis_weights, roi_align_boxes

#: the attention pool's positional embedding is 7x7 (+1): RoIAlign 14x14 -> layer4 stride 2 -> 7x7
POOL_IMAGE_SIZE = 224


def build_modified_resnet(layers: Sequence[int], width: int, output_dim: int) -> ModifiedResNet:
    """open_clip's ``ModifiedResNet`` with CLIP's head count (``width * 32 // 64``) and a 7x7 pool."""
    return ModifiedResNet(
        layers=list(layers),
        output_dim=output_dim,
        heads=width * 32 // 64,
        image_size=POOL_IMAGE_SIZE,
        width=width,
    )


def attention_pool_first_token(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """Exactly ``pool(x)`` (open_clip's ``AttentionPool2d``), computed much more cheaply.

    The pool only returns the output of its first (mean) token, so only that token's query is
    needed. We fold the key projection into the query (``q . (W_k x + b_k) = (W_k^T q) . x + const``;
    the constant cancels in the softmax) and apply the value projection after the attention-weighted
    sum (the weights sum to 1), which avoids projecting all HW+1 tokens: ~15x fewer FLOPs for RN50.
    The token sequence ``[mean, x_1..x_HW] + positional`` is never built either: scores and the weighted
    sum are split into their spatial, mean-token and positional parts, so the only ``[M, HW, C]`` tensor
    read is ``x`` itself (a view when it is channels-last) and no copy of it is made.

    Args:
        pool: the attention pool whose parameters are used.
        x: feature map ``[M, C, H, W]`` with ``H * W + 1 == pool.positional_embedding.shape[0]``.
    Returns:
        ``[M, output_dim]``.
    """
    m, c, h, w = x.shape
    heads = pool.num_heads
    head_dim = c // heads
    spatial = x.permute(0, 2, 3, 1).reshape(m, h * w, c)  # [M, HW, C]
    pos = pool.positional_embedding.to(x.dtype)  # [1 + HW, C]
    first = spatial.mean(dim=1) + pos[0]  # the mean token [M, C]
    query = F.linear(first, pool.q_proj.weight, pool.q_proj.bias) * head_dim**-0.5  # [M, C]
    query = query.reshape(m, heads, head_dim)
    k_weight = pool.k_proj.weight.reshape(heads, head_dim, c).to(query.dtype)
    folded = torch.einsum("mhd,hdc->mhc", query, k_weight)  # [M, heads, C]
    score_first = torch.einsum("mhc,mc->mh", folded, first)[..., None]  # [M, heads, 1]
    score_rest = torch.bmm(folded, spatial.transpose(1, 2)) + folded @ pos[1:].T  # [M, heads, HW]
    # softmax in at least float32 (bf16/fp16 under autocast), float64 stays float64
    scores = torch.cat([score_first, score_rest], dim=-1)
    attn = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(x.dtype)
    attn_first, attn_rest = attn[..., :1], attn[..., 1:]
    pooled = (
        attn_first * first[:, None] + torch.bmm(attn_rest, spatial) + attn_rest @ pos[1:]
    )  # [M, heads, C]
    v_weight = pool.v_proj.weight.reshape(heads, head_dim, c).to(pooled.dtype)
    values = torch.einsum("mhc,hdc->mhd", pooled, v_weight) + pool.v_proj.bias.reshape(heads, head_dim)
    return F.linear(values.reshape(m, c), pool.c_proj.weight, pool.c_proj.bias)


def _kron(wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Per-region Kronecker product ``[M, Sy, H] x [M, Sx, W] -> [M, Sy * Sx, H * W]``."""
    m, sy, h = wy.shape
    sx, w = wx.shape[1:]
    return (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(m, sy * sx, h * w)


def roi_align_matrices(
    boxes: torch.Tensor, spatial_scale: float, height: int, width: int, output_size: int = ROI_SIZE
) -> torch.Tensor:
    """RoIAlign (``aligned=True``, ``sampling_ratio=0``) as one linear map per region ``[M, S * S, H * W]``.

    ``roi_align(features, boxes, output_size, spatial_scale, 0, True)`` equals
    ``apply_roi_matrices(features, boxes[:, 0].long(), roi_align_matrices(boxes, spatial_scale, H, W))``
    up to float rounding; row ``i * S + j`` of a matrix is output bin (i, j). Arguments as
    :func:`roi_align_axis_weights`.
    """
    return _kron(*roi_align_axis_weights(boxes, spatial_scale, height, width, output_size))


def apply_roi_matrices(
    features: torch.Tensor, batch_index: torch.Tensor, matrices: torch.Tensor
) -> torch.Tensor:
    """Crops ``[M, C, S, S]`` (channels-last memory) = ``matrices[m]`` applied to ``features[batch_index[m]]``.

    features ``[B, C, H, W]``; batch_index int64 ``[M]``; matrices ``[M, S * S, H * W]``. Like torchvision's
    RoIAlign under autocast, the interpolation runs in (at least) float32 and the crops come back in
    ``features.dtype``.
    """
    b, c, h, w = features.shape
    m, ss = matrices.shape[:2]
    s = math.isqrt(ss)
    per_image = features.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when channels-last
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        crops = torch.bmm(matrices.to(dtype), per_image[batch_index].to(dtype))  # [M, S*S, C]
    return crops.to(features.dtype).reshape(m, s, s, c).permute(0, 3, 1, 2)


def boxes_with_batch_index(boxes_per_image: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image boxes ``[R_i, 4]`` (x1, y1, x2, y2) into RoIAlign rows ``[sum R_i, 5]``."""
    counts = torch.tensor([len(b) for b in boxes_per_image])
    index = torch.repeat_interleave(torch.arange(len(boxes_per_image)), counts)
    flat = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image])
    return torch.cat([index[:, None].to(flat.dtype), flat], dim=1)


def _is_pointwise(conv: nn.Module) -> bool:
    """A bias-free 1x1 convolution: a linear map over channels only, so it commutes with RoIAlign."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.bias is None
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
    )


def _is_pool2(module: nn.Module) -> bool:
    """open_clip's stride-2 average pool (kernel 2, stride 2, no padding, floor mode)."""
    return (
        isinstance(module, nn.AvgPool2d)
        and module.kernel_size in (2, (2, 2))
        and module.stride in (2, (2, 2))
        and module.padding in (0, (0, 0))
        and not module.ceil_mode
    )


class RegionImageEncoder(nn.Module):
    """Region embeddings from whole images and pixel boxes (the reference recipe, docs/method.md section 3.2).

    ``self.visual`` is an open_clip ``ModifiedResNet``, so the state dict has CLIP's ``visual.*``
    key layout. Inputs are used as given (floats in [0, 1]); no CLIP mean/std normalisation,
    like the reference.
    """

    #: recompute activations in the backward pass instead of keeping them (:func:`villa.encoders.ops.checkpointed`):
    #: the stem, layer1-3 and the region head each one segment
    activation_checkpointing: bool = False

    def __init__(self, visual: ModifiedResNet):
        super().__init__()
        self.visual = visual
        self.output_dim = int(visual.output_dim)
        # The key bias shifts every attention logit of a query by the same constant, so it cancels in the
        # softmax: its gradient is exactly zero, and the fast pool never reads it. Freezing it keeps
        # DistributedDataParallel from waiting for a gradient that never comes.
        visual.attnpool.k_proj.bias.requires_grad_(False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Stem + layer1-3: ``[B, 3, H, W]`` -> ``[B, 16 * width, ~H/16, ~W/16]``."""
        v = self.visual
        # channels_last makes the CPU convolutions ~1.5x faster and suits tensor cores on CUDA
        x = images.to(dtype=v.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        for segment in (v.stem, v.layer1, v.layer2, v.layer3):
            x = checkpointed(self, segment, x)
        return x

    def region_features(self, features: torch.Tensor, boxes: torch.Tensor, image_width: int) -> torch.Tensor:
        """RoIAlign ``[M, 5]`` boxes on ``features`` -> ``[M, C, 14, 14]``."""
        return roi_align_boxes(features, boxes, image_width)

    def head(self, rois: torch.Tensor) -> torch.Tensor:
        """layer4 + attention pool: ``[M, C, 14, 14]`` -> ``[M, D]``."""
        x = self.visual.layer4(rois.contiguous(memory_format=torch.channels_last))
        return attention_pool_first_token(self.visual.attnpool, x)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Embed regions: ``head(region_features(feature_map(images), boxes))``, computed cheaply.

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1].
            boxes: ``[M, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in pixels.
        Returns:
            ``[M, D]`` region embeddings, not normalised.
        """
        if len(boxes) == 0:
            return images.new_zeros((0, self.output_dim))
        features = self.feature_map(images)
        width = images.shape[-1]
        if not self._fast_head_applies(features, len(boxes)):
            return checkpointed(
                self, lambda f, b: self.head(self.region_features(f, b, width)), features, boxes
            )
        return self._fast_head(features, boxes, width)

    def _fast_head_applies(self, features: torch.Tensor, num_boxes: int) -> bool:
        """The reordered head pays (and its per-region matrices stay small) when the map is small."""
        b, _, h, w = features.shape
        first = self.visual.layer4[0]
        return (
            isinstance(first, Bottleneck)
            and first.downsample is not None
            and len(first.downsample) == 3
            and _is_pool2(first.avgpool)
            and _is_pool2(first.downsample[0])
            and _is_pointwise(first.conv1)
            and _is_pointwise(first.downsample[1])
            and h * w <= ROI_SIZE * ROI_SIZE  # K [M, 196, HW] no larger than the crops themselves
            and b * h * w <= num_boxes * (ROI_SIZE // 2) ** 2  # 1x1 convs on maps cost less than on crops
        )

    def _fast_head(self, features: torch.Tensor, boxes: torch.Tensor, image_width: int) -> torch.Tensor:
        """``head(region_features(features, boxes, image_width))`` with layer4's first block reordered.

        Block 0 of layer4 (open_clip's ``Bottleneck``, stride 2) reads the crops only through 1x1
        convolutions: ``conv1`` (C -> P) and the downsample's ``avgpool(2) -> conv (C -> 4P)``. RoIAlign is a
        linear map over positions (:func:`roi_align_matrices`) and a 1x1 convolution a linear map over
        channels, so they commute: run both 1x1 convolutions on the ``[B, C, h, w]`` map (h * w = 25 positions
        per image on DocMNIST instead of 196 per region) and interpolate their outputs, the downsample's with
        the 2x2 average pool folded into its matrix. Everything after (BatchNorm in train or eval mode,
        ReLU, the 3x3 conv, the other blocks, the attention pool) sees the same tensors as the reference.
        """
        # (with activation checkpointing, each step is its own segment: the crops are the largest tensors)
        crops = checkpointed(self, self._fast_crops, features, boxes, image_width)
        x = checkpointed(self, self._fast_block0, *crops)
        for block in self.visual.layer4[1:]:
            x = checkpointed(self, block, x)
        return checkpointed(self, attention_pool_first_token, self.visual.attnpool, x)

    def _fast_crops(
        self, features: torch.Tensor, boxes: torch.Tensor, image_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer4 block 0's two 1x1 convolutions, on the maps, then RoIAlign'd (see :meth:`_fast_head`).

        Returns ``conv1(crops)`` ``[M, P, 14, 14]`` and ``downsample_conv(avgpool(crops))`` ``[M, 4P, 7, 7]``.
        """
        block = self.visual.layer4[0]
        _, _, h, w = features.shape
        # float64 features get float64 weights: float32 boxes would round them
        boxes = boxes.to(device=features.device, dtype=torch.promote_types(features.dtype, boxes.dtype))
        index = boxes[:, 0].long()
        wy, wx = roi_align_axis_weights(boxes, w / image_width, h, w)  # [M, 14, h], [M, 14, w]
        m, half = len(boxes), ROI_SIZE // 2
        # avgpool(2) of the crops, itself separable: average adjacent rows of Wy and of Wx
        pooled = _kron(wy.reshape(m, half, 2, h).mean(2), wx.reshape(m, half, 2, w).mean(2))  # [M, 49, hw]
        return (
            apply_roi_matrices(block.conv1(features), index, _kron(wy, wx)),
            apply_roi_matrices(block.downsample[1](features), index, pooled),
        )

    def _fast_layer4(self, conv1_crops: torch.Tensor, downsample_crops: torch.Tensor) -> torch.Tensor:
        """The rest of layer4 from :meth:`_fast_crops`' outputs: ``[M, 32 * width, 7, 7]``."""
        return self.visual.layer4[1:](self._fast_block0(conv1_crops, downsample_crops))

    def _fast_block0(self, conv1_crops: torch.Tensor, downsample_crops: torch.Tensor) -> torch.Tensor:
        """Layer4's first block after its two 1x1 convolutions: ``[M, 32 * width, 7, 7]``."""
        block = self.visual.layer4[0]
        out = block.act1(block.bn1(conv1_crops))
        out = block.avgpool(block.act2(block.bn2(block.conv2(out))))
        out = block.bn3(block.conv3(out)) + block.downsample[2](downsample_crops)
        return block.act3(out)


def seeded_modified_resnet(
    layers: Sequence[int], width: int, output_dim: int, seed: int, residual_init: str = "ones"
) -> ModifiedResNet:
    """A randomly initialised (untrained) ``ModifiedResNet``; same arguments -> same weights.

    The global RNG is used for open_clip's own init, inside ``fork_rng`` so callers' random state is
    untouched. open_clip zero-initialises every block's last BatchNorm (``bn3``) for training
    stability, which makes an *untrained* tower skip all its 3x3 convolutions; ``residual_init="ones"``
    resets those scales to 1 so random features flow through every block (``"zeros"`` keeps open_clip's).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_modified_resnet(layers, width, output_dim)
    if residual_init == "ones":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bn3.weight") and name.startswith("layer"):
                    param.fill_(1.0)
    elif residual_init != "zeros":
        raise ValueError(f"residual_init must be 'ones' or 'zeros', not {residual_init!r}")
    return model.eval()

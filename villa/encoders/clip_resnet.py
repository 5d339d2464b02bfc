"""Region image tower around CLIP's modified ResNet (imported from open_clip, not copied).

Reference recipe (SPEC section 3): images (float in [0, 1], no mean/std normalisation) go through
the stem and layer1-3; every region box is RoIAligned (14x14, ``spatial_scale = feat_w / img_w``,
``sampling_ratio=0``, ``aligned=True``) from that feature map; the crops go through layer4 (stride 2
-> 7x7) and the attention pool (built for ``image_size=224``, i.e. a 7x7 grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn
from torchvision.ops import roi_align

ROI_SIZE = 14
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

    Args:
        pool: the attention pool whose parameters are used.
        x: feature map ``[M, C, H, W]`` with ``H * W + 1 == pool.positional_embedding.shape[0]``.
    Returns:
        ``[M, output_dim]``.
    """
    m, c, h, w = x.shape
    heads = pool.num_heads
    head_dim = c // heads
    tokens = x.reshape(m, c, h * w).transpose(1, 2)  # [M, HW, C]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [M, L, C]
    tokens = tokens + pool.positional_embedding[None].to(tokens.dtype)
    query = F.linear(tokens[:, 0], pool.q_proj.weight, pool.q_proj.bias) * head_dim**-0.5  # [M, C]
    query = query.reshape(m, heads, head_dim)
    k_weight = pool.k_proj.weight.reshape(heads, head_dim, c).to(query.dtype)
    folded = torch.einsum("mhd,hdc->mhc", query, k_weight)  # [M, heads, C]
    scores = torch.bmm(folded, tokens.transpose(1, 2))  # [M, heads, L]
    attn = scores.float().softmax(dim=-1).to(tokens.dtype)
    pooled = torch.bmm(attn, tokens)  # [M, heads, C]
    v_weight = pool.v_proj.weight.reshape(heads, head_dim, c).to(pooled.dtype)
    values = torch.einsum("mhc,hdc->mhd", pooled, v_weight) + pool.v_proj.bias.reshape(heads, head_dim)
    return F.linear(values.reshape(m, c), pool.c_proj.weight, pool.c_proj.bias)


def boxes_with_batch_index(boxes_per_image: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image boxes ``[R_i, 4]`` (x1, y1, x2, y2) into RoIAlign rows ``[sum R_i, 5]``."""
    counts = torch.tensor([len(b) for b in boxes_per_image])
    index = torch.repeat_interleave(torch.arange(len(boxes_per_image)), counts)
    flat = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image])
    return torch.cat([index[:, None].to(flat.dtype), flat], dim=1)


class RegionImageEncoder(nn.Module):
    """Region embeddings from whole images and pixel boxes (SPEC section 3 recipe).

    ``self.visual`` is an open_clip ``ModifiedResNet``, so the state dict has CLIP's ``visual.*``
    key layout. Inputs are used as given (floats in [0, 1]); no CLIP mean/std normalisation,
    like the reference.
    """

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
        return v.layer3(v.layer2(v.layer1(v.stem(x))))

    def region_features(self, features: torch.Tensor, boxes: torch.Tensor, image_width: int) -> torch.Tensor:
        """RoIAlign ``[M, 5]`` boxes on ``features`` -> ``[M, C, 14, 14]``."""
        return roi_align(
            features,
            boxes.to(device=features.device, dtype=features.dtype),
            output_size=(ROI_SIZE, ROI_SIZE),
            spatial_scale=features.shape[-1] / image_width,
            sampling_ratio=0,
            aligned=True,
        )

    def head(self, rois: torch.Tensor) -> torch.Tensor:
        """layer4 + attention pool: ``[M, C, 14, 14]`` -> ``[M, D]``."""
        x = self.visual.layer4(rois.contiguous(memory_format=torch.channels_last))
        return attention_pool_first_token(self.visual.attnpool, x)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Embed regions.

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1].
            boxes: ``[M, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in pixels.
        Returns:
            ``[M, D]`` region embeddings, not normalised.
        """
        if len(boxes) == 0:
            return images.new_zeros((0, self.output_dim))
        features = self.feature_map(images)
        return self.head(self.region_features(features, boxes, images.shape[-1]))


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

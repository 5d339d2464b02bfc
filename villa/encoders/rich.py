"""Richer *untrained* region features for precomputed (stage-1) region embeddings.

Why: the ``default`` encoder's image tower is random, and its reference recipe (stem + layer1-3,
RoIAlign on the stride-16 map, layer4, attention pool) gives nearly constant region vectors (pairwise
cosine ~0.99999), which caps the stage-1 mapping model. ``region_features="rich"`` keeps that vector
and adds cheaper, more local views of the same region, all deterministic and untrained:

* ``reference``: the reference embedding (``RegionImageEncoder.forward``) ``[M, D]``;
* ``pooled``: mean and max over a 7x7 RoIAlign of the tower's stem, layer1, layer2 and layer3 maps;
* ``pixels``: the region's own pixels (RoIAlign 28x28 on the image itself, i.e. stride 1);
* ``conv_bank``: a fixed seeded bank of 3x3 convolutions (+ bias, ReLU) at full resolution (stride
  1), RoIAligned 28x28 and pooled to a 4x4 grid of means plus a global max: it sees the thin 1-px
  shape outlines and their extent, which the stride-16 reference map blurs away. A linear probe
  (diagnosis only; ``python benchmarks/probe_rich.py --data_dir=docmnist_30000_15.2``, val accuracy)
  reads shape 58.9% and size 53.3% from the reference recipe, 99.9% and 96.5% from this block alone,
  and 99.2% and 88.5% from the final rich vector.

Like every recipe here (and the reference's), the regions are the annotation table's region boxes
(``region_coord``), which is how the task defines a region. Each block is first mapped to
``BLOCK_DIM`` by a fixed seeded Gaussian projection, then standardised (z-score per dimension) with
mean/std of the dataset's TRAIN-split regions only. These statistics are unsupervised: they read no
attribute label, no caption and no region-attribute ground truth (``reg_to_attr``). The standardised
blocks are concatenated and projected to the text dimension ``D`` by another fixed seeded Gaussian
projection, because stage 1 compares projected regions with ``D``-dimensional attribute embeddings.

Scope: this only changes the PRECOMPUTED stage-1 region embeddings. The stage-2 trainable image model
(``Encoder.build_image_model()``) keeps the reference recipe and is not touched.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from villa.encoders.clip_resnet import RegionImageEncoder
from villa.encoders.ops import roi_align_boxes
from villa.storage.errors import VillaError

REGION_FEATURES = ("rich", "reference")
BLOCKS = ("reference", "pooled", "pixels", "conv_bank")
BLOCK_DIM = 384
POOL_SIZE = 7
PIXEL_SIZE = 28
BANK_FILTERS = 64
#: bytes of bank responses made at once (a few images' worth; bounds the descriptor's peak memory)
BANK_CHUNK_BYTES = 256 * 2**20
BANK_GRID = 4
#: window sizes of the bank's per-region responses are rounded up to this many pixels (fewer, larger groups)
BANK_WINDOW_STEP = 8
DEFAULT_RICH_SEED = 0


def _gaussian(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """``[rows, cols]`` N(0, 1/rows): a random projection that roughly preserves norms."""
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32) / rows**0.5


def _exact_convolutions():
    """cuDNN without TF32 inside the block (PyTorch lets cuDNN convolutions use TF32 by default)."""
    if not torch.backends.cudnn.is_available():
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def _bank_windows_extent(
    boxes: torch.Tensor, scale: float, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per box, the smallest map window that holds every pixel RoIAlign reads for it: ``(lo_x, lo_y, width_x,
    width_y)``, int64 ``[M]`` each, in pixels of an ``h x w`` map at ``scale`` times the boxes' coordinates.

    With ``aligned=True`` the samples of a box ``x0..x1`` lie in ``[x0 * scale - 0.5, x1 * scale - 0.5]``, and a
    sample at ``x`` reads pixels ``floor(x)`` and ``floor(x) + 1``; samples left of 0 read pixel 0 (or nothing
    below -1) and samples right of ``w - 1`` read pixel ``w - 1``. A window starting at ``floor(x_min)`` (0 when
    that is negative, so the left border rule is the map's) and ending past ``floor(x_max) + 1`` (or at ``w``)
    therefore reads what the whole map does.
    """
    coords = boxes[:, 1:].double() * scale - 0.5  # [M, 4]: x0, y0, x1, y1 sample extents
    lo = coords[:, :2].floor().clamp(min=0)
    hi = coords[:, 2:].floor() + 2  # one past the last pixel read
    limit = torch.tensor([w, h], dtype=hi.dtype)
    hi = torch.minimum(torch.maximum(hi, lo + 1), limit)
    lo = torch.minimum(lo, limit - 1)
    size = (hi - lo).long()
    return lo[:, 0].long(), lo[:, 1].long(), size[:, 0], size[:, 1]


class RichRegionFeatures(nn.Module):
    """Untrained multi-block region descriptor (see the module docstring).

    ``forward`` gives the concatenated, per-block projected but NOT yet standardised blocks
    ``[M, len(BLOCKS) * BLOCK_DIM]``; :meth:`fit_stats` computes the train-split statistics and
    :meth:`finalize` standardises and projects to ``[M, out_dim]``. The split exists because the
    statistics need every train region before any region can be finished.
    """

    def __init__(self, tower: RegionImageEncoder, out_dim: int, seed: int = DEFAULT_RICH_SEED):
        super().__init__()
        # the blocks read the ModifiedResNet's stem and layers: other towers (e.g. mobilenet_v2) have none
        if not isinstance(tower, RegionImageEncoder):
            raise VillaError(
                f"region_features=rich needs a CLIP modified-ResNet image tower, not {type(tower).__name__}: "
                "use --region_features=reference with this encoder"
            )
        self.tower = tower.eval()
        self.out_dim = int(out_dim)
        self.seed = int(seed)
        v = tower.visual
        pooled_in = 2 * sum(
            int(m.weight.shape[0])
            for m in (v.conv3, v.layer1[-1].conv3, v.layer2[-1].conv3, v.layer3[-1].conv3)
        )
        inputs = {
            "reference": tower.output_dim,
            "pooled": pooled_in,
            "pixels": 3 * PIXEL_SIZE * PIXEL_SIZE,
            "conv_bank": BANK_FILTERS * (BANK_GRID * BANK_GRID + 1),
        }
        gen = torch.Generator().manual_seed(self.seed)
        self.register_buffer("bank_weight", torch.randn(BANK_FILTERS, 3, 3, 3, generator=gen) / 27**0.5)
        # biases around -mean response, so each filter fires on some pixel patterns and not others
        self.register_buffer("bank_bias", -torch.rand(BANK_FILTERS, generator=gen) * 0.5)
        for name in BLOCKS:
            self.register_buffer(f"proj_{name}", _gaussian(gen, inputs[name], BLOCK_DIM))
        self.register_buffer("proj_out", _gaussian(gen, len(BLOCKS) * BLOCK_DIM, self.out_dim))

    @property
    def raw_dim(self) -> int:
        return len(BLOCKS) * BLOCK_DIM

    @property
    def config(self) -> dict:
        return {
            "region_features": "rich",
            "blocks": list(BLOCKS),
            "block_dim": BLOCK_DIM,
            "seed": self.seed,
            "pool_size": POOL_SIZE,
            "pixel_size": PIXEL_SIZE,
            "bank_filters": BANK_FILTERS,
            "bank_grid": BANK_GRID,
            "standardization": "per-block z-score with train-split region statistics (unsupervised, no labels)",
            "out_dim": self.out_dim,
        }

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Args: images float ``[B, 3, H, W]`` in [0, 1]; boxes ``[M, 5]`` (batch_index, x1, y1, x2, y2).

        Returns: ``[M, len(BLOCKS) * BLOCK_DIM]`` float32, blocks in :data:`BLOCKS` order.

        Always exact float32 (no autocast, no TF32 convolutions): the z-score in :meth:`finalize`
        divides by a per-dimension spread that is small next to the features' common offset, so
        low-precision rounding of the offset would come back as large errors.
        """
        with torch.autocast(images.device.type, enabled=False), _exact_convolutions():
            return self._forward(images.float(), boxes)

    def _forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if len(boxes) == 0:
            return images.new_zeros((0, self.raw_dim), dtype=torch.float32)
        tower, v, width = self.tower, self.tower.visual, images.shape[-1]
        x = images.to(dtype=v.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        maps = [v.stem(x)]
        for layer in (v.layer1, v.layer2, v.layer3):
            maps.append(layer(maps[-1]))
        reference = tower.head(tower.region_features(maps[-1], boxes, width))
        pooled = []
        for fmap in maps:
            r = roi_align_boxes(fmap, boxes, width, POOL_SIZE)
            pooled += [r.mean((2, 3)), r.amax((2, 3))]
        pixels = roi_align_boxes(images, boxes, width, PIXEL_SIZE).flatten(1)
        bank = self._bank_crops(images, boxes, width)  # [M, F, 28, 28]
        bank = torch.cat([F.adaptive_avg_pool2d(bank, BANK_GRID).flatten(1), bank.amax((2, 3))], 1)
        blocks = {
            "reference": reference,
            "pooled": torch.cat(pooled, 1),
            "pixels": pixels,
            "conv_bank": bank,
        }
        return torch.cat([blocks[n].float() @ getattr(self, f"proj_{n}") for n in BLOCKS], 1)

    def _bank_crops(self, images: torch.Tensor, boxes: torch.Tensor, width: int) -> torch.Tensor:
        """RoIAlign ``[M, F, 28, 28]`` of the bank's responses ``relu(conv3x3(images) + bias)`` ``[B, F, H, W]``.

        RoIAlign reads a response map only inside each box (and one pixel around it), and a 3x3 response needs
        only the pixels next to it. So when the regions cover less than the images, the responses are made for
        a window around each region (:meth:`_bank_windows`) rather than for the whole map; else for the whole
        map a few images at a time (:meth:`_bank_full_maps`). Both equal RoIAlign of the convolution over the
        whole map, to float rounding: the windows hold every pixel the samples read, and the same border rule.
        """
        if not len(boxes):
            return images.new_zeros((0, len(self.bank_weight), PIXEL_SIZE, PIXEL_SIZE))
        b, c, h, w = images.shape
        scale = w / width  # RoIAlign's spatial scale for a map as wide as ``images``
        lo_x, lo_y, width_x, width_y = _bank_windows_extent(boxes, scale, h, w)
        if float((width_x * width_y).sum()) >= b * h * w:
            return self._bank_full_maps(images, boxes, width)
        return self._bank_windows(images, boxes, scale, lo_x, lo_y, width_x, width_y)

    def _bank_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank as a matrix ``[F, 3 * 9]`` and its bias ``[F, 1]``."""
        weight = self.bank_weight.to(dtype).reshape(len(self.bank_weight), -1)
        return weight, self.bank_bias.to(dtype)[:, None]

    def _bank_full_maps(self, images: torch.Tensor, boxes: torch.Tensor, width: int) -> torch.Tensor:
        """Whole response maps, a few images at a time (about :data:`BANK_CHUNK_BYTES` each), as one matrix
        product over the 3x3 patches, which writes them in the row-major layout RoIAlign reads (a convolution
        op writes them channels-last, and RoIAlign's CPU kernel would first copy them to row-major)."""
        b, c, h, w = images.shape
        weight, bias = self._bank_matrices(images.dtype)
        per_image = max(1, BANK_CHUNK_BYTES // (len(weight) * h * w * images.element_size()))
        image_of_box = boxes[:, 0].long()
        crops = images.new_empty((len(boxes), len(weight), PIXEL_SIZE, PIXEL_SIZE))
        for start in range(0, b, per_image):
            stop = min(b, start + per_image)
            mine = ((image_of_box >= start) & (image_of_box < stop)).nonzero().squeeze(1)
            if not len(mine):
                continue
            patches = F.unfold(images[start:stop], 3, padding=1)  # [b', 27, H * W]
            responses = torch.matmul(weight, patches).add_(bias).relu_().view(stop - start, len(weight), h, w)
            local = boxes[mine].clone()
            local[:, 0] -= start
            crops[mine] = roi_align_boxes(responses, local, width, PIXEL_SIZE)
        return crops

    def _bank_windows(self, images, boxes, scale, lo_x, lo_y, width_x, width_y) -> torch.Tensor:
        """Responses in a window around each region only (see :func:`_bank_windows_extent`).

        Regions are grouped by window size (rounded up to :data:`BANK_WINDOW_STEP` pixels) so that each group
        is one gather of padded-image windows ``[m, 3, wy + 2, wx + 2]``, one matrix product over their 3x3
        patches ``-> [m, F, wy, wx]`` and one RoIAlign with the boxes moved into their windows."""
        b, c, h, w = images.shape
        weight, bias = self._bank_matrices(images.dtype)
        padded = F.pad(images, (1, 1, 1, 1)).permute(
            0, 2, 3, 1
        )  # [B, H + 2, W + 2, 3]: zeros as conv padding
        step = BANK_WINDOW_STEP
        size_x = torch.clamp((width_x + step - 1) // step * step, max=w)
        size_y = torch.clamp((width_y + step - 1) // step * step, max=h)
        # a window that would cross the far edge slides back: it then ends where the image ends, as it must
        lo_x, lo_y = torch.minimum(lo_x, w - size_x), torch.minimum(lo_y, h - size_y)
        crops = images.new_empty((len(boxes), len(weight), PIXEL_SIZE, PIXEL_SIZE))
        groups = torch.stack([size_y, size_x], 1)
        for sy, sx in torch.unique(groups, dim=0).tolist():
            members = ((groups[:, 0] == sy) & (groups[:, 1] == sx)).nonzero().squeeze(1)
            per_chunk = max(1, BANK_CHUNK_BYTES // ((len(weight) + 27) * sy * sx * images.element_size()))
            for chunk in members.split(per_chunk):
                rows = lo_y[chunk, None] + torch.arange(sy + 2)  # [m, sy + 2] in the padded image
                cols = lo_x[chunk, None] + torch.arange(sx + 2)
                image_index = boxes[chunk, 0].long()
                windows = padded[image_index[:, None, None], rows[:, :, None], cols[:, None, :]]
                patches = F.unfold(windows.permute(0, 3, 1, 2), 3)  # [m, 27, sy * sx]
                responses = (
                    torch.matmul(weight, patches).add_(bias).relu_().view(len(chunk), len(weight), sy, sx)
                )
                local = boxes[chunk].clone()
                local[:, 0] = torch.arange(len(chunk), dtype=local.dtype)
                local[:, 1::2] -= lo_x[chunk, None].to(local.dtype) / scale
                local[:, 2::2] -= lo_y[chunk, None].to(local.dtype) / scale
                crops[chunk] = roi_align_boxes(responses, local, sx / scale, PIXEL_SIZE)
        return crops

    @staticmethod
    def fit_stats(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std ``[raw_dim]`` of ``raw`` ``[N, raw_dim]`` (pass train rows only)."""
        raw = raw.double()
        return raw.mean(0).float(), raw.std(0, unbiased=False).clamp(min=1e-6).float()

    def finalize(self, raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[M, raw_dim]`` -> standardised, concatenated, projected ``[M, out_dim]`` float32."""
        return ((raw.float() - mean) / std) @ self.proj_out


class RunningMoments:
    """Per-dimension count, mean and sum of squared deviations (float64), merged chunk by chunk.

    :meth:`RichRegionFeatures.fit_stats` needs every train region at once; this gives the same statistics
    from chunks (batches, shards, ranks) with Chan et al.'s pairwise update, so preprocessing keeps one batch
    in memory instead of the whole dataset. float64 and the pairwise update (not a sum of squares) keep the
    small spread of the near-constant reference block exact next to its large common offset.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(int(dim), np.float64)
        self.m2 = np.zeros(int(dim), np.float64)

    @classmethod
    def of(cls, rows: np.ndarray | torch.Tensor) -> RunningMoments:
        """The moments of ``rows`` ``[N, dim]``."""
        rows = rows.numpy() if torch.is_tensor(rows) else np.asarray(rows)
        out = cls(rows.shape[1])
        if len(rows):
            x = rows.astype(np.float64)
            out.count, out.mean = len(x), x.mean(0)
            out.m2 = np.square(x - out.mean).sum(0)
        return out

    @classmethod
    def from_arrays(cls, count: int, mean_m2: np.ndarray) -> RunningMoments:
        """Rebuild from :meth:`arrays` (``[2, dim]`` float64: mean, m2) and the count."""
        out = cls(mean_m2.shape[1])
        out.count, out.mean, out.m2 = (
            int(count),
            np.array(mean_m2[0], np.float64),
            np.array(mean_m2[1], np.float64),
        )
        return out

    def arrays(self) -> np.ndarray:
        """``[2, dim]`` float64: mean and m2 (the count is kept apart)."""
        return np.stack([self.mean, self.m2])

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Add ``other``'s rows to these moments (in place; returned for chaining)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / total)
        self.count = total
        return self

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[dim]`` mean and std, as :meth:`RichRegionFeatures.fit_stats` gives them."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return torch.from_numpy(self.mean).float(), torch.from_numpy(std).clamp(min=1e-6).float()

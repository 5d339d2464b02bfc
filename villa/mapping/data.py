"""In-memory stage-1 dataset: packed region embeddings, per-image region counts and the text's multi-hot.

Regions are stored packed (the real regions of all images, image by image, ``[M, D]``), so memory follows the
number of regions, not the number of images times the largest region count. A training batch is packed too
(:meth:`Stage1Dataset.__getitems__`); only the device-resident path pads, one batch at a time
(:meth:`Stage1Dataset.batch`), for the fixed shapes a CUDA graph needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch


def batch_mask(counts: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``[B, width]`` bool, True at the first ``counts[b]`` slots of row ``b`` (``width``: the largest
    count, at least 1). Its True entries in row-major order are a packed batch's regions."""
    if width is None:
        width = max(int(counts.max()), 1) if len(counts) else 1
    return torch.arange(width, device=counts.device) < counts.unsqueeze(1)


def packed_rows(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row indices ``[sum(counts)]`` of the regions of images with first rows ``starts [B]`` and region
    counts ``counts [B]``, image by image (one vectorised gather index, no per-image loop)."""
    offsets = torch.cumsum(counts, 0) - counts  # where each image starts in the gathered batch
    return torch.arange(int(counts.sum()), device=counts.device) + torch.repeat_interleave(
        starts - offsets, counts
    )


class Stage1Dataset(torch.utils.data.Dataset):
    """All of one split in three tensors; a batch is one gather, no per-item Python work.

    Attributes:
        regions: ``[M, D]`` float32, the real region embeddings of all images, image by image.
        counts: ``[N]`` long, each image's number of regions (``M = counts.sum()``).
        starts: ``[N]`` long, each image's first row in ``regions``.
        multi_hot: ``[N, K]`` bool, attributes mentioned by the image's TEXT (never the region ground truth).
        max_regions: the largest region count (host int).
    """

    def __init__(self, regions: torch.Tensor, counts: torch.Tensor, multi_hot: torch.Tensor):
        counts = torch.as_tensor(counts).long()
        if not len(counts) == len(multi_hot):
            raise ValueError("counts and multi_hot must have the same number of images")
        if regions.dim() != 2 or int(counts.sum()) != len(regions):
            raise ValueError("regions must be [M, D] with M = counts.sum()")
        self.regions, self.counts, self.multi_hot = regions.float(), counts, multi_hot.bool()
        self.starts = torch.cumsum(counts, 0) - counts
        self.max_regions = int(counts.max()) if len(counts) else 0

    @classmethod
    def from_padded(cls, regions: torch.Tensor, mask: torch.Tensor, multi_hot: torch.Tensor) -> Stage1Dataset:
        """From padded ``regions [N, R, D]`` and ``mask [N, R]`` (True = real region, the first ones of a row)."""
        mask = mask.bool()
        counts = mask.sum(1)
        if not torch.equal(mask, batch_mask(counts, mask.shape[1])):
            raise ValueError("a mask row must hold its real regions first")
        return cls(regions[mask], counts, multi_hot)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, embeddings, vocabulary) -> Stage1Dataset:
        """Build from an annotation split, an open :class:`villa.features.embeddings.RegionEmbeddings` and the
        dataset's :class:`villa.datasets.Vocabulary` (whose matcher reads each image's attributes off its text)."""
        regions, counts = embeddings.gather_packed(frame["image_id"].to_numpy())
        multi_hot = torch.from_numpy(vocabulary.match_matrix(frame["text"].tolist()))
        return cls(regions, counts, multi_hot)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.regions, self.counts, self.starts, self.multi_hot)
        )

    def to(self, device: torch.device | str) -> Stage1Dataset:
        """This split with its tensors on ``device`` (for :meth:`batch`: device-resident training)."""
        return Stage1Dataset(self.regions.to(device), self.counts.to(device), self.multi_hot.to(device))

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of ``index [B]`` (long, on this dataset's device) gathered where the data lives, padded
        to fixed shapes: ``regions [B, R_max, D]`` (zeros on padding), ``mask [B, R_max]``,
        ``multi_hot [B, K]``, with ``R_max`` the split's largest region count. Only device ops, no host
        sync and no shape that depends on the batch (what a captured CUDA graph needs)."""
        counts = self.counts.index_select(0, index)
        mask = batch_mask(counts, self.max_regions)  # [B, R_max]
        if len(self.regions):
            # slot r of image b reads row starts[b] + r; padding slots read a real row and are zeroed
            rows = self.starts.index_select(0, index).unsqueeze(1) + torch.arange(
                self.max_regions, device=index.device
            )
            rows = rows.clamp_(max=len(self.regions) - 1).flatten()
            regions = self.regions.index_select(0, rows).view(len(index), self.max_regions, -1)
            regions = regions.masked_fill(~mask.unsqueeze(-1), 0.0)
        else:
            regions = self.regions.new_zeros((len(index), self.max_regions, self.regions.shape[1]))
        return {"regions": regions, "mask": mask, "multi_hot": self.multi_hot.index_select(0, index)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, count = int(self.starts[index]), int(self.counts[index])
        return {"regions": self.regions[start : start + count], "multi_hot": self.multi_hot[index]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once, packed: ``regions [M_b, D]`` (the batch's real regions, image by image),
        ``mask [B, R_b]`` (``R_b`` the batch's largest region count, at least 1: where each packed row
        sits, see :func:`batch_mask`) and ``multi_hot [B, K]``."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(self.counts.device)
        counts = self.counts.index_select(0, idx)
        rows = packed_rows(self.starts.index_select(0, idx), counts)
        return {
            "regions": self.regions.index_select(0, rows),
            "mask": batch_mask(counts),
            "multi_hot": self.multi_hot.index_select(0, idx),
        }


def collate_stage1(batch) -> dict[str, torch.Tensor]:
    """Collate for fit: passes a :meth:`Stage1Dataset.__getitems__` batch through; packs a list of items."""
    if isinstance(batch, dict):
        return batch
    counts = torch.tensor([len(item["regions"]) for item in batch], dtype=torch.long)
    return {
        "regions": torch.cat([item["regions"] for item in batch]),
        "mask": batch_mask(counts),
        "multi_hot": torch.stack([item["multi_hot"] for item in batch]),
    }

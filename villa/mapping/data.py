"""In-memory stage-1 dataset: padded region embeddings, their mask and the text's attribute multi-hot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch


class Stage1Dataset(torch.utils.data.Dataset):
    """All of one split in three tensors; a batch is one fancy-index, no per-item Python work.

    Attributes:
        regions: ``[N, R_max, D]`` float32 region embeddings, zero-padded.
        mask: ``[N, R_max]`` bool, True = real region.
        multi_hot: ``[N, K]`` bool, attributes mentioned by the image's TEXT (never the region ground truth).
    """

    def __init__(self, regions: torch.Tensor, mask: torch.Tensor, multi_hot: torch.Tensor):
        if not (len(regions) == len(mask) == len(multi_hot)):
            raise ValueError("regions, mask and multi_hot must have the same number of images")
        self.regions, self.mask, self.multi_hot = regions.float(), mask.bool(), multi_hot.bool()

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, embeddings, vocabulary) -> Stage1Dataset:
        """Build from an annotation split, an open :class:`villa.embeddings.RegionEmbeddings` and the
        dataset's :class:`villa.datasets.Vocabulary` (whose matcher reads each image's attributes off its text)."""
        regions, mask = embeddings.gather(frame["image_id"].to_numpy())
        multi_hot = torch.from_numpy(vocabulary.match_matrix(frame["text"].tolist()))
        return cls(regions, mask, multi_hot)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.regions, self.mask, self.multi_hot))

    def to(self, device: torch.device | str) -> Stage1Dataset:
        """This split with its tensors on ``device`` (for :meth:`batch`: device-resident training)."""
        return Stage1Dataset(*(t.to(device) for t in (self.regions, self.mask, self.multi_hot)))

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of ``index [B]`` (long, on this dataset's device) gathered where the data lives, with
        fixed shapes: ``regions [B, R_max, D]``, ``mask [B, R_max]``, ``multi_hot [B, K]`` (no trimming,
        which would read the batch's region count back to the host)."""
        return {
            "regions": self.regions.index_select(0, index),
            "mask": self.mask.index_select(0, index),
            "multi_hot": self.multi_hot.index_select(0, index),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"regions": self.regions[index], "mask": self.mask[index], "multi_hot": self.multi_hot[index]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once: ``regions [B, R, D]`` trimmed to the batch's largest region count."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        mask = self.mask[idx]
        r = max(int(mask.sum(1).max()), 1) if len(idx) else 1
        return {"regions": self.regions[idx, :r], "mask": mask[:, :r], "multi_hot": self.multi_hot[idx]}


def collate_stage1(batch) -> dict[str, torch.Tensor]:
    """Collate for fit: passes a :meth:`Stage1Dataset.__getitems__` batch through, stacks a list of items."""
    if isinstance(batch, dict):
        return batch
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}

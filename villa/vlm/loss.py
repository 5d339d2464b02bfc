"""Stage-2 contrastive loss (docs/method.md section 5.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.07


def symmetric_info_nce(image_embs: torch.Tensor, text_embs: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE over all M pairs of a batch: 0.5 * (image->text + text->image), each a mean over pairs.

    image_embs ``[M, D]``, text_embs ``[M, D]`` (row i of each forms a positive pair; both are
    L2-normalised here). Returns a scalar, computed in float32 also under autocast. Like the reference, pairs that share identical text are still
    negatives of each other.
    """
    image_embs = F.normalize(image_embs.float(), dim=-1)
    text_embs = F.normalize(text_embs.float(), dim=-1)
    with torch.autocast(image_embs.device.type, enabled=False):  # the logits in float32 under amp as well
        logits = image_embs @ text_embs.T / tau
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(logits.T, target)

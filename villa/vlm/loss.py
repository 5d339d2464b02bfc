"""Stage-2 contrastive loss (docs/method.md section 5.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.07
#: how stage 2 treats each image's whole-image pair (docs/method.md section 5.3): ``pooled`` (the reference) puts it
#: among all of the batch's pairs; ``separate`` gives the whole-image pairs their own InfoNCE among themselves
#: (CLIP's loss) and the region pairs theirs, and adds the two
WHOLE_IMAGE_PAIRS = ("pooled", "separate")


def symmetric_info_nce(image_embs: torch.Tensor, text_embs: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE over all M pairs of a batch: 0.5 * (image->text + text->image), each a mean over pairs.

    image_embs ``[M, D]``, text_embs ``[M, D]`` (row i of each forms a positive pair; both are
    L2-normalised here). Returns a scalar, computed in float32 also under autocast. Like the reference, pairs
    that share identical text are still negatives of each other.
    """
    image_embs = F.normalize(image_embs.float(), dim=-1)
    text_embs = F.normalize(text_embs.float(), dim=-1)
    with torch.autocast(image_embs.device.type, enabled=False):  # the logits in float32 under amp as well
        logits = image_embs @ text_embs.T / tau
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(logits.T, target)


def separate_info_nce(
    image_embs: torch.Tensor, text_embs: torch.Tensor, whole: torch.Tensor, tau: float = TAU
) -> torch.Tensor:
    """Symmetric InfoNCE of the whole-image pairs among themselves plus that of the region pairs among themselves.

    image_embs ``[M, D]``, text_embs ``[M, D]``, whole bool ``[M]`` (True for a whole-image pair). A batch of
    whole-image pairs only (the CLIP baseline) gives exactly :func:`symmetric_info_nce`; an empty group adds 0.
    The whole image's own region sentences are then never its negatives, which matters where every sentence
    restates most of the caption.
    """
    loss = image_embs.new_zeros((), dtype=torch.float32)
    for group in (whole, ~whole):
        if bool(group.any()):
            loss = loss + symmetric_info_nce(image_embs[group], text_embs[group], tau)
    return loss


def whole_image_rows(boxes: torch.Tensor) -> torch.Tensor:
    """bool ``[M]``: the first pair of each image in ``boxes`` ``[M, 5]`` (batch index first), which is its
    whole-image pair (:func:`villa.vlm.data.build_pairs` puts it first)."""
    rows = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    rows[1:] = boxes[1:, 0] != boxes[:-1, 0]
    return rows

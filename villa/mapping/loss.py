"""Stage-1 loss (docs/method.md section 4.3): InfoNCE on the best region's score, against images without the attribute."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from villa.engine.distributed import all_gather_no_grad, all_gather_with_grad, any_across_ranks

TEMPERATURE = 0.07


def region_scores(
    projections: torch.Tensor, attr_embs: torch.Tensor, mask: torch.Tensor, tau: float = TEMPERATURE
) -> torch.Tensor:
    """Image scores ``S(i, a)``: max over REAL regions of ``<norm(proj_a(r)), norm(attr_emb(a))> / tau``.

    Args:
        projections: ``[B, R, Kp, D]``; attr_embs: ``[Kp, D]``; mask: ``[B, R]`` bool, True = real region.

    Returns:
        ``[B, Kp]``; an image with no real region scores ``-inf``.
    """
    proj = F.normalize(projections.float(), dim=-1)
    emb = F.normalize(attr_embs.float(), dim=-1)
    with torch.autocast(proj.device.type, enabled=False):  # scores in float32 under amp as well
        sim = torch.einsum("brkd,kd->brk", proj, emb) / tau
    return sim.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def contrastive_terms(
    scores: torch.Tensor, present: torch.Tensor, reference_quirk: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, attribute) InfoNCE terms.

    ``term(i, a) = -log(exp S(i,a) / (exp S(i,a) + sum_{i' without a} exp S(i',a) [+ n_with_a]))``;
    the bracket is the reference code's quirk: every image that HAS ``a`` (``i`` included) adds exp(0) = 1.

    Args:
        scores: ``[..., B, Kp]`` image scores S; present: ``[..., B, Kp]`` bool, attribute in the image's
            text. Leading dimensions are independent batches (the negatives of an image are those of its
            own batch of B).

    Returns:
        ``terms [..., B, Kp]`` (zero where not present) and the number of terms (a 0-d long tensor).
    """
    neg_inf = scores.new_full((), float("-inf"))  # (a fill kernel, not a host copy: CUDA-graph safe)
    # log of the sum over negatives, per attribute: [..., Kp]; -inf when no image lacks a (term is then 0)
    neg_lse = torch.logsumexp(torch.where(present, neg_inf, scores), dim=-2)
    if reference_quirk:
        n_pos = present.sum(-2).to(scores.dtype)
        neg_lse = torch.logaddexp(neg_lse, torch.log(n_pos))
    log_denominator = torch.logaddexp(scores, neg_lse.unsqueeze(-2))
    # positive S can be -inf only for an image without regions; keep those out of the loss
    valid = present & torch.isfinite(scores)
    terms = torch.where(valid, log_denominator - scores, torch.zeros_like(scores))
    return terms, valid.sum()


def mapping_loss(
    projections: torch.Tensor,
    attr_embs: torch.Tensor,
    mask: torch.Tensor,
    present: torch.Tensor,
    tau: float = TEMPERATURE,
    reference_quirk: bool = False,
) -> tuple[torch.Tensor, int]:
    """Mean of the InfoNCE terms over all (image, attribute present) pairs of the batch.

    Args:
        projections: ``[B, R, Kp, D]``; attr_embs: ``[Kp, D]``; mask: ``[B, R]`` bool;
        present: ``[B, Kp]`` bool.

    Returns:
        (scalar loss, number of terms). With no terms the loss is a zero that still has a graph.
    """
    scores = region_scores(projections, attr_embs, mask, tau)
    terms, n = contrastive_terms(scores, present, reference_quirk)
    n_terms = int(n)
    return terms.sum() / max(n_terms, 1), n_terms


def packed_similarity(
    projections: torch.Tensor, attr_embs: torch.Tensor, mask: torch.Tensor, tau: float = TEMPERATURE
) -> torch.Tensor:
    """``s(r, a)`` from projections of the REAL regions only.

    Args:
        projections: ``[M, Kp, D]`` with ``M = mask.sum()``, regions in ``mask`` order;
        attr_embs: ``[Kp, D]``; mask: ``[B, R]`` bool.

    Returns:
        ``[B, R, Kp]``, ``-inf`` on padding.
    """
    proj = F.normalize(projections.float(), dim=-1)
    emb = F.normalize(attr_embs.float(), dim=-1)
    with torch.autocast(proj.device.type, enabled=False):  # scores in float32 under amp as well
        sim = torch.einsum("mkd,kd->mk", proj, emb) / tau
    full = sim.new_full((*mask.shape, sim.shape[1]), float("-inf"))
    full[mask] = sim
    return full


class MappingLoss:
    """``loss_fn(model, batch)`` for :func:`villa.engine.training.fit`.

    ``batch`` (see :mod:`villa.mapping.data`): ``mask [B, R]`` bool, ``multi_hot [B, K]`` and ``regions``,
    either packed ``[M, D]`` (the batch's real regions, image by image, in the order of ``mask``'s True
    entries: :meth:`~villa.mapping.data.Stage1Dataset.__getitems__`) or padded ``[B, R, D]``.
    Only the heads of attributes present in the batch run, and only on real regions. Returns
    ``(loss, number of terms)`` so epoch losses are averaged over terms; the number of terms is a 0-d
    tensor on the batch's device (reading it would wait for the device).

    ``static_shapes=True`` (for device-resident data and CUDA graphs; padded batches only,
    :meth:`~villa.mapping.data.Stage1Dataset.batch`): every head runs on every region slot of the padded
    batch, padding masked out, so no step depends on the batch's content for a tensor's shape and nothing
    waits for the device. Same loss and gradients: absent attributes have no terms, and padding never
    wins a max.

    Training shortcut (exact): ``S(i, a)`` is a max over regions, so its gradient flows through the
    arg-max region alone. With a plain :class:`MappingModel` (no active dropout) all regions are scored
    without autograd (:meth:`MappingModel.project_cached`), then the cached hidden layer and output of
    the arg-max region of each (image, attribute) go through :meth:`MappingModel.replay`, whose backward
    is that of the heads: the backward pass touches ``B * Kp`` rows instead of ``B * R * Kp`` and no row
    is projected twice. Loss and gradients equal the direct computation (up to float rounding and
    exact ties).
    """

    def __init__(
        self,
        attr_embs: torch.Tensor,
        tau: float = TEMPERATURE,
        reference_quirk: bool = False,
        argmax_backward: bool = True,
        static_shapes: bool = False,
    ):
        if not tau > 0 or not math.isfinite(tau):
            raise ValueError(f"temperature must be positive, got {tau}")
        self.attr_embs = F.normalize(attr_embs.detach().float(), dim=-1)
        self.tau, self.reference_quirk = float(tau), bool(reference_quirk)
        self.argmax_backward = bool(argmax_backward)
        self.static_shapes = bool(static_shapes)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def embeddings_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.attr_embs.to(device)
        return self._on_device[device]

    def _can_shortcut(self, model) -> bool:
        from villa.mapping.model import MappingModel

        # DDP / compile wrappers must see the real forward; dropout would draw different masks per pass
        return (
            self.argmax_backward
            and torch.is_grad_enabled()
            and type(model) is MappingModel
            and not (model.training and isinstance(model.dropout, torch.nn.Dropout))
        )

    def scores(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``S [B, Kp]`` and the present mask ``[B, Kp]`` over the batch's attributes
        (all K attributes with ``static_shapes``)."""
        if self.static_shapes:
            return self._static_scores(model, batch)
        regions, mask, multi_hot = batch["regions"], batch["mask"].bool(), batch["multi_hot"].bool()
        # under torchrun every rank scores the attributes present anywhere in the global batch
        head_index = any_across_ranks(multi_hot.any(0)).nonzero().squeeze(1)  # [Kp]
        embs = self.embeddings_on(regions.device).index_select(0, head_index)
        packed = (regions if regions.dim() == 2 else regions[mask]).unsqueeze(0)  # [1, M, D]
        present = multi_hot[:, head_index]
        # (a batch without real regions has nothing to cache; all its scores are -inf)
        if not self._can_shortcut(model) or len(packed[0]) == 0:
            sim = packed_similarity(model(packed, head_index)[0], embs, mask, self.tau)
            return sim.amax(dim=1), present
        # one pass without autograd over every real region and present head finds each image's arg-max
        # region; its cached hidden layer and output are then reused for the backward (no second forward)
        cached = model.project_cached(packed[0], head_index)  # [M, D], [Kp or 1, M, D] x 2
        with torch.no_grad():
            cos = self._cosines(model, cached[2], packed[0], embs)  # [Kp, M]
            full = cos.new_full((len(head_index), *mask.shape), float("-inf"))  # [Kp, B, R]
            full[:, mask] = cos
            # padded region index -> packed row; an image without regions gets row 0 (its score is masked)
            slot_row = (mask.flatten().cumsum(0) - 1).clamp_min(0).view(mask.shape)  # [B, R]
        return self._best_region_scores(
            model, packed[0], cached, full, slot_row, head_index, embs, mask
        ), present

    def _static_scores(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`scores` over all K heads and all ``B * R`` region slots: shapes fixed by the batch's
        shape alone, no boolean indexing, no host sync (the padded twin of the packed path)."""
        regions, mask, present = batch["regions"], batch["mask"].bool(), batch["multi_hot"].bool()
        if regions.dim() != 3:
            raise ValueError("static_shapes needs padded regions [B, R, D] (Stage1Dataset.batch)")
        b, r, d = regions.shape
        embs = self.embeddings_on(regions.device)  # [K, D]
        if not self._can_shortcut(model):
            return region_scores(model(regions), embs, mask, self.tau), present
        flat = regions.reshape(b * r, d)
        cached = model.project_cached(flat, None)  # [BR, D], [K or 1, BR, D] x 2
        with torch.no_grad():
            cos = self._cosines(model, cached[2], flat, embs).view(len(embs), b, r)
            cos = cos.masked_fill(~mask, float("-inf"))
            slot_row = torch.arange(b * r, device=flat.device).view(b, r)
        return self._best_region_scores(model, flat, cached, cos, slot_row, None, embs, mask), present

    @staticmethod
    def _cosines(model, out: torch.Tensor, rows: torch.Tensor, embs: torch.Tensor) -> torch.Tensor:
        """``[Kp, N]`` cosine of each head's projection of each row with its attribute embedding (normalised).

        ``out``: the heads' outputs ``[Kp or 1, N, D]`` of ``rows [N, D]`` (before the adapter)."""
        proj = model.adapt(out, rows).float()  # [Kp, N, D]
        dots = torch.linalg.vecdot(proj, embs.unsqueeze(1))  # [Kp, N] (a bmm here would be a slow GEMV)
        return dots / torch.linalg.vector_norm(proj, dim=-1).clamp_min(1e-12)

    def _best_region_scores(self, model, rows, cached, cos, slot_row, head_index, embs, mask) -> torch.Tensor:
        """Image scores ``[B, Kp]`` from each (image, head)'s arg-max region, with the heads' gradients.

        Args:
            rows: ``[N, D]`` the projected rows (the packed real regions, or every padded slot);
            cached: :meth:`MappingModel.project_cached`'s ``(xs, hidden, out)`` of ``rows``;
            cos: ``[Kp, B, R]`` cosines per region slot, ``-inf`` where there is no real region;
            slot_row: ``[B, R]`` long, the row of ``rows`` holding each slot;
            head_index: ``[Kp]`` long, or None for all heads; embs: ``[Kp, D]`` normalised; mask: ``[B, R]``.
        """
        xs, hidden, out = cached
        kp, b = cos.shape[:2]
        with torch.no_grad():
            best = slot_row.gather(1, cos.argmax(dim=2).t()).t().reshape(-1)  # [Kp * B] rows, head-major
            # where head k's rows start in hidden / out flattened to [Kp * N] (one shared block: one_proj)
            head_start = torch.arange(kp, device=best.device) * len(xs) * (len(hidden) > 1)
            at = (best.view(kp, b) + head_start.unsqueeze(1)).reshape(-1)
            # (index_select on flattened rows: ~5x faster than advanced indexing, and contiguous, which
            # the backward's bmm needs to be fast)
            shape = (kp, b, xs.shape[1])
            chosen = [xs.index_select(0, best).view(shape)]
            chosen += [t.flatten(0, 1).index_select(0, at).view(shape) for t in (hidden, out)]  # [Kp, B, D]
        raw = rows.index_select(0, best).view(shape) if model.adapter else None
        proj = F.normalize(model.replay(*chosen, head_index, raw).float(), dim=-1)  # [Kp, B, D]
        with torch.autocast(proj.device.type, enabled=False):  # scores in float32 under amp as well
            scores = torch.einsum("kbd,kd->bk", proj, embs) / self.tau
        # an image without real regions has no score (region_scores gives -inf there too)
        return scores.masked_fill(~mask.any(1, keepdim=True), float("-inf"))

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores, present = self.scores(model, batch)
        # under torchrun the negatives of an attribute are the images of the GLOBAL batch, as in one process
        scores, _ = all_gather_with_grad(scores)
        present = all_gather_no_grad(present)
        terms, n = contrastive_terms(scores, present, self.reference_quirk)
        return terms.sum() / n.clamp_min(1), n

    @torch.no_grad()
    def dataset_loss(
        self, model, regions: torch.Tensor, counts: torch.Tensor, multi_hot: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a whole split as unshuffled batches of ``batch_size`` would give it, in a few large steps.

        An image's score ``S(i, a)`` does not depend on its batch, so all images are scored at once (in
        chunks of images holding about 32M projected floats), then the contrastive terms are taken per
        consecutive group of ``batch_size`` images, each group with its own negatives. Equals the sum over
        the batches of ``loss * n_terms`` (up to float rounding) with a few large kernels instead of one
        small step per batch.

        Args:
            regions: ``[M, D]`` packed real regions, image by image; counts: ``[N]`` long, regions per
                image; multi_hot: ``[N, K]`` bool (any device).

        Returns:
            ``(sum of terms, number of terms)``, 0-d tensors on the model's device.
        """
        device = next(model.parameters()).device
        embs = F.normalize(self.embeddings_on(device), dim=-1)  # (as region_scores normalises them)
        n, k, d = len(counts), len(embs), regions.shape[1]
        host_counts = counts.cpu()  # (one sync per validation: chunk bounds are host numbers)
        ends = torch.cumsum(host_counts, 0)
        # images per scoring chunk: projected floats (rows x K x D) up to about 32M, at least one image
        rows_per_chunk = max(1, (1 << 25) // max(k * d, 1))
        scores = torch.full((n, k), float("-inf"), device=device)
        start = 0
        while start < n:
            row0 = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(torch.searchsorted(ends, row0 + rows_per_chunk, right=True)))
            row1 = int(ends[stop - 1])
            if row1 > row0:
                x = regions[row0:row1].to(device, non_blocking=True).float()
                proj = F.normalize(model(x.unsqueeze(0))[0].float(), dim=-1)  # [m, K, D]
                with torch.autocast(device.type, enabled=False):  # float32 under amp as well
                    sim = torch.einsum("mkd,kd->mk", proj, embs) / self.tau
                image = torch.repeat_interleave(host_counts[start:stop].to(device))  # [m] chunk-local image
                scores[start:stop].scatter_reduce_(0, image.unsqueeze(1).expand(-1, k), sim, "amax")
            start = stop
        present = multi_hot.to(device).bool()
        pad = -n % batch_size  # the last, short batch: padded with images that have no attribute and no score
        if pad:
            scores = torch.cat([scores, scores.new_full((pad, k), float("-inf"))])
            present = torch.cat([present, present.new_zeros((pad, k))])
        terms, count = contrastive_terms(
            scores.view(-1, batch_size, k), present.view(-1, batch_size, k), self.reference_quirk
        )
        return terms.sum(), count

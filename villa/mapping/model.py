"""The stage-1 mapping model: one projection head per attribute, all heads in one batched op."""

from __future__ import annotations

import math

import torch
from torch import nn

#: the adapter mixes the head's output with the untouched input: ADAPTER_RATIO * head(x) + (1 - ratio) * x
ADAPTER_RATIO = 0.2


class MappingModel(nn.Module):
    """K heads ``Linear(D, D) -> ReLU -> Linear(D, D)`` stored as stacked parameters, one per attribute of
    the dataset's vocabulary (``num_attributes``, whatever its size).

    Parameters ``W1 [H, D_in, D_out]``, ``b1 [H, D]``, ``W2 [H, D_in, D_out]``, ``b2 [H, D]`` (a head
    computes ``relu(x @ W1[h] + b1[h]) @ W2[h] + b2[h]``; in-by-out so batched matmuls need no
    transposed copies) with ``H = K`` heads, or ``H = 1`` when ``one_proj`` shares one head between all
    attributes. Initialised like ``nn.Linear`` (uniform in +-1/sqrt(D)) from a seeded generator, so the
    same ``seed`` gives the same weights whatever the global RNG state.

    ``dropout`` (default 0, the reference has none) is applied to the hidden layer during training.

    Input standardisation: buffers ``in_mean [D]`` / ``in_std [D]`` (identity until
    :meth:`set_input_stats` is called) map each region embedding to ``(x - mean) / std`` before the
    heads. Untrained image towers give region embeddings that differ from each other only in tiny
    deviations around one shared vector; standardising with the training regions' statistics (no
    labels involved) exposes those deviations to the heads. The adapter's residual uses the raw input.
    """

    def __init__(
        self,
        emb_dim: int,
        num_attributes: int,
        one_proj: bool = False,
        adapter: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if emb_dim <= 0 or num_attributes <= 0:
            raise ValueError(f"emb_dim ({emb_dim}) and num_attributes ({num_attributes}) must be positive")
        self.emb_dim, self.num_attributes = int(emb_dim), int(num_attributes)
        self.one_proj, self.adapter = bool(one_proj), bool(adapter)
        heads, d = (1 if one_proj else num_attributes), self.emb_dim
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(d)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen))

        self.W1, self.b1 = uniform(heads, d, d), uniform(heads, d)
        self.W2, self.b2 = uniform(heads, d, d), uniform(heads, d)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("in_mean", torch.zeros(d))
        self.register_buffer("in_std", torch.ones(d))

    @torch.no_grad()
    def set_input_stats(self, regions: torch.Tensor, eps: float = 1e-12) -> None:
        """Standardise inputs with the per-dimension mean and std of ``regions [M, D]`` (real regions)."""
        regions = regions.reshape(-1, self.emb_dim).double()
        self.in_mean.copy_(regions.mean(0).float())
        self.in_std.copy_(regions.std(0).clamp_min(eps).float())

    def forward(self, regions: torch.Tensor, head_index: torch.Tensor | None = None) -> torch.Tensor:
        """Project every region with the heads of ``head_index``.

        Args:
            regions: ``[B, R, D]`` region embeddings.
            head_index: ``[Kp]`` long, the attributes to project for (e.g. those present in the batch);
                None means all K. Only these heads take part, so only they receive gradients.

        Returns:
            ``[B, R, Kp, D]`` projections (not normalised).
        """
        kp = self.num_attributes if head_index is None else head_index.numel()
        if self.one_proj:
            # one shared head: project once, then broadcast to the Kp attributes (a view, no copy)
            out = self._heads(regions, None)
            return out.expand(*out.shape[:2], kp, out.shape[-1])
        return self._heads(regions, head_index)

    @torch.no_grad()
    def project_grouped(
        self, x: torch.Tensor, rows: torch.Tensor, head_index: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Project row ``rows[j]`` of ``x`` with the head of its block: the ``g``-th block of ``counts[g]``
        consecutive entries of ``rows`` goes through head ``head_index[g]``.

        For mapping, where each region needs only the heads of its image's attributes: (region, head)
        pairs sorted by head make every head one plain GEMM over exactly its regions (no padding, no
        unused heads).

        Args:
            x: ``[N, D]`` regions; rows: ``[P]`` long, indices into ``x`` grouped by head;
            head_index: ``[G]`` long; counts: ``[G]`` long, summing to ``P``.

        Returns:
            ``[P, D]`` projections (not normalised), in the order of ``rows``.
        """
        xs = self._standardize(x)  # once per region, not once per (region, head) pair
        out = xs.new_empty((len(rows), xs.shape[1]))
        ends = torch.cumsum(counts, 0).tolist()
        # a loop over the (at most K) heads, each one GEMM over all of its rows: the work per step is
        # large, while a padded batch over heads would waste a third of it on unequal attribute frequencies
        for head, start, end in zip(head_index.tolist(), [0] + ends[:-1], ends):
            if end == start:
                continue
            h = 0 if self.one_proj else head
            # (matmul then add, as forward's first layer: addmm rounds differently, and mapping should
            # give bit for bit the cosines of forward)
            hidden = torch.matmul(xs.index_select(0, rows[start:end]), self.W1[h]).add_(self.b1[h]).relu_()
            torch.addmm(self.b2[h], hidden, self.W2[h], out=out[start:end])
        return self.adapt(out, x[rows]) if self.adapter else out

    @torch.no_grad()
    def project_cached(self, x: torch.Tensor, head_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Project every row with every head of ``head_index``, keeping what :meth:`replay` needs.

        Args:
            x: ``[M, D]`` regions; head_index: ``[Kp]`` long, or None for all K heads in order (no
                selection and no device sync: what a captured CUDA graph needs).

        Returns:
            ``(xs [M, D], hidden [Kp, M, D], out [Kp, M, D])``: standardised input, hidden layer after
            the ReLU, and the heads' output before the adapter (:meth:`adapt` gives the projections).
            With ``one_proj`` the shared head runs once: ``hidden`` and ``out`` are ``[1, M, D]``.
        """
        idx = None if self.one_proj else head_index  # (one_proj: its single head is all heads)
        w1, b1, w2, b2 = self._weights(idx)
        xs = self._standardize(x)
        m, d = xs.shape
        hidden = torch.baddbmm(b1.unsqueeze(1), xs.expand(len(w1), m, d), w1).relu_()  # [Kp, M, D]
        return xs, hidden, torch.baddbmm(b2.unsqueeze(1), hidden, w2)

    def replay(
        self,
        xs: torch.Tensor,
        hidden: torch.Tensor,
        out: torch.Tensor,
        head_index: torch.Tensor,
        raw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows already projected by :meth:`project_cached`, now with the heads' gradients.

        Equals applying head ``head_index[k]`` to ``xs[k]`` under autograd (no dropout), without
        recomputing the forward pass: the cached hidden layer and output are reused as they are.

        Args:
            xs, hidden, out: ``[Kp, B, D]`` rows gathered from :meth:`project_cached` (standardised input,
                hidden after ReLU, output); head_index: ``[Kp]`` long, or None for all K heads in order;
                raw: ``[Kp, B, D]`` the
                unstandardised input rows, needed for the adapter's residual.

        Returns:
            ``[Kp, B, D]`` projections; gradients reach ``W1, b1, W2, b2`` (not the inputs).
        """
        if self.one_proj:  # every column trains the one shared head
            kp = len(out)
            idx = None if kp == 1 else torch.zeros(kp, dtype=torch.long, device=out.device)
        else:
            idx = head_index
        return self.adapt(_ReplayHeads.apply(out, xs, hidden, idx, self.W1, self.b1, self.W2, self.b2), raw)

    def adapt(self, out: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
        """The adapter's mix ``ADAPTER_RATIO * out + (1 - ADAPTER_RATIO) * raw`` (``out`` without adapter).

        ``out`` is a head output, ``raw`` the unstandardised input broadcastable to it."""
        return ADAPTER_RATIO * out + (1.0 - ADAPTER_RATIO) * raw if self.adapter else out

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std

    def _weights(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        params = (self.W1, self.b1, self.W2, self.b2)
        if idx is None or _is_all_heads(idx, self.W1.shape[0]):
            return params  # all heads in order: skip the copy that index_select would make
        return tuple(p.index_select(0, idx) for p in params)

    def _heads(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        b, r, d = x.shape
        w1, b1, w2, b2 = self._weights(idx)  # [Kp, D, D], [Kp, D], [Kp, D, D], [Kp, D]
        flat = self._standardize(x).reshape(1, b * r, d)
        # both layers are batched matmuls over the heads: [1 -> Kp, BR, D] x [Kp, D, D]
        hidden = self.dropout(torch.relu(torch.matmul(flat, w1) + b1.unsqueeze(1)))  # [Kp, BR, D]
        out = torch.baddbmm(b2.unsqueeze(1), hidden, w2)  # [Kp, BR, D]
        return self.adapt(out.transpose(0, 1).reshape(b, r, -1, d), x.unsqueeze(2))

    def extra_repr(self) -> str:
        return (
            f"emb_dim={self.emb_dim}, num_attributes={self.num_attributes}, "
            f"one_proj={self.one_proj}, adapter={self.adapter}"
        )


class _ReplayHeads(torch.autograd.Function):
    """Identity on precomputed head outputs whose backward is that of ``relu(xs @ W1 + b1) @ W2 + b2``.

    Forward: ``out [Kp, B, D]`` passes through (it was computed without autograd). Backward, per head
    ``k = idx[j]`` for column ``j``: ``dW2 = hidden^T g``, ``db2 = sum g``, ``dh = (g W2^T) * [hidden > 0]``,
    ``dW1 = xs^T dh``, ``db1 = sum dh``; columns sharing a head (one_proj) add up, heads outside ``idx``
    get zeros, exactly as the backward of ``index_select`` gives them.
    """

    @staticmethod
    def forward(ctx, out, xs, hidden, idx, w1, b1, w2, b2):
        # (idx None: column k is head k, all heads)
        ctx.save_for_backward(xs, hidden, idx, w2)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        xs, hidden, idx, w2 = ctx.saved_tensors
        # under autocast the cached rows are in the compute dtype (fp16/bf16): the backward runs in it
        # too, as autograd's would; the engine casts the weight gradients back to the weights' dtype
        dtype = hidden.dtype
        grad, xs = grad.to(dtype).contiguous(), xs.to(dtype)
        all_heads = idx is None or _is_all_heads(idx, len(w2))
        w2_sel = (w2 if all_heads else w2.index_select(0, idx)).to(dtype)
        g_w2 = torch.bmm(hidden.transpose(1, 2), grad)  # [Kp, D, D]
        # ReLU's backward as autograd runs it (masked_fill with a bool mask is ~30x slower on CPU)
        g_hidden = torch.ops.aten.threshold_backward(torch.bmm(grad, w2_sel.transpose(1, 2)), hidden, 0.0)
        g_w1 = torch.bmm(xs.transpose(1, 2), g_hidden)
        grads = (g_w1, g_hidden.sum(1), g_w2, grad.sum(1))
        if not all_heads:
            grads = tuple(g.new_zeros((len(w2), *g.shape[1:])).index_add_(0, idx, g) for g in grads)
        return None, None, None, None, *grads


def _is_all_heads(idx: torch.Tensor, heads: int) -> bool:
    # (torch.equal waits for the device; the None spelling of "all heads" does not)
    return idx.numel() == heads and torch.equal(idx, torch.arange(heads, device=idx.device))

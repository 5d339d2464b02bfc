"""The stage-1 mapping model: one projection head per attribute, all heads in one batched op."""

from __future__ import annotations

import math

import torch
from torch import nn

#: the adapter mixes the head's output with the untouched input: ADAPTER_RATIO * head(x) + (1 - ratio) * x
ADAPTER_RATIO = 0.2


class MappingModel(nn.Module):
    """K heads ``Linear(D, D) -> ReLU -> Linear(D, D)`` stored as stacked parameters.

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
        num_attributes: int = 20,
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
        if head_index is None:
            head_index = torch.arange(self.num_attributes, device=regions.device)
        kp = head_index.numel()
        if self.one_proj:
            # one shared head: project once, then broadcast to the Kp attributes (a view, no copy)
            out = self._heads(regions, torch.zeros(1, dtype=torch.long, device=regions.device))
            return out.expand(*out.shape[:2], kp, out.shape[-1])
        return self._heads(regions, head_index)

    def project_each(self, x: torch.Tensor, head_index: torch.Tensor) -> torch.Tensor:
        """Apply head ``head_index[j]`` to ``x[:, j]`` only (one input per head, not every head on every input).

        Args:
            x: ``[N, Kp, D]``; head_index: ``[Kp]`` long.

        Returns:
            ``[N, Kp, D]``.
        """
        idx = torch.zeros_like(head_index) if self.one_proj else head_index
        w1, b1, w2, b2 = self._weights(idx)
        xt = self._standardize(x).transpose(0, 1).contiguous()  # [Kp, N, D]
        hidden = self.dropout(torch.relu(torch.baddbmm(b1.unsqueeze(1), xt, w1)))
        out = torch.baddbmm(b2.unsqueeze(1), hidden, w2).transpose(0, 1)
        return ADAPTER_RATIO * out + (1.0 - ADAPTER_RATIO) * x if self.adapter else out

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std

    def _weights(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = (self.W1, self.b1, self.W2, self.b2)
        if idx.numel() == self.W1.shape[0] and torch.equal(idx, torch.arange(idx.numel(), device=idx.device)):
            return params  # all heads in order: skip the copy that index_select would make
        return tuple(p.index_select(0, idx) for p in params)

    def _heads(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b, r, d = x.shape
        w1, b1, w2, b2 = self._weights(idx)  # [Kp, D, D], [Kp, D], [Kp, D, D], [Kp, D]
        flat = self._standardize(x).reshape(1, b * r, d)
        # both layers are batched matmuls over the heads: [1 -> Kp, BR, D] x [Kp, D, D]
        hidden = self.dropout(torch.relu(torch.matmul(flat, w1) + b1.unsqueeze(1)))  # [Kp, BR, D]
        out = torch.baddbmm(b2.unsqueeze(1), hidden, w2)  # [Kp, BR, D]
        out = out.transpose(0, 1).reshape(b, r, -1, d)
        if self.adapter:
            out = ADAPTER_RATIO * out + (1.0 - ADAPTER_RATIO) * x.unsqueeze(2)
        return out

    def extra_repr(self) -> str:
        return (
            f"emb_dim={self.emb_dim}, num_attributes={self.num_attributes}, "
            f"one_proj={self.one_proj}, adapter={self.adapter}"
        )

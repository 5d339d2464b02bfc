"""torchrun / DistributedDataParallel plumbing. A single-process run needs no torchrun and no process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); else a 1-process context."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def context() -> DistContext:
    """The current context without initialising anything."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def is_main_process() -> bool:
    return context().is_main


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` across ranks (in place; returned for convenience). A no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _pad_for_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Pad dim 0 to the longest rank's length (all_gather needs equal shapes); also return every rank's length."""
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(s) for s in sizes]
    padding = tensor.new_zeros((max(sizes) - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding]), sizes


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank the part of its own rows."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor) -> torch.Tensor:
        gathered = [torch.zeros_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, padded.contiguous())
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` ([n_rank, ...], n may differ per rank) from every rank along dim 0, keeping autograd.

    Returns the concatenation and the offset of this rank's rows in it. Contrastive losses use it so that
    every rank sees the negatives of the whole global batch, as a single process would; gradients flow
    back to the rank that owns each row. A no-op (offset 0) in a single process.
    """
    if _single_process():
        return tensor, 0
    padded, sizes = _pad_for_gather(tensor)
    gathered = _GatherWithGrad.apply(padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sum(sizes[: dist.get_rank()])


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, for tensors that need no gradient (masks, labels)."""
    if _single_process():
        return tensor
    as_bool = tensor.dtype == torch.bool  # gloo has no bool collectives
    padded, sizes = _pad_for_gather(tensor.detach().to(torch.uint8) if as_bool else tensor.detach())
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    out = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
    return out.bool() if as_bool else out


def any_across_ranks(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise logical OR of a bool tensor over all ranks (the tensor itself in a single process)."""
    if _single_process():
        return mask
    counts = mask.to(torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts > 0

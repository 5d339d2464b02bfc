"""torchrun / DistributedDataParallel plumbing. A single-process run needs no torchrun and no process group.

Under torchrun a failure on one rank ends every rank within seconds (:func:`watch_for_failures`,
:func:`report_failure`): torchrun's agent stops the other workers of its own node, but not those of other
nodes, which would wait in ``init_process_group`` or a collective until its timeout (30 min for gloo, 10
for NCCL; NCCL also never notices a dead peer by itself).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

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
        atexit.unregister(_leave_process_group)  # (once, however often a group is made and destroyed)
        atexit.register(_leave_process_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _leave_process_group() -> None:
    """At a normal exit, leave the process group while the interpreter is still whole. Left to interpreter
    teardown, gloo's worker threads can still hold work whose destruction needs Python, and the rank aborts
    after finishing ("terminate called without an active exception", SIGABRT: seen once in a loaded test run).
    A failing rank exits through :func:`_exit_now`, which skips this."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def context() -> DistContext:
    """The current context without initialising anything."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def is_main_process() -> bool:
    return context().is_main


def global_rank() -> int:
    """This process's global rank: from the process group when joined, else torchrun's ``RANK`` (so code
    that runs before the group is up, e.g. clearing a previous run's outputs, still leaves it to rank 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


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


# --------------------------------------------------------------------------- failure propagation
def _failure_key() -> str:
    """The store key a failing rank sets; per torchrun run and restart, so a restart starts clean."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return f"villa/failure/{run_id}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _connect_store(timeout_s: float) -> dist.TCPStore | None:
    """A client of torchrun's own key-value store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT).

    It is up before any worker starts and outlives them (the agents' exit barrier), so every rank can
    reach it before, during and after ``init_process_group``. None outside torchrun or when unreachable.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not launched_by_torchrun():
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
        )
    except (KeyError, ValueError, RuntimeError):
        return None


def _node() -> str:
    return os.environ.get("GROUP_RANK", "0")


#: seconds a rank stopped by a failure on its own node waits for that node's torchrun agent to stop it:
#: the agent then reports the failed rank, not this one, as the root cause
SAME_NODE_GRACE_S = 2.0


def _stop_for(record: dict) -> None:
    """End this rank because another one failed: one line per other node, then exit."""
    if str(record.get("node")) == _node():
        time.sleep(SAME_NODE_GRACE_S)
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"error: rank {record.get('rank')} (node {record.get('node')}) failed: {record.get('message')}",
            file=sys.stderr,
        )
    _exit_now(int(record.get("code", 1)) or 1)


def _exit_now(code: int) -> None:
    """Exit without unwinding: a process group's destructor or a DataLoader worker could block a normal exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _read(store: dist.TCPStore) -> dict:
    try:
        return json.loads(store.get(_failure_key()))
    except (ValueError, RuntimeError):
        return {}


def watch_for_failures() -> None:
    """Under torchrun, start a daemon thread that ends this process as soon as another rank reports a
    failure (:func:`report_failure`); a no-op otherwise. Entry points call it before any work."""
    if not launched_by_torchrun() or getattr(watch_for_failures, "started", False):
        return
    watch_for_failures.started = True
    me = os.environ.get("RANK")

    def watch() -> None:
        store = _connect_store(timeout_s=60)
        if store is None:
            return
        try:
            # one long wait: the store answers the moment the key is set (no polling, no timeout noise)
            store.wait([_failure_key()], timedelta(days=3650))
        except RuntimeError:  # the store is gone: the job is over
            return
        record = _read(store)
        if str(record.get("rank")) != me:
            _stop_for(record)

    threading.Thread(target=watch, name="villa-failure-watch", daemon=True).start()


def report_failure(message: str, code: int) -> None:
    """Tell every rank of this torchrun job that this one failed with ``message`` (the first report wins),
    then exit with ``code`` without unwinding. Only under torchrun; the caller has printed the error."""
    store = _connect_store(timeout_s=10)
    if store is not None:
        record = {"rank": os.environ.get("RANK"), "node": _node(), "code": code, "message": message}
        try:
            store.compare_set(_failure_key(), "", json.dumps(record))
        except RuntimeError:
            pass
    _exit_now(code)


def exit_if_peer_failed(grace_s: float = 2.0) -> None:
    """If another rank has reported a failure (waiting up to ``grace_s`` for its report), stop as it would.

    An exception in this rank's collective right after a peer died (gloo: "Connection closed by peer") is a
    consequence, not a cause: the peer's own report names the cause.
    """
    store = _connect_store(timeout_s=5)
    if store is None:
        return
    deadline = time.monotonic() + grace_s
    try:
        while not store.check([_failure_key()]):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
    except RuntimeError:
        return
    record = _read(store)
    if record and str(record.get("rank")) != os.environ.get("RANK"):
        _stop_for(record)

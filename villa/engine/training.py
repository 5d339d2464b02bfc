"""The training loop shared by stage 1 and stage 2.

``fit`` owns everything around the model's loss: device placement, mixed precision (CUDA; CPUs with native bf16),
gradient scaling, DistributedDataParallel under torchrun, seeded per-epoch shuffling, validation,
learning-rate scheduling, early stopping, ``metrics.csv``, ``curves.png``, the experiment trackers' per-epoch
metrics (:mod:`villa.engine.tracking`), atomic ``last.pkl`` / ``best.pkl`` and resume.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from villa.engine import distributed, tracking
from villa.engine.checkpoints import BEST, LAST, CheckpointWriter, host_copy, load_checkpoint, unwrap
from villa.engine.curves import CURVES_FILE, plot_curves
from villa.engine.device import autocast, keep_cpu_memory, keeps_cpu_memory, needs_grad_scaler
from villa.storage.artifacts import one_line
from villa.storage.errors import VillaError
from villa.storage.io import atomic_path, remove_own_file

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds", "data_seconds", "improved")

LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, int]"]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    run_dir: Path | None = None
    stopped_early: bool = False
    step_mode: str = "loader"  # how training batches ran: loader | resident | cuda_graph

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST


def move_to_device(batch, device: torch.device, non_blocking: bool = False, channels_last: bool = False):
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``.

    ``channels_last`` stores 4-D tensors (image batches) NHWC, the layout cuDNN convolutions prefer.
    """
    if torch.is_tensor(batch):
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device, non_blocking, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking, channels_last) for v in batch)
    return batch


def _unpack(out) -> tuple[torch.Tensor, torch.Tensor | int]:
    """``(loss, number of items)``: a loss function returns the loss, or the loss and its item count
    (an int, or a 0-d tensor left on the device: reading it would wait for the device every step)."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, 1


class _EpochTotals:
    """Sum of ``loss * items`` and of items over an epoch, kept on the device: one host sync an epoch on an
    accelerator. On the CPU reading a loss costs nothing, so each step's loss is checked at once there and a
    non-finite one stops the run at the step it appeared."""

    def __init__(self, device: torch.device, desc: str):
        # (MPS has no float64)
        self.sums = torch.zeros(
            2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device
        )
        self.desc, self.check_each_step = desc, device.type == "cpu"

    def add(self, loss: torch.Tensor, n_items) -> None:
        if self.check_each_step:
            _check_finite(float(loss.detach()), self.desc)
        loss = loss.detach().to(self.sums.dtype)
        if torch.is_tensor(n_items):
            n = n_items.to(self.sums.dtype)
            self.sums += torch.stack([loss * n, n])
        else:  # (a Python count: no host-to-device copy)
            self.sums[0] += loss * n_items
            self.sums[1] += n_items

    def mean(self) -> float:
        # (reduced where the sums live: NCCL reduces CUDA tensors only)
        sums = distributed.all_reduce_sum(self.sums.clone()).cpu()
        value = float(sums[0] / max(float(sums[1]), 1.0))
        _check_finite(value, self.desc)
        return value


def _check_finite(value: float, desc: str) -> None:
    if not math.isfinite(value):
        raise VillaError(f"{desc}: the loss became {value}; lower the learning rate or disable amp")


class _Postfix:
    """The progress bar's loss, read from the device at most every ``every`` seconds (each read syncs)."""

    def __init__(self, bar, enabled: bool, every: float = 0.5):
        self.bar, self.every, self.last = bar, every, -math.inf
        self.enabled = enabled and hasattr(bar, "set_postfix")

    def __call__(self, loss: torch.Tensor) -> None:
        if self.enabled and time.perf_counter() - self.last >= self.every:
            self.bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            self.last = time.perf_counter()


def _make_loader(dataset, batch_size, shuffle, seed, ctx, collate_fn, num_workers, pin_memory) -> DataLoader:
    """The epoch's batches: the sampler picks the indices in this process; with ``num_workers > 0`` worker
    processes build the batches (a dataset's ``__getitems__`` gathers a whole batch there, e.g. decodes its
    images), ``prefetch_factor`` (2) batches ahead each, kept alive across epochs (``persistent_workers``).

    Results do not depend on ``num_workers``: the order comes from the sampler, and the loader draws the
    workers' base seed from its own seeded generator, never from torch's global one (an iterator draws it once
    with persistent workers, every epoch without, which would shift the dropout of every epoch after the first).
    Workers run one torch thread each (PyTorch's default), so they take little CPU from the training step.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_sampler(dataset, shuffle, seed, ctx),
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def _sampler(dataset, shuffle: bool, seed: int, ctx) -> DistributedSampler:
    # DistributedSampler with one replica is an ordinary seeded, per-epoch reshuffling sampler, so one code
    # path serves single-process and torchrun runs, and a resumed run sees the same order as an uninterrupted one.
    return DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed, drop_last=False
    )


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    with atomic_path(run_dir / METRICS_FILE) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _is_run_file(path: Path) -> bool:
    """Whether ``path`` is a file :func:`fit` writes: a ``torch.save`` archive (``last.pkl``/``best.pkl``,
    a zip holding ``data.pkl``), the epoch table (a CSV whose header starts ``epoch,train_loss``) or the
    curves (a PNG)."""
    import zipfile

    if path.name == CURVES_FILE:
        try:
            with open(path, "rb") as fh:
                return fh.read(8) == b"\x89PNG\r\n\x1a\n"
        except OSError:
            return False
    if path.name == METRICS_FILE:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().startswith("epoch,train_loss")
        except (OSError, UnicodeDecodeError):
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``run_dir/metrics.csv`` as :func:`fit` wrote them (:data:`METRIC_COLUMNS`): numbers
    as floats (``epoch`` an int), ``val_loss`` None where there was no validation, ``improved`` a bool."""
    path = Path(run_dir) / METRICS_FILE
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["epoch"] = int(row["epoch"])
        for key in ("train_loss", "val_loss", "lr", "seconds", "data_seconds"):
            row[key] = float(row[key]) if row[key] not in ("", None) else None
        row["improved"] = row["improved"] == "True"
    return rows


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _run_epoch(
    model,
    loader,
    loss_fn,
    optimizer,
    scaler,
    device,
    amp,
    train,
    desc,
    progress,
    grad_clip_norm,
    channels_last,
):
    """One pass over ``loader``; returns (mean loss over items, seconds waiting for data).

    The losses are summed on the device (:class:`_EpochTotals`).
    """
    totals = _EpochTotals(device, desc)
    data_seconds = 0.0
    non_blocking = device.type == "cuda"  # pinned host memory -> asynchronous copies
    bar = _progress(loader, len(loader), desc, progress)
    postfix = _Postfix(bar, progress)
    tick = time.perf_counter()
    for batch in bar:
        batch = move_to_device(batch, device, non_blocking, channels_last)
        data_seconds += time.perf_counter() - tick
        with torch.set_grad_enabled(train), autocast(device, amp):
            loss, n_items = _unpack(loss_fn(model, batch))
        if train:
            _backward_and_step(model, loss, optimizer, scaler, grad_clip_norm)
        totals.add(loss, n_items)
        postfix(loss)
        tick = time.perf_counter()
    return totals.mean(), data_seconds


def _backward_and_step(model, loss, optimizer, scaler, grad_clip_norm) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()


def _run_resident_epoch(model, data, order, loss_fn, optimizer, scaler, device, amp, batch_size, desc,
                        progress, grad_clip_norm, captured):  # fmt: skip
    """One training pass over a device-resident dataset: ``order [N]`` (long, on the device) in batches of
    ``batch_size`` gathered by ``data.batch``; no DataLoader, no host sync per step. Full batches go
    through ``captured`` (a :class:`CapturedStep`) when given; the short last batch runs eagerly.
    Returns the mean loss over items."""
    totals = _EpochTotals(device, desc)
    starts = range(0, len(order), batch_size)
    bar = _progress(starts, len(starts), desc, progress)
    postfix = _Postfix(bar, progress)
    for start in bar:
        index = order[start : start + batch_size]
        if captured is not None and len(index) == batch_size:
            loss, n_items = captured(index)
        else:
            with autocast(device, amp):
                loss, n_items = _unpack(loss_fn(model, data.batch(index)))
            _backward_and_step(model, loss, optimizer, scaler, grad_clip_norm)
        totals.add(loss, n_items)
        postfix(loss)
    return totals.mean()


class CapturedStep:
    """One training step (gather the batch, forward, backward, optimiser update) of a full batch of a
    device-resident dataset, captured once as a CUDA graph and replayed: the step costs one launch
    instead of a hundred small kernel launches from Python.

    The capture follows PyTorch's whole-network recipe: a few warm-up steps on a side stream, gradients
    set to None so that backward allocates them in the graph's memory, the optimiser in ``capturable``
    mode (its step count stays on the device). The warm-up's updates are undone afterwards (parameters
    and optimiser state restored in place, as the graph refers to these very tensors), so training starts
    from exactly the state it was given (parameters, buffers and Adam's state, whose fresh values are zeros:
    hence Adam / AdamW only). The learning rate is frozen into the graph: no scheduler.
    """

    def __init__(self, model, data, loss_fn, optimizer, device: torch.device, amp: bool, batch_size: int,
                 warmup_steps: int = 3):  # fmt: skip
        self.model, self.data, self.loss_fn, self.optimizer = model, data, loss_fn, optimizer
        self.device, self.amp = device, amp
        # (warm-up batch: the first images; what it trains is undone below)
        self.index = torch.arange(batch_size, device=device) % len(data)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        buffers = list(model.buffers())  # (e.g. BatchNorm statistics: the warm-up would move them)
        saved_buffers = [b.clone() for b in buffers]
        # capturable Adam keeps its step count on the device (an eager run's resumed state may not)
        for p in params:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)
        saved_state = {
            p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
            for p in params
            if p in optimizer.state
        }
        for group in optimizer.param_groups:
            group["capturable"] = True
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    optimizer.zero_grad(set_to_none=True)
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss, self.n_items = self._step()
        finally:
            with torch.no_grad():
                for t, saved in zip(params + buffers, saved_params + saved_buffers):
                    t.copy_(saved)
                for p in params:
                    for key, value in optimizer.state.get(p, {}).items():
                        if torch.is_tensor(value):
                            before = saved_state.get(p, {}).get(key)
                            value.copy_(before) if before is not None else value.zero_()
            if not hasattr(self, "loss"):  # capture failed: eager steps need the usual optimiser
                for group in optimizer.param_groups:
                    group["capturable"] = False
                optimizer.zero_grad(set_to_none=True)
            else:
                # the short last batch of an epoch steps eagerly: torch would warn about capturable mode each run
                optimizer._warned_capturable_if_run_uncaptured = True

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp, cache_enabled=False):
            loss, n_items = _unpack(self.loss_fn(self.model, self.data.batch(self.index)))
        loss.backward()
        self.optimizer.step()
        if not torch.is_tensor(n_items):  # (a fill kernel: a host-to-device copy cannot be captured)
            n_items = torch.full((), n_items, device=self.device)
        return loss.detach(), n_items

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on the batch ``data.batch(index)``; returns the graph's ``(loss, items)`` (overwritten by the
        next call: add them up before calling again)."""
        self.index.copy_(index)
        self.graph.replay()
        return self.loss, self.n_items


def _graph_blocker(
    device, ctx, optimizer, scaler, scheduler, compile, grad_clip_norm, resident
) -> str | None:
    """Why a CUDA graph cannot capture this run's training step (None: it can)."""
    reasons = (
        (
            not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)),
            "an optimiser other than Adam / AdamW",
        ),
        (device.type != "cuda", "not on CUDA"),
        (not resident, "the data is not resident on the device"),
        (ctx.enabled, "torchrun (several processes)"),
        (scaler is not None, "fp16 gradient scaling"),
        (scheduler is not None, "a learning-rate scheduler"),
        (compile, "torch.compile"),
        (bool(grad_clip_norm), "gradient clipping"),
    )
    return next((why for blocked, why in reasons if blocked), None)


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    loss_fn: LossFn,
    *,
    batch_size: int,
    epochs: int,
    optimizer_factory: Callable,
    run_dir: str | os.PathLike,
    device: torch.device,
    seed: int = 0,
    collate_fn: Callable | None = None,
    scheduler_factory: Callable | None = None,
    amp: bool = True,
    resume: bool = False,
    early_stopping_patience: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    config: dict | None = None,
    extra: dict | None = None,
    desc: str = "train",
    grad_clip_norm: float | None = None,
    compile: bool = False,
    channels_last: bool = True,
    find_unused_parameters: bool = False,
    progress: bool = True,
    cpu_keep_freed_memory: bool | str = "auto",
    resident: bool = False,
    cuda_graphs: bool = False,
    val_loss_fn: Callable | None = None,
    checkpoint_every_s: float = 0.0,
    tracker: tracking.Trackers | None = None,
) -> FitResult:
    """Train ``model`` with ``loss_fn(model, batch)`` and return the per-epoch history.

    ``optimizer_factory(params)`` and ``scheduler_factory(optimizer)`` are Hydra partials. A
    ``ReduceLROnPlateau`` scheduler steps on the validation loss (train loss without a val set).
    Only rank 0 writes files. ``resume=True`` continues from ``run_dir/last.pkl`` when it exists.
    On CUDA, ``channels_last`` stores the model's convolutions and 4-D inputs NHWC (ignored on CPU).
    On the CPU, ``cpu_keep_freed_memory`` makes the process keep freed heap memory for reuse
    (:func:`villa.engine.device.keep_cpu_memory`, process-wide, not undone): steps run faster but the process stays
    at its peak. ``auto`` (the default) applies it when amp runs in bf16 on the CPU
    (:func:`villa.engine.device.keeps_cpu_memory`; docs/performance.md, "The CPU allocator setting").

    Small datasets can live on the device: with ``resident=True`` ``train_set`` and ``val_set`` are already
    there and give a whole batch with ``batch(index)`` (``index [B]`` long on the device; fixed shapes,
    e.g. :meth:`villa.mapping.data.Stage1Dataset.batch`); the epoch's batches then come from the same
    seeded order as the DataLoader's, gathered on the device, with no per-step host sync. ``cuda_graphs``
    then replays each full training batch as one captured CUDA graph (:class:`CapturedStep`) where the run
    allows it (single process, no scheduler, no gradient scaling, compile or clipping; else a note and
    eager steps). ``val_loss_fn(model, val_set) -> (sum of losses * items, items)`` computes the
    validation loss of the whole set at once, equal to the loader's batch-by-batch mean (single process).

    Checkpoints are written by a background thread (:class:`villa.engine.checkpoints.CheckpointWriter`) after the
    last epoch, on an early stop, and after any epoch that ends ``checkpoint_every_s`` seconds or more
    after the previous write (0: after every epoch). An improved model waiting for its write is held as a copy on
    its device and written as ``best.pkl`` before the next ``last.pkl``, so the two files always agree with
    each other (``metrics.csv`` is rewritten every epoch and may run ahead of them); a resumed run repeats at
    most about ``checkpoint_every_s`` seconds plus one epoch of training.

    ``tracker`` (:func:`villa.engine.tracking.open_tracker`, not started) gets every epoch's losses, learning rate and
    times and, at the end, the best epoch; it starts here, continuing the runs a resumed checkpoint names
    (``trackers``), and is left open for the caller to add its final figures and close. At the end of
    training (also when a resumed run has nothing left to train) ``curves.png`` is drawn from the history.
    """
    if epochs < 0:
        raise VillaError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise VillaError(f"batch_size must be >= 1, got {batch_size}")
    if len(train_set) == 0:
        raise VillaError("the training set is empty")
    run_dir = Path(run_dir)
    ctx = distributed.init_distributed(device)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cpu" and keeps_cpu_memory(cpu_keep_freed_memory, device, amp):
        # large activations reuse resident memory instead of page-faulting every step (faster, higher peak RSS)
        keep_cpu_memory()
    channels_last = channels_last and device.type == "cuda"
    if channels_last:
        model.to(device, memory_format=torch.channels_last)
    else:
        model.to(device)
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    scheduler = scheduler_factory(optimizer) if scheduler_factory is not None else None
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(device, amp) else None

    result = FitResult(run_dir=run_dir)
    epochs_without_improvement = 0
    start_epoch = 0
    if tracker is None or not ctx.is_main:  # (only global rank 0 logs)
        tracker = tracking.open_tracker(None, run_dir)
    tracker_ids = None
    if resume and (run_dir / LAST).is_file():
        ckpt = load_checkpoint(run_dir / LAST)
        try:
            unwrap(model).load_state_dict(ckpt["model"])
            # (a run that trained with CUDA graphs saved its optimiser in capturable mode: not this one's choice)
            capturable = [group.get("capturable") for group in optimizer.param_groups]
            optimizer.load_state_dict(ckpt["optimizer"])
            for group, value in zip(optimizer.param_groups, capturable):
                if value is not None:
                    group["capturable"] = value
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            # another model, optimiser or scheduler than this run's: resuming would mix two runs
            raise VillaError(
                f"{run_dir / LAST} does not fit this run ({one_line(err)}): run with resume=false to start over"
            ) from None
        start_epoch = int(ckpt["epoch"])
        result.history = list(ckpt.get("history", []))
        result.best_epoch = ckpt.get("best_epoch")
        result.best_val_loss = ckpt.get("best_val_loss")
        result.stopped_early = bool(ckpt.get("stopped_early", False))
        epochs_without_improvement = int(ckpt.get("epochs_without_improvement", 0))
        tracker_ids = ckpt.get("trackers")
        if ctx.is_main:
            print(f"resuming {desc} from {run_dir / LAST} after epoch {start_epoch}")
        if result.stopped_early:
            tracker.start(tracker_ids, step=start_epoch)  # (the caller may still log its final figures)
            if ctx.is_main:
                _draw_curves(result, desc)
            return result
    elif ctx.is_main:
        for stale in (
            LAST,
            BEST,
            METRICS_FILE,
            CURVES_FILE,
        ):  # a previous run's; one villa did not write is refused
            remove_own_file(run_dir / stale, _is_run_file, f"this run's {stale}")
    tracker.start(tracker_ids, step=start_epoch)

    train_model = model
    if ctx.enabled and device.type == "cuda":
        # batch statistics over the global batch, as one process would compute them (SyncBatchNorm is CUDA-only;
        # it reuses the BatchNorm parameters, so the optimiser built above still owns them)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if compile:
        train_model = torch.compile(train_model)

    if resident and ctx.enabled:
        raise ValueError(
            "resident data is for a single process: under torchrun each rank loads its own batches"
        )
    has_val = val_set is not None and len(val_set) > 0
    pin_memory = pin_memory and device.type == "cuda"
    if resident:  # the loader's seeded order, without the loader
        train_loader = None
        order_sampler = _sampler(train_set, True, seed, ctx)
    else:
        train_loader = _make_loader(
            train_set, batch_size, True, seed, ctx, collate_fn, num_workers, pin_memory
        )  # fmt: skip
        order_sampler = train_loader.sampler
    val_loader = None
    if has_val and (val_loss_fn is None or ctx.enabled):
        if resident:
            raise ValueError("resident data needs val_loss_fn")
        val_loader = _make_loader(val_set, batch_size, False, seed, ctx, collate_fn, num_workers, pin_memory)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    show = progress and ctx.is_main
    captured = None
    if cuda_graphs and start_epoch < epochs:
        blocker = _graph_blocker(device, ctx, optimizer, scaler, scheduler, compile, grad_clip_norm, resident)
        if blocker is None and len(train_set) >= batch_size:
            try:
                captured = CapturedStep(train_model, train_set, loss_fn, optimizer, device, amp, batch_size)
            except Exception as err:  # (state restored by CapturedStep: eager steps from the same point)
                print(f"note: {desc}: CUDA graph capture failed ({one_line(err)}); training with eager steps")
        elif blocker is not None and device.type == "cuda" and ctx.is_main:
            print(f"note: {desc}: no CUDA graph ({blocker}); training with eager steps")
    result.step_mode = "cuda_graph" if captured is not None else "resident" if resident else "loader"
    last_written = time.perf_counter()
    pending_best = None  # a copy of the best model, where it lives, not yet on disk
    with CheckpointWriter() as writer:  # (waits for the last write before fit returns or raises)
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            torch.manual_seed(seed + epoch)  # stochastic layers draw the same numbers on resume
            order_sampler.set_epoch(epoch)
            train_model.train()
            epoch_desc = f"{desc} epoch {epoch + 1}/{epochs}"
            if resident:
                order = torch.tensor(list(order_sampler), dtype=torch.long).to(device, non_blocking=True)
                train_loss = _run_resident_epoch(
                    train_model, train_set, order, loss_fn, optimizer, scaler, device, amp, batch_size, epoch_desc,
                    show, grad_clip_norm, captured,
                )  # fmt: skip
                data_seconds = 0.0
            else:
                train_loss, data_seconds = _run_epoch(
                    train_model, train_loader, loss_fn, optimizer, scaler, device, amp, True, epoch_desc, show,
                    grad_clip_norm, channels_last,
                )  # fmt: skip
            val_loss = None
            if val_loader is not None:
                train_model.eval()
                val_loss, _ = _run_epoch(
                    train_model, val_loader, loss_fn, None, None, device, amp, False, f"{desc} val", show, None,
                    channels_last,
                )  # fmt: skip
            elif has_val:
                train_model.eval()
                with torch.no_grad(), autocast(device, amp):
                    totals = _EpochTotals(device, f"{desc} val")
                    total, items = val_loss_fn(train_model, val_set)
                    totals.sums += torch.stack([total, items]).to(device, totals.sums.dtype)
                val_loss = totals.mean()
            monitored = val_loss if val_loss is not None else train_loss
            lr = optimizer.param_groups[0]["lr"]
            if plateau:
                scheduler.step(monitored)
            elif scheduler is not None:
                scheduler.step()
            improved = result.best_val_loss is None or monitored < result.best_val_loss
            if improved:
                result.best_val_loss, result.best_epoch = monitored, epoch + 1
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": lr,
                "seconds": round(time.perf_counter() - started, 3),
                "data_seconds": round(data_seconds, 3),
                "improved": improved,
            }
            result.history.append(row)
            result.stopped_early = (
                early_stopping_patience is not None and epochs_without_improvement >= early_stopping_patience
            )
            if ctx.is_main:
                state = {
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_val_loss": result.best_val_loss,
                    "epochs_without_improvement": epochs_without_improvement,
                    "stopped_early": result.stopped_early,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "trackers": tracker.run_ids,
                }
                if improved:  # (a copy where the model lives: to host memory only when written)
                    pending_best = writer.snapshot(
                        model, None, None, epoch + 1, config, extra, to_host=False, **state
                    )
                due = (
                    epoch + 1 == epochs
                    or result.stopped_early
                    or time.perf_counter() - last_written >= checkpoint_every_s
                )
                if due:  # (written while the next epoch trains; finished before fit returns or raises)
                    # the pending best is already a private copy; after the final epoch nothing changes the
                    # model or the optimiser, so the last write reads them in place: no host copies of a
                    # state that can be gigabytes (K heads of D x D weights and two AdamW moments each)
                    final = epoch + 1 == epochs or result.stopped_early
                    files = (
                        [(run_dir / BEST, host_copy(pending_best, copy=False))]
                        if pending_best is not None
                        else []
                    )
                    last = writer.snapshot(
                        model, optimizer, scheduler, epoch + 1, config, extra, copy=not final, **state
                    )
                    # best first: last.pkl never names a newer best.pkl than the one on disk
                    writer.submit(files + [(run_dir / LAST, last)])
                    pending_best, last_written = None, time.perf_counter()
                _write_metrics(run_dir, result.history)
                tracker.log_metrics(epoch + 1, tracking.epoch_metrics(row))
                val_text = f" val_loss {val_loss:.4f}" if val_loss is not None else ""
                print(
                    f"{desc} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f}{val_text} "
                    f"lr {lr:.2e} ({row['seconds']:.1f}s){' *' if improved else ''}",
                    flush=True,
                )
            distributed.barrier()
            if result.stopped_early:
                if ctx.is_main:
                    print(
                        f"{desc}: early stop, no val-loss improvement for {epochs_without_improvement} epochs"
                    )
                break
    if ctx.is_main:
        _draw_curves(result, desc)
        if result.best_epoch is not None:
            monitored = "val_loss" if has_val else "train_loss"
            best = {
                "summary/best_epoch": result.best_epoch,
                f"summary/best_{monitored}": result.best_val_loss,
            }
            tracker.log_summary(best)
    return result


def _draw_curves(result: FitResult, desc: str) -> None:
    """``curves.png`` of the run so far (nothing before the first epoch)."""
    if result.history:
        plot_curves(
            result.run_dir / CURVES_FILE, result.history, result.best_epoch, f"{desc}: {result.run_dir.name}"
        )

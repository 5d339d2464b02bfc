"""Schema of training checkpoints (``last.pkl`` / ``best.pkl``): the one reader and writer.

A checkpoint is a ``torch.save`` dict (loadable with ``weights_only=True``)::

    format                      1
    model                       state dict of the unwrapped model
    optimizer, scheduler, scaler  their state dicts (scheduler/scaler may be None)
    epoch                       number of completed epochs
    history                     list of per-epoch metric rows (the content of metrics.csv)
    best_val_loss, best_epoch, epochs_without_improvement, stopped_early
    config                      the resolved run config (plain dict) or None
    extra                       stage-specific plain data (e.g. the encoder config)
    trackers                    the run's experiment-tracker run ids, backend -> id (villa.engine.tracking), so that a
                                resumed run continues them; absent from older checkpoints, which still load
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from villa.storage.artifacts import damaged, load_torch, one_line, rerun_stage
from villa.storage.errors import VillaError
from villa.storage.io import save_torch

FORMAT_VERSION = 1
LAST = "last.pkl"
BEST = "best.pkl"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_payload(
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    epoch: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
    **state,
) -> dict:
    """The dict a checkpoint file holds (its tensors are the live ones: save or copy it at once)."""
    return {
        "format": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "config": config,
        "extra": extra or {},
        **state,
    }


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *args, **kwargs) -> Path:
    """Write a checkpoint atomically; arguments as :func:`checkpoint_payload` (``state`` adds top-level
    entries: history, best_val_loss, ...)."""
    save_torch(path, checkpoint_payload(model, *args, **kwargs))
    return Path(path)


def host_copy(obj, to_host: bool = True, copy: bool = True):
    """``obj`` with every tensor copied (to host memory, or where it is with ``to_host=False``) and every
    dict / list / tuple rebuilt, so that training can go on changing the originals.

    ``copy=False`` (with ``to_host``): tensors are only moved to host memory, one already there is kept as it
    is; for a state that nothing changes any more (a private copy, or the state after the last step)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=copy) if to_host else obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((key, host_copy(value, to_host, copy)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # (a state dict's module versions, read by load_state_dict)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(value, to_host, copy) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints from a background thread, so the next epoch trains while the file is written.

    :meth:`save` copies the checkpoint to host memory at once (the state at that moment), waits for the
    previous write, then hands the copy to a writer thread (``torch.save`` to a temporary name, then
    rename, as :func:`save_checkpoint`). :meth:`wait` blocks until everything handed over is on disk and
    re-raises a write's error; call it before reading the files (``with CheckpointWriter() as w:`` does).
    Writes happen in the order of the ``save`` calls.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @staticmethod
    def snapshot(model: torch.nn.Module, *args, to_host: bool = True, copy: bool = True, **kwargs) -> dict:
        """A checkpoint as of now (arguments as :func:`checkpoint_payload`), for :meth:`submit`: in host memory,
        or with ``to_host=False`` copied where the tensors live (on a GPU a fast copy; :func:`host_copy` it
        before submitting). ``copy=False``: host tensors are not copied (the state must not change until
        written)."""
        return host_copy(checkpoint_payload(model, *args, **kwargs), to_host, copy)

    def save(self, path: str | os.PathLike, model: torch.nn.Module, *args, **kwargs) -> Path:
        """Write the checkpoint of ``model`` (arguments as :func:`checkpoint_payload`) as of now."""
        self.submit([(Path(path), self.snapshot(model, *args, **kwargs))])
        return Path(path)

    def submit(self, files: list[tuple[str | os.PathLike, dict]]) -> None:
        """Write :meth:`snapshot` payloads, in this order, as one background job (after the previous job)."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(files,), name="checkpoint")
        self._thread.start()

    def _write(self, files: list[tuple[str | os.PathLike, dict]]) -> None:
        try:
            for path, payload in files:
                save_torch(path, payload)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
        else:  # finish the write, but let the exception in flight be the one reported
            try:
                self.wait()
            except BaseException:
                pass


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`VillaError` (one line naming the file, the damage and the training command that rebuilds
    it) when the file is absent, unreadable (truncated, foreign) or not a villa checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise VillaError(f"no checkpoint at {path}")

    def fix() -> str:
        return rerun_stage(path.parent)

    ckpt = load_torch(path, path.parent, fix, map_location=map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise damaged(path, path.parent, "is not a villa checkpoint", fix)
    version = ckpt.get("format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise damaged(
            path,
            path.parent,
            f"has format {version!r}, newer than this villa reads",
            rerun_stage(path.parent),
        )
    if not isinstance(ckpt.get("epoch", 0), int):
        raise damaged(path, path.parent, "has an invalid epoch", fix)
    return ckpt


def load_model_state(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Load a checkpoint's weights into ``model``; returns the whole checkpoint dict."""
    ckpt = load_checkpoint(path)
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise VillaError(
            f"checkpoint {path} does not fit this model ({one_line(err)}): check the experiment and its "
            f"model keys, or {rerun_stage(Path(path).parent)}"
        ) from None
    return ckpt

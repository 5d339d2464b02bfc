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
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from villa.artifacts import damaged, load_torch, one_line, rerun_stage
from villa.errors import VillaError
from villa.io import save_torch

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


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    epoch: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
    **state,
) -> Path:
    """Write a checkpoint atomically; ``state`` adds top-level entries (history, best_val_loss, ...)."""
    payload = {
        "format": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "config": config,
        "extra": extra or {},
        **state,
    }
    save_torch(path, payload)
    return Path(path)


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

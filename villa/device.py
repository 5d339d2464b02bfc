"""The one place that decides which device and which precision a run uses."""

from __future__ import annotations

import contextlib
import os

import torch

from villa.errors import VillaError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device; ``auto`` picks CUDA when present.

    Under torchrun, ``auto`` and ``cuda`` select the GPU of this process's ``LOCAL_RANK``.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VillaError(f"device '{spec}' requested but CUDA is not available on this machine")
        if spec == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    raise VillaError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device``: bf16 where supported, else fp16, on CUDA only; else None."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Autocast context for mixed precision on CUDA; a no-op elsewhere."""
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device, enabled: bool = True) -> bool:
    """fp16 autocast needs a gradient scaler; bf16 and fp32 do not."""
    return enabled and amp_dtype(device) == torch.float16

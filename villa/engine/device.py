"""The one place that decides which device and which precision a run uses."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

import torch

from villa.storage.errors import VillaError


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


#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic, which oneDNN uses for bf16 matrix products and
#: convolutions. Without them oneDNN emulates bf16 through float32 and is slower than float32 itself.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags_have_native_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text lists a flag of :data:`CPU_BF16_FLAGS`."""
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    return any(flag in flags for flag in CPU_BF16_FLAGS)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX) and torch's oneDNN can use it.

    Read from ``/proc/cpuinfo`` (Linux); elsewhere False, so amp stays float32 there."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return cpu_flags_have_native_bf16(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device``, or None where a run with amp stays float32.

    CUDA: bf16 where supported, else fp16. CPU: bf16 where the CPU has native bf16 (:func:`cpu_has_native_bf16`),
    else None. Other devices: None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@functools.cache
def _note_amp_stays_float32(device_type: str) -> None:
    # once per process and device type: autocast() is entered every step
    why = (
        "this CPU has no native bf16 (avx512_bf16 or amx_bf16)"
        if device_type == "cpu"
        else f"amp is not used on {device_type}"
    )
    print(f"note: {why}: running in float32 (amp=false silences this)", flush=True)


def autocast(device: torch.device, enabled: bool = True, cache_enabled: bool = True):
    """Autocast context for mixed precision (:func:`amp_dtype`); a no-op where the device has none.

    Under it, matrix products and convolutions run in bf16 (fp16 on CUDA without bf16) and reductions, norms
    and softmax in float32 (torch's autocast op lists); callers cast embeddings to float32 before losses and
    metrics. ``cache_enabled=False`` for code captured into a CUDA graph: the weight-cast cache would be freed
    when the context exits, under the graph's feet."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = amp_dtype(device)
    if dtype is None:
        _note_amp_stays_float32(device.type)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def needs_grad_scaler(device: torch.device, enabled: bool = True) -> bool:
    """fp16 autocast needs a gradient scaler; bf16 and fp32 do not."""
    return enabled and amp_dtype(device) == torch.float16


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_cpu_memory_kept = False


def keep_cpu_memory() -> bool:
    """Let this process reuse freed host memory for its large CPU tensors instead of returning it to the OS.

    glibc serves every allocation above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with
    a fresh ``mmap`` and unmaps it on free, so each large activation of a CPU training step is faulted in
    and zero-filled by the kernel page by page, every step: a fresh 35 MB tensor (one stage-2 layer4
    activation at batch 64) took ~38 ms to fill against ~2 ms for reused memory, and a stage-2 step at
    batch 64 took 230,000 page faults. With ``M_MMAP_MAX=0`` every block comes from the heap and
    ``M_TRIM_THRESHOLD=-1`` never shrinks it: from the third step on a training step took ~20 page faults
    and ran ~1.5x faster. The process keeps its peak footprint. Numerics are untouched.

    Process-wide and idempotent; a no-op off Linux/glibc. Returns whether the setting is in effect.
    """
    global _cpu_memory_kept
    if _cpu_memory_kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    _cpu_memory_kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _cpu_memory_kept


@functools.cache
def _glibc(name: str):
    """The C library's function ``name`` (``mallopt``, ``malloc_trim``), or None: another C library (musl has
    neither) or no C library to load."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the memory freed by the last forward pass to the OS.

    Batches of images of varying sizes leave glibc's heap fragmented: its free pages stay in the process, and
    the resident size between batches crept from 1.2 to 2.7 GB over 5,000 images of about 200x150 (rich
    features, 34 images a batch). ``malloc_trim(0)`` after every batch keeps the resident size at the live set
    (1.2 GB) and the peak at one batch above it, for no measurable CPU time (the batch's pages are faulted in
    again; a forward pass takes seconds). A no-op where the C library is not glibc.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_threads_for(cores: int, processes: int = 1, loader_workers: int = 0) -> int:
    """Torch intra-op threads for one of ``processes`` processes sharing ``cores``, each feeding itself with
    ``loader_workers`` DataLoader workers (one core each while they decode): the cores are split evenly,
    never below one thread. More threads than cores make torch's OpenMP threads wait at every barrier for a
    thread that another process holds off its core (docs/performance.md, "Training on a CPU")."""
    per_process = cores // max(1, processes) - max(0, loader_workers)
    return max(1, per_process)


def configure_threads(threads: int | str | None = "auto", loader_workers: int = 0) -> int:
    """Set this process's torch intra-op threads and return the number.

    ``auto`` (or None/0): :func:`torch_threads_for` the usable cores, the processes of this run on this
    machine (torchrun's ``LOCAL_WORLD_SIZE``, else 1) and ``loader_workers``. An explicit positive number
    (``threads=N`` in the configs, ``--threads`` in preprocessing) is used as given. An ``OMP_NUM_THREADS``
    in the environment counts as explicit for ``auto``: the user chose it.
    """
    if threads in (None, 0, "auto"):
        if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            count = max(1, int(os.environ["OMP_NUM_THREADS"]))
        else:
            processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            count = torch_threads_for(usable_cores(), processes, loader_workers)
    else:
        try:
            count = int(threads)
        except (TypeError, ValueError):
            raise VillaError(f"threads must be auto or a positive number, got '{threads}'") from None
        if count < 1:
            raise VillaError(f"threads must be auto or a positive number, got {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def keeps_cpu_memory(setting: bool | str | None, device: torch.device, amp: bool) -> bool:
    """Whether a run keeps freed heap memory (:func:`keep_cpu_memory`): ``true``/``false`` as given; ``auto``
    (or None) on the CPU exactly when ``amp`` runs there in bf16.

    Why bf16 decides it: keeping the heap removes the page faults of every step's large activations (a stage-2
    step at batch 64 ran 2-4x faster) but holds the process at its peak, and bf16 activations are half the
    size, so with both the peak stays below the float32 run's without the setting (docs/performance.md,
    "Training on a CPU"); in float32 the kept peak grows (up to 1.6x)."""
    if setting is None or (isinstance(setting, str) and setting.strip().lower() == "auto"):
        return device.type == "cpu" and amp and amp_dtype(device) == torch.bfloat16
    if isinstance(setting, str):
        word = setting.strip().lower()
        if word not in ("true", "false"):
            raise VillaError(f"cpu_keep_freed_memory must be auto, true or false, got '{setting}'")
        return word == "true"
    return bool(setting)

"""``env.json``: what produced a run, written into its run folder when the run starts.

Fields (:func:`environment`)::

    format          1
    stage           the entry point (stage1, stage2, evaluate, sweep)
    started         UTC time, ISO 8601
    command         the full command line (the interpreter, ``-m <module>`` or the script, the arguments),
                    and command_line, the same as one string
    cwd             the working directory
    seed, world_size   the run's seed and its number of processes (torchrun's WORLD_SIZE, 1 without)
    python, platform   Python version, operating system
    packages        versions of villa, torch, torchvision, open_clip_torch, transformers, numpy
                    (and of the trackers' packages that are installed); null when not installed
    cuda            {available, version (torch's CUDA build), cudnn, devices: [names]}
    device          {type, name}: the run's device (cpu: the CPU model)
    cpu             {model, cores (os.cpu_count), usable_cores (this process's affinity), torch_threads}
    git             {commit, dirty, root} of the checkout villa runs from (dirty: tracked files changed);
                    null outside a git checkout or without git
    earlier         the records of earlier starts in this run folder (a resumed run, evaluation into a
                    training run's folder), oldest first, without their own ``earlier``

A run that resumes on another machine or commit keeps the first start's record under ``earlier``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from villa.storage.io import write_json

ENV_FILE = "env.json"
FORMAT_VERSION = 1
#: distributions whose versions every record holds
PACKAGES = ("villa", "torch", "torchvision", "open_clip_torch", "transformers", "numpy")
#: tracker distributions, recorded when installed
TRACKER_PACKAGES = ("tensorboard", "wandb", "mlflow", "mlflow-skinny")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def git_state(path: str | os.PathLike | None = None) -> dict | None:
    """``{commit, dirty, root}`` of the git checkout holding ``path`` (default: villa's source), or None
    outside one (or without git). ``dirty``: tracked files differ from the commit (untracked files, such as
    data and run folders, do not count)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "root": git("rev-parse", "--show-toplevel"),
    }


def _cuda() -> dict:
    import torch

    available = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "available": available,
        "version": torch.version.cuda,
        "cudnn": cudnn,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if available
        else [],
    }


def _device(device) -> dict | None:
    """The device record of ``device``: a ``torch.device`` or a spec such as ``"auto"`` (resolved as the run
    resolves it)."""
    if device is None:
        return None
    import torch

    from villa.engine.device import resolve_device

    device = resolve_device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    if device.type == "cpu":
        return {"type": "cpu", "name": cpu_model()}
    return {"type": device.type, "name": str(device)}


def environment(stage: str, *, seed: int | None = None, device=None, world_size: int | None = None) -> dict:
    """The record :func:`write_environment` writes (module docstring) for a start of ``stage`` now."""
    import torch

    from villa.engine.device import usable_cores

    argv = [sys.executable, *sys.argv]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # `python -m villa.stage2 ...`, as typed (argv[0] is the file)
        argv = [sys.executable, "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    packages = {name: _version(name) for name in PACKAGES}
    packages.update({name: v for name in TRACKER_PACKAGES if (v := _version(name)) is not None})
    return {
        "format": FORMAT_VERSION,
        "stage": stage,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": argv,
        "command_line": shlex.join(argv),
        "cwd": os.getcwd(),
        "seed": seed,
        "world_size": int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "cuda": _cuda(),
        "device": _device(device),
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(),
        },
        "git": git_state(),
    }


def read_environment(run_dir: str | os.PathLike) -> dict | None:
    """``run_dir/env.json`` (None when absent or unreadable)."""
    try:
        record = json.loads((Path(run_dir) / ENV_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_environment(
    run_dir: str | os.PathLike,
    stage: str,
    *,
    seed: int | None = None,
    device=None,
    world_size: int | None = None,
) -> dict | None:
    """Write ``run_dir/env.json`` for a start of ``stage`` (an earlier record there moves under ``earlier``)
    and return the record. Only global rank 0 writes; the others return None."""
    from villa.engine import distributed

    if distributed.global_rank() != 0:
        return None
    run_dir = Path(run_dir)
    record = environment(stage, seed=seed, device=device, world_size=world_size)
    previous = read_environment(run_dir)
    if previous is not None and previous.get("format") == FORMAT_VERSION:
        earlier = list(previous.pop("earlier", None) or [])
        record["earlier"] = [*earlier, previous]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / ENV_FILE, record)
    return record

"""Shared checks for reading artifacts: a damaged file gives ONE line naming the file, what is wrong with it
and the command that rebuilds it, never a traceback from numpy, pyarrow, json or torch.

The module that owns an artifact (:mod:`villa.features.embeddings`, :mod:`villa.engine.checkpoints`,
:mod:`villa.mapping.schema`, the sweep's markers in :mod:`villa.docmnist.complexity_sweep`) calls these helpers;
every message has the form::

    <file relative to its folder> in <folder> <problem>: <fix>
    region_embs/shard_00000.npy in /data/x is truncated (12,288 of 24,576 bytes): re-run python3 \
preprocess/preprocess_dataset.py --data_dir=/data/x

The rebuild commands live here, in :func:`preprocess_command` and :func:`stage_command`, so they change in
one place. Nothing here reads a whole file unless asked to: ``.npy`` headers are read and compared with the
expected shape before anything is memory-mapped, so a truncated array never reaches ``numpy.memmap``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from villa.storage.errors import VillaError

#: the generic preprocessing command (``preprocess_docmnist.py`` stays as an alias)
PREPROCESS_SCRIPT = "preprocess/preprocess_dataset.py"


# --------------------------------------------------------------------------- rebuild commands
def preprocess_command(dataset_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """The command that rebuilds a dataset's embeddings (with the encoder a readable manifest names)."""
    parts = ["python3", PREPROCESS_SCRIPT, f"--data_dir={dataset_dir}"]
    manifest = manifest if isinstance(manifest, dict) else {}
    encoder = manifest.get("encoder")
    if isinstance(encoder, str) and encoder != "default":
        parts.append(f"--encoder={encoder}")
        config = manifest.get("encoder_config")
        weights = config.get("clip_weights") if isinstance(config, dict) else None
        if isinstance(weights, str):
            parts.append(f"--clip_weights={weights}")
    return " ".join(shlex.quote(p) for p in parts)


def rerun_preprocessing(dataset_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    return f"re-run {preprocess_command(dataset_dir, manifest)}"


def stage_command(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str:
    """The command that rebuilds a stage-1/stage-2 run folder.

    Taken from the folder's ``.hydra/`` record (the exact overrides of the last Hydra run there, without
    ``resume=``); else ``python -m villa.<stage> experiment=<folder name> checkpoint_dir=<folder>
    data_dir=<its dataset>`` when an experiment of that name exists (runs made through
    :func:`villa.engine.hydra_app.compose`, e.g. by the sweep, leave no record; ``<folder>`` is the parent of the
    run folder, or its grandparent for the experiments that keep each dataset's runs apart, and ``data_dir``
    fills in the dataset when known); else a plain description.
    """
    run_dir = Path(run_dir)
    hydra_dir = run_dir / ".hydra"
    try:
        import yaml

        stage = yaml.safe_load((hydra_dir / "config.yaml").read_text()).get("stage")
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
        if stage in ("stage1", "stage2") and isinstance(overrides, list):
            kept = [str(o) for o in overrides if not str(o).lstrip("+~").startswith("resume=")]
            return " ".join(["python", "-m", f"villa.{stage}", *(shlex.quote(o) for o in kept)])
    except Exception:  # no or damaged record: fall back below
        pass
    try:
        stage = _experiment_value(run_dir.name, "stage")
        if stage in ("stage1", "stage2"):
            per_dataset = "villa_name" in str(_experiment_value(run_dir.name, "run_dir") or "")
            checkpoint_dir = run_dir.parent.parent if per_dataset else run_dir.parent
            dataset = shlex.quote(str(data_dir)) if data_dir is not None else "<its dataset>"
            return (
                f"python -m villa.{stage} experiment={shlex.quote(run_dir.name)} "
                f"checkpoint_dir={shlex.quote(str(checkpoint_dir))} data_dir={dataset}"
            )
    except Exception:
        pass
    return f"the stage that wrote {run_dir}"


def _experiment_value(name: str, key: str, depth: int = 0):
    """The value of ``key`` in ``configs/experiment/<name>.yaml``, following its ``defaults`` list."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "experiment" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() and depth < 5 else None
    if not isinstance(config, dict):
        return None
    if config.get(key):
        return config[key]
    for parent in config.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            value = _experiment_value(parent, key, depth + 1)
            if value:
                return value
    return None


def rerun_stage(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str:
    return f"re-run {stage_command(run_dir, data_dir)}"


# --------------------------------------------------------------------------- messages
#: the remedy of a message: a string, or a function that builds it only when an error is raised (a
#: stage command reads the run folder's .hydra record, which a healthy read must not touch)
Fix = str | Callable[[], str]


def damaged(path: str | os.PathLike, root: str | os.PathLike, problem: str, fix: Fix) -> VillaError:
    """``VillaError("<path relative to root> in <root> <problem>: <fix>")``, on one line."""
    fix = fix() if callable(fix) else fix
    path, root = Path(path), Path(root)
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name, root = path.name, path.parent
    text = f"{name} in {root} {problem}: {fix}"
    return VillaError(text.replace("\r", " ").replace("\n", " "))


def one_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened (library errors can span many lines)."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else type(err).__name__
    if len(text) > limit:  # keep the first sentence of a long library message
        text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size_problem(actual: int, expected: int) -> str:
    if actual < expected:
        return f"is truncated ({actual:,} of {expected:,} bytes)"
    return f"has the wrong size ({actual:,} bytes, expected {expected:,})"


# --------------------------------------------------------------------------- JSON
def read_json(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike,
    fix: Fix,
    required: Iterable[str] = (),
) -> dict:
    """Parse a JSON object; a missing or damaged file, a non-object or missing keys raise one line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise damaged(path, root, "is missing", fix) from None
    except UnicodeDecodeError:
        raise damaged(path, root, "is not UTF-8 text (damaged)", fix) from None
    except OSError as err:
        raise damaged(path, root, f"cannot be read ({one_line(err)})", fix) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        reason = err.msg.removesuffix(" starting at")
        problem = "is empty" if not text.strip() else f"is not valid JSON (line {err.lineno}: {reason})"
        raise damaged(path, root, problem, fix) from None
    if not isinstance(value, dict):
        raise damaged(path, root, f"holds a JSON {type(value).__name__}, not an object", fix)
    missing = [key for key in required if key not in value]
    if missing:
        raise damaged(path, root, f"lacks keys {missing}", fix)
    return value


# --------------------------------------------------------------------------- files, checksums
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# full sha256 of files already hashed in this process: (path, size, mtime_ns) -> digest, so a large file
# (weights, an annotation table) read again unchanged is not hashed again
_DIGESTS: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256` of ``path``, computed once per (resolved path, size, mtime) in this process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = file_sha256(path)
    return digest


class HashingWriter:
    """A binary file wrapper that counts and hashes what is written (no second read of big arrays)."""

    def __init__(self, fh):
        self._fh, self.digest, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.bytes += len(view)
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()


def save_npy(path: str | os.PathLike, array: np.ndarray) -> dict:
    """``np.save`` and return the file's record ``{"bytes", "rows", "sha256"}`` for a manifest."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as fh:
        writer = HashingWriter(fh)
        np.lib.format.write_array(writer, array, allow_pickle=False)
    return {"bytes": writer.bytes, "rows": int(array.shape[0]), "sha256": writer.digest.hexdigest()}


def file_record(path: str | os.PathLike, rows: int) -> dict:
    """Manifest record ``{"bytes", "rows", "sha256"}`` of a written file."""
    return {"bytes": os.path.getsize(path), "rows": int(rows), "sha256": file_sha256(path)}


def check_file(path: Path, root: Path, fix: Fix, record: dict | None = None) -> int:
    """The file's size; raises when it is missing or differs from ``record["bytes"]``."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise IsADirectoryError("not a regular file")
    except FileNotFoundError:
        raise damaged(path, root, "is missing", fix) from None
    except OSError as err:
        raise damaged(path, root, f"cannot be read ({one_line(err)})", fix) from None
    expected = record.get("bytes") if record else None
    if isinstance(expected, int) and size != expected:
        raise damaged(path, root, size_problem(size, expected), fix)
    return size


# sha256 already verified in this process: (path, size, mtime_ns) -> digest, so reopening the same
# embeddings (the sweep, tests, notebooks) does not hash them again
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_sha256(path: Path, root: Path, expected: str, fix: Fix) -> None:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == expected:
        return
    if file_sha256(path) != expected:
        raise damaged(path, root, "does not match the checksum in its manifest (damaged or modified)", fix)
    _VERIFIED[key] = expected


# --------------------------------------------------------------------------- .npy
def npy_header(path: Path, root: Path, fix: Fix) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from a ``.npy`` header, without reading the data."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
    except FileNotFoundError:
        raise damaged(path, root, "is missing", fix) from None
    except Exception as err:  # bad magic, a header cut short, a foreign file
        raise damaged(path, root, f"has no valid .npy header ({one_line(err)})", fix) from None
    return tuple(int(n) for n in shape), dtype, bool(fortran), offset


def open_npy(
    path: Path,
    root: Path,
    fix: Fix,
    *,
    shape: tuple[int | None, ...],
    dtype=np.float32,
    record: dict | None = None,
) -> np.ndarray:
    """Memory-map a ``.npy`` file after checking its size, header, shape and dtype.

    ``shape`` entries that are None are not checked; ``record`` (a manifest entry) adds its byte size.
    """
    size = check_file(path, root, fix, record)
    found_shape, found_dtype, fortran, offset = npy_header(path, root, fix)
    if found_dtype.hasobject:
        raise damaged(path, root, "holds Python objects, not numbers", fix)
    if found_dtype != np.dtype(dtype):
        raise damaged(path, root, f"holds {found_dtype}, expected {np.dtype(dtype)}", fix)
    if len(found_shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(found_shape, shape)
    ):
        raise damaged(path, root, f"has shape {_shape(found_shape)}, expected {_shape(shape)}", fix)
    expected = offset + int(np.prod(found_shape, dtype=np.int64)) * found_dtype.itemsize
    if size != expected:
        raise damaged(path, root, size_problem(size, expected), fix)
    if expected == offset:  # nothing to map (mmap refuses a zero-length map)
        return np.zeros(found_shape, dtype=found_dtype)
    return np.memmap(
        path, dtype=found_dtype, mode="r", shape=found_shape, offset=offset, order="F" if fortran else "C"
    )


def _shape(shape) -> str:
    return "(" + ", ".join("?" if n is None else str(n) for n in shape) + ")"


# --------------------------------------------------------------------------- torch
def load_torch(path: Path, root: str | os.PathLike, fix: Fix, map_location="cpu"):
    """``torch.load(weights_only=True)``; a truncated, damaged or foreign file raises one line."""
    import torch

    check_file(path, Path(root), fix)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a zip cut short, a foreign pickle
        raise damaged(path, root, f"is damaged or truncated (torch.load: {one_line(err)})", fix) from None


# --------------------------------------------------------------------------- feather
def read_feather_table(
    path: Path,
    root: Path,
    fix: Fix,
    *,
    columns: Iterable[str] = (),
    rows: int | None = None,
    record: dict | None = None,
):
    """Read a feather file as a ``pyarrow.Table``; damage, missing columns or a row count other than
    ``rows`` raise one line. ``record`` (a manifest entry) adds its byte size."""
    import pyarrow.feather as feather

    check_file(path, root, fix, record)
    try:
        table = feather.read_table(path, memory_map=False)
    except Exception as err:  # truncated, half-written or foreign file
        raise damaged(path, root, f"is not a readable feather table ({one_line(err)})", fix) from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise damaged(path, root, f"lacks columns {missing}", fix)
    if rows is not None and table.num_rows != rows:
        raise damaged(path, root, f"has {table.num_rows:,} rows, expected {rows:,}", fix)
    return table

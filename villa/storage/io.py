"""Atomic file and folder writes: a crash never leaves a half-written artifact under its final name."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from villa.storage.errors import VillaError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import (setting it to read it is not thread-safe); tempfile's owner-only modes are
# replaced by the modes a plain open()/mkdir() would give, so artifacts stay readable as usual
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as err:
        try:
            failure = _write_failure(err, final.parent)  # (free space measured before the partial file goes)
        finally:
            tmp.unlink(missing_ok=True)
        if failure is not None:
            raise WriteRefused(f"could not write {final}: {failure}") from err
        raise


class WriteRefused(VillaError, OSError):
    """A write the disk refused (full, over quota, over the file-size limit): one line for the user
    (:class:`VillaError`), and still an :class:`OSError` for callers whose writes are best-effort."""


#: errno values of a write that the disk refused: full, over quota, or over the file-size limit
_DISK_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: what torch.save's C++ writer raises when a write to its file fails (it keeps no errno)
_TORCH_WRITE_FAILED = ("iostream error", "unexpected pos", "failed writing")


def _write_failure(err: BaseException, directory: Path) -> str | None:
    """One line on ``err`` with the free space left under ``directory``, when ``err`` is a write the disk
    refused; None for any other error (a bug keeps its traceback)."""
    if isinstance(err, OSError) and err.errno in _DISK_REFUSED:
        reason = os.strerror(err.errno)
    elif isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILED):
        reason = "the write failed"
    else:
        return None
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:,.0f} MB free on its disk"
    except OSError:
        free = "free space unknown"
    return f"{reason} ({free})"


#: suffixes of ``atomic_dir``'s hidden siblings: the complete old folder moved aside, and one being deleted
_ASIDE, _TRASH = ".old", ".trash"


def _hidden_siblings(final: Path, suffix: str) -> list[Path]:
    """``final``'s hidden siblings ``.<name>.<random><suffix>``, newest first."""
    found = [p for p in final.parent.glob(f".{glob.escape(final.name)}.*{suffix}") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _recover(final: Path) -> None:
    """Undo what a killed ``atomic_dir`` swap left: a complete old folder aside while nothing is under
    ``final`` goes back; asides no longer needed and half-deleted trash go."""
    asides = _hidden_siblings(final, _ASIDE)
    if asides and not final.exists():
        os.replace(asides.pop(0), final)
    for aside in asides:
        _discard(aside)
    for trash in _hidden_siblings(final, _TRASH):
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike, overwrite: bool = False, own_marker: str | None = None
) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; move it to ``final`` only if the block succeeds.

    With ``overwrite``, an existing ``final`` is replaced so that at every instant one complete folder
    exists, under ``final`` or, between the two renames of the swap, under a hidden ``.<name>.*.old``
    aside: the old folder is renamed aside, the new one renamed in, and only then is the old one deleted
    (renamed to ``.*.trash`` first, so that an interrupted delete never leaves a half folder that looks
    complete). An exception during the swap puts the old folder back; a killed process may leave the
    aside, which the next ``atomic_dir`` on the same ``final`` moves back when ``final`` is missing.
    ``own_marker``: an existing ``final`` is replaced only when it holds this file (which villa writes into
    every such folder), else refused in one line before anything is written (:func:`check_own_folder`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    if overwrite and own_marker is not None:
        check_own_folder(final, own_marker, "a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    # a name only this call uses: whether it exists tells, even after an interrupt, how far the swap got
    aside = final.with_name(f".{final.name}.{tmp.name[len(final.name) + 2 : -4]}{_ASIDE}")
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        if aside.exists():
            if tmp.exists():  # the old folder is aside and the new one never got in: put it back
                try:
                    os.replace(aside, final)
                except OSError:
                    if not final.is_dir():
                        raise
                    _discard(aside)  # a concurrent writer's complete folder took the name meanwhile
            else:  # interrupted after the new folder got in
                _discard(aside)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside.exists():
        _discard(aside)


def _discard(aside: Path) -> None:
    """Delete an old folder that was moved aside, renaming it to trash first (see :func:`atomic_dir`)."""
    trash = aside.with_name(aside.name[: -len(_ASIDE)] + _TRASH)
    try:
        os.replace(aside, trash)
    except FileNotFoundError:  # another process's recovery took it
        return
    shutil.rmtree(trash, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_feather(path: str | os.PathLike, frame) -> None:
    """``DataFrame.to_feather`` atomically (the index is dropped)."""
    with atomic_path(path) as tmp:
        frame.reset_index(drop=True).to_feather(tmp)


# --------------------------------------------------------------------------- replacing only what villa wrote
def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both already resolved)."""
    return path == folder or folder in path.parents


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    is_own: Callable[[Path], bool],
    own_marker: str,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    flag: str = "--overwrite",
) -> Path:
    """Check, before any work, that writing the folder ``out`` (with :func:`atomic_dir`) loses nothing that
    villa did not write; returns ``out`` (user-expanded, not resolved).

    Refused, each in one line (:class:`VillaError`):

    * ``out`` equal to or containing one of ``inputs`` (``{"--images folder": path, ...}``; None entries
      skipped), compared as resolved paths, so a symbolic link or ``..`` is seen through, with or without
      ``flag``;
    * ``out`` a symbolic link (replacing it would replace the link, not the folder it names);
    * an existing ``out`` without ``flag``;
    * with ``flag``, an existing ``out`` that is not a folder villa wrote: ``is_own(out)`` false (a missing
      ``own_marker``, the file named in the message).
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    for what, path in (inputs or {}).items():
        if path is None:
            continue
        given = Path(path).expanduser()
        if _within(given.resolve(), resolved):
            relation = "is" if given.resolve() == resolved else "contains"
            raise VillaError(
                f"the output folder {out} {relation} the {what} {given}: writing it would replace your input; "
                "choose an output folder outside your inputs"
            )
    if out.is_symlink():
        raise VillaError(f"the output folder {out} is a symbolic link: give the folder itself or a new path")
    if not out.exists():
        return out
    if not overwrite:
        raise VillaError(f"{out} already exists: pass {flag} to replace it")
    if not out.is_dir() or not is_own(out):
        raise VillaError(
            f"{out} is not a folder villa wrote (it holds no {own_marker}): {flag} replaces only villa's own "
            "folders; move or delete it yourself, or choose a new output folder"
        )
    return out


def check_own_folder(folder: str | os.PathLike, marker: str, what: str) -> None:
    """Refuse (one line) to replace an existing ``folder`` that does not hold the file ``marker``, the file
    villa writes into every such folder; a missing folder passes."""
    folder = Path(folder)
    if (folder.exists() or folder.is_symlink()) and not (folder.is_dir() and (folder / marker).is_file()):
        raise VillaError(
            f"{folder} is not {what} villa wrote (no {marker} in it): move or delete it yourself, then re-run"
        )


def remove_own_file(path: str | os.PathLike, is_own: Callable[[Path], bool], what: str) -> None:
    """Delete ``path`` when it is a file villa wrote (``is_own``); a missing file passes; any other file is
    refused in one line naming it (``what``: which villa file the name belongs to)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_file() and not path.is_symlink() and is_own(path):
        path.unlink(missing_ok=True)
        return
    raise VillaError(
        f"{path} is in the way of {what} and villa did not write it: move it away or choose another run folder"
    )

"""Atomic folder replacement: an interrupt or a kill at any step leaves one complete folder, old or new."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from villa.storage.io import atomic_dir

OLD = {"a.txt": "old", "sub/b.txt": "old", "sub/deep/c.txt": "old"}
NEW = {"a.txt": "new", "sub/b.txt": "new", "d.txt": "new"}


def write_tree(root: Path, files: dict) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def read_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def replace_with_new(final: Path) -> None:
    with atomic_dir(final, overwrite=True) as tmp:
        write_tree(tmp, NEW)


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


class Interrupt:
    """Wrap ``func``: its ``n``-th call raises KeyboardInterrupt (after deleting one file when ``half``)."""

    def __init__(self, func, n: int, half: bool = False):
        self.func, self.n, self.half, self.calls = func, n, half, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            if self.half:  # an rmtree interrupted half-way: some files are already gone
                next(p for p in Path(args[0]).rglob("*") if p.is_file()).unlink()
            raise KeyboardInterrupt
        return self.func(*args, **kwargs)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "target,half",
    [(os, False), (shutil, False), (shutil, True)],
    ids=["os.replace", "shutil.rmtree", "shutil.rmtree-half"],
)
def test_interrupted_overwrite_keeps_one_complete_folder(tmp_path, monkeypatch, target, half, n):
    final = tmp_path / "dataset"
    write_tree(final, OLD)
    name = "replace" if target is os else "rmtree"
    wrapper = Interrupt(getattr(target, name), n, half)
    monkeypatch.setattr(target, name, wrapper)
    interrupted = False
    try:
        replace_with_new(final)
    except KeyboardInterrupt:
        interrupted = True
    monkeypatch.undo()
    assert read_tree(final) in (OLD, NEW), f"interrupt at {name} call {n}: neither old nor new complete"
    assert visible(tmp_path) == ["dataset"]
    assert interrupted == (wrapper.calls >= n)
    if not interrupted:
        assert read_tree(final) == NEW
    # a later overwrite works and leaves no hidden siblings but its own
    replace_with_new(final)
    assert read_tree(final) == NEW
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".old", ".trash"))]


KILLED = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from villa.storage.io import atomic_dir
    n, calls, real = int(sys.argv[2]), [0], os.replace
    def replace(*args):
        calls[0] += 1
        if calls[0] == n:
            os._exit(9)  # killed: no except or finally block runs
        real(*args)
    os.replace = replace
    with atomic_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    """
)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_killed_overwrite_is_recovered(tmp_path, n):
    """A kill between the renames leaves the old folder aside; the next atomic_dir puts it back first."""
    final = tmp_path / "dataset"
    write_tree(final, OLD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLED, str(final), str(n)], env=env, timeout=60)
    assert done.returncode == 9
    hidden_complete = [p for p in tmp_path.glob(".dataset.*.old") if read_tree(p) == OLD]
    assert read_tree(final) in (OLD, {"a.txt": "new"}) if final.exists() else hidden_complete
    with pytest.raises(FileExistsError):  # the recovered folder counts as existing
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("x")
    assert read_tree(final) in (OLD, {"a.txt": "new"})
    assert not list(tmp_path.glob(".dataset.*.old")), "the aside is restored or deleted"


def test_overwrite_refused_without_flag(tmp_path):
    final = tmp_path / "dataset"
    write_tree(final, OLD)
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as tmp:
            write_tree(tmp, NEW)
    assert read_tree(final) == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_concurrent_writer_between_the_renames(tmp_path, monkeypatch):
    """Another process puts its complete folder under the name while ours is aside: theirs stays, ours fails
    cleanly, and no aside is left behind."""
    final = tmp_path / "dataset"
    write_tree(final, OLD)
    theirs = {"a.txt": "theirs"}
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # just before our new folder moves in
            write_tree(final, theirs)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        replace_with_new(final)
    monkeypatch.undo()
    assert read_tree(final) == theirs
    assert visible(tmp_path) == ["dataset"] and not [p for p in tmp_path.iterdir() if p.name != "dataset"]


REFUSED_WRITES = """
import resource, signal, sys
import torch
from villa.engine.checkpoints import CheckpointWriter
from villa.storage.errors import run_entry
from villa.storage.io import write_json

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
target, what = sys.argv[1], sys.argv[2]

def body():
    if what == "json":
        write_json(target, list(range(10**6)))
    else:  # a checkpoint from the background writer, as fit writes it
        with CheckpointWriter() as writer:
            writer.save(target, torch.nn.Linear(1024, 1024))

run_entry(body)
"""


@pytest.mark.parametrize("what", ["json", "checkpoint"])
def test_a_refused_write_is_one_line_and_leaves_no_file(tmp_path, what):
    """A write the disk refuses (here: over the file-size limit, as a full disk refuses it) stops with one
    line naming the file and the free space, and leaves neither the file nor its temporary."""
    target = tmp_path / "out" / ("a.json" if what == "json" else "last.pkl")
    run = subprocess.run(
        [sys.executable, "-c", REFUSED_WRITES, str(target), what], capture_output=True, text=True, timeout=120
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write {target}: "), run.stderr
    assert "MB free on its disk" in lines[0]
    assert list(target.parent.iterdir()) == []


def test_a_refused_write_is_also_an_oserror(tmp_path):
    """Callers whose writes are best-effort (``except OSError``, e.g. the MNIST cache) still skip a full disk."""
    import errno

    from villa.storage.errors import VillaError
    from villa.storage.io import atomic_path

    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "cache.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert isinstance(caught.value, VillaError)
    assert str(caught.value).startswith(
        f"could not write {tmp_path / 'cache.bin'}: No space left on device ("
    )
    assert list(tmp_path.iterdir()) == []

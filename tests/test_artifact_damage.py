"""Every file the pipeline reads, cut to half its size: the chain stops with ONE line, never a traceback.

A tiny DocMNIST set goes once through preprocessing, stage 1, stage 2 and evaluation (the entry points'
``main()`` called in-process, for speed). Then every file under the dataset folder and the run folders —
found by walking them, never from a list kept here, so new artifacts are covered without editing this
test — is damaged in a fresh copy of those trees and the steps after the one that wrote it are rerun:

* which files a step reads is first traced (Python ``open`` audit events and pyarrow's feather reader);
  files nobody was seen to read are deleted together, and if the chain still succeeds they are reported
  as not read; otherwise each is deleted on its own to find the readers the trace missed;
* each file that is read is truncated to half its size; the first step that reads it must exit with code
  2 and print exactly one line, ``error: ...``, and no traceback. A truncated file that the chain reads
  without complaint is a silent partial read: a failure too.

Files named alike in one folder (``images/000012.png``, ``shard_00000.npy``: digits become ``*``) are
represented by one of them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: a message's remedy: the command to re-run (or what to delete first)
REMEDY = re.compile(r": (re-run|run|rebuild|delete) ")

COMMON = ("epochs=1", "device=cpu", "progress=false")
STEPS = (  # the chain after preprocessing: (name, entry module, its arguments)
    ("stage1", "villa.stage1", ("experiment=docmnist_stage1",)),
    ("stage2", "villa.stage2", ("experiment=docmnist_stage2", "batch_size=8")),
    ("evaluate", "villa.evaluate", ("experiment=docmnist_stage2",)),
)


# --------------------------------------------------------------------------- running the chain
@dataclass
class Outcome:
    step: str | None  # the step that failed, None when the whole chain succeeded
    code: int = 0
    stderr: str = ""


@dataclass
class Tree:
    """A copy of the pristine trees: ``root/data/<dataset>`` and ``root/runs/<task>``."""

    root: Path
    dataset_name: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / self.dataset_name

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def run_entry(module: str, argv: list[str]) -> tuple[int, str]:
    """``python -m <module> <argv>`` in this process: (exit code, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    main = importlib.import_module(module).main
    err = io.StringIO()
    code = 0
    old_argv = sys.argv
    sys.argv = [module, *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - a crash is what this test looks for
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()
    return code, err.getvalue()


def run_chain(tree: Tree, first: int = 0, on_step=None) -> Outcome:
    """Run ``STEPS[first:]`` on ``tree``, stopping at the first failure."""
    paths = (f"data_dir={tree.data_dir}", f"checkpoint_dir={tree.runs}")
    for index in range(first, len(STEPS)):
        name, module, args = STEPS[index]
        if on_step is not None:
            on_step(index)
        code, err = run_entry(module, [*args, *paths, *COMMON])
        if code != 0:
            return Outcome(name, code, err)
    return Outcome(None)


def snapshot(tree: Tree) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file of the trees."""
    out = {}
    for base in (tree.root / "data", tree.runs):
        for path in base.rglob("*"):
            if path.is_file():
                stat = path.stat()
                out[path.relative_to(tree.root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return out


def pattern_of(relative: str) -> str:
    """``data/ds/images/000012.png`` -> ``data/ds/images/*.png``: a kind of file, not one file (only the
    file name is generalised: ``runs/docmnist_stage1`` and ``runs/docmnist_stage2`` stay apart)."""
    folder, _, name = relative.rpartition("/")
    return f"{folder}/{re.sub(r'[0-9]+', '*', name)}" if folder else re.sub(r"[0-9]+", "*", name)


# --------------------------------------------------------------------------- the pristine chain
@dataclass
class Pristine:
    tree: Tree
    producer: dict[str, int]  # relative path -> index of the last step that wrote it (-1: preprocessing)
    files: dict[str, str] = field(default_factory=dict)  # pattern -> representative relative path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    from conftest import synthetic_digit_pools

    from villa.docmnist.generate import generate_docmnist
    from villa.features.preprocess import preprocess_dataset

    root = tmp_path_factory.mktemp("damage") / "pristine"
    result = generate_docmnist(
        attribute_budget=60,
        target_sample_complexity=6,
        seed=3,
        val_attribute_budget=30,
        test_attribute_budget=30,
        data_root=root / "data",
        digit_pools=synthetic_digit_pools(per_label=1),
        progress=False,
    )
    preprocess_dataset(result.dataset_dir, encoder="default", device="cpu", progress=False)
    tree = Tree(root, result.dataset_dir.name)
    before = snapshot(tree)
    producer = dict.fromkeys(before, -1)

    def record(index: int) -> None:  # called before step `index`: what changed belongs to the previous one
        nonlocal before
        now = snapshot(tree)
        producer.update({p: index - 1 for p, s in now.items() if before.get(p) != s})
        before = now

    outcome = run_chain(tree, on_step=record)
    assert outcome.step is None, f"the pristine chain failed at {outcome.step}: {outcome.stderr}"
    record(len(STEPS))
    files: dict[str, str] = {}
    for relative in sorted(producer):
        files.setdefault(pattern_of(relative), relative)
    return Pristine(tree, producer, files)


def fresh_copy(pristine: Pristine, where: Path) -> Tree:
    shutil.copytree(pristine.tree.root, where)
    return Tree(where, pristine.tree.dataset_name)


# audit hooks cannot be removed: one is installed on first use and switched by "on"
_TRACER: dict = {"installed": False, "on": False, "hook": lambda event, args: None}


def trace_reads(pristine: Pristine, where: Path, monkeypatch) -> dict[str, set[int]]:
    """Relative path -> indices of the steps that opened it for reading, on a fresh copy."""
    import pyarrow.feather

    tree = fresh_copy(pristine, where)
    root = str(tree.root.resolve())
    reads: dict[str, set[int]] = {}
    state = {"step": None}

    def note(path) -> None:
        if state["step"] is None or isinstance(path, int):
            return
        full = os.path.abspath(os.fsdecode(path))
        if full.startswith(root + os.sep):
            reads.setdefault(Path(full).relative_to(root).as_posix(), set()).add(state["step"])

    def hook(event: str, args) -> None:
        if event == "open" and _TRACER["on"]:
            path, mode, flags = args
            reading = ("r" in mode or "+" in mode) if isinstance(mode, str) else not (flags & os.O_WRONLY)
            if path is not None and reading:
                note(path)

    if not _TRACER["installed"]:
        sys.addaudithook(lambda event, args: _TRACER["hook"](event, args))
        _TRACER["installed"] = True
    _TRACER["hook"] = hook
    read_table = pyarrow.feather.read_table

    def traced_read_table(source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)):
            note(source)
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pyarrow.feather, "read_table", traced_read_table)

    def on_step(index: int) -> None:
        state["step"] = index

    _TRACER["on"] = True
    try:
        outcome = run_chain(tree, on_step=on_step)
    finally:
        _TRACER["on"] = False
        monkeypatch.undo()
    assert outcome.step is None, f"the traced chain failed at {outcome.step}: {outcome.stderr}"
    return reads


# --------------------------------------------------------------------------- the damage survey
@dataclass
class Case:
    pattern: str
    file: str
    status: str  # "one line" | "not read" | "FAILED" (no one-line error, or one without file or remedy)
    detail: str = ""


def _damage(tree: Tree, relative: str, how: str) -> None:
    path = tree.root / relative  # in a copy: the pristine trees stay intact
    if how == "delete":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _one_line_error(outcome: Outcome) -> str | None:
    """The ``error: ...`` line when the failure is the expected one, else None."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return lines[0]
    return None


def _describe(outcome: Outcome) -> str:
    if outcome.step is None:
        return "the chain succeeded on the truncated file (silent partial read)"
    tail = outcome.stderr.strip().splitlines()[-3:]
    return (
        f"{outcome.step} exited {outcome.code} with {len(outcome.stderr.splitlines())} lines: "
        + " | ".join(tail)
    )


@pytest.fixture(scope="module")
def survey(pristine, tmp_path_factory) -> list[Case]:
    work = tmp_path_factory.mktemp("damage_work")

    def copy() -> Tree:  # (one copy on disk at a time: the cases run one after another)
        shutil.rmtree(work / "current", ignore_errors=True)
        return fresh_copy(pristine, work / "current")

    with pytest.MonkeyPatch.context() as monkeypatch:
        reads = trace_reads(pristine, work / "trace", monkeypatch)

    last = len(STEPS) - 1
    first_reader: dict[str, int] = {}
    unseen: dict[int, list[str]] = {}
    cases: list[Case] = []
    for pattern, relative in pristine.files.items():
        produced_by = pristine.producer[relative]
        if produced_by >= last:
            cases.append(
                Case(pattern, relative, "not read", f"written by {STEPS[produced_by][0]}, the last step")
            )
            continue
        readers = sorted(i for i in reads.get(relative, ()) if i > produced_by)
        if readers:
            first_reader[relative] = readers[0]
        else:
            unseen.setdefault(produced_by, []).append(relative)

    # files no step was seen to read: delete them together (per producing step); when the chain still
    # succeeds none of them is read, otherwise test each one alone
    for produced_by, group in unseen.items():
        tree = copy()
        for relative in group:
            _damage(tree, relative, "delete")
        if run_chain(tree, produced_by + 1).step is None:
            cases += [Case(pattern_of(r), r, "not read", "deleting it changes nothing") for r in group]
            continue
        for relative in group:
            tree = copy()
            _damage(tree, relative, "delete")
            if run_chain(tree, produced_by + 1).step is None:
                cases.append(Case(pattern_of(relative), relative, "not read", "deleting it changes nothing"))
            else:
                first_reader[relative] = produced_by + 1

    for relative, start in first_reader.items():
        tree = copy()
        _damage(tree, relative, "truncate")
        outcome = run_chain(tree, start)
        line = _one_line_error(outcome) if outcome.step is not None else None
        if line is not None:
            named, remedy = Path(relative).name in line, REMEDY.search(line) is not None
            status = "one line" if named and remedy else "FAILED"
            problem = "" if named else " (does not name the file)"
            problem += "" if remedy else " (names no command that rebuilds it)"
            cases.append(Case(pattern_of(relative), relative, status, f"[{outcome.step}] {line}{problem}"))
            continue
        if outcome.step is None:  # opened, but maybe not needed: a missing copy must then pass too
            tree = copy()
            _damage(tree, relative, "delete")
            if run_chain(tree, start).step is None:
                cases.append(Case(pattern_of(relative), relative, "not read", "opened, but not needed"))
                continue
        cases.append(Case(pattern_of(relative), relative, "FAILED", _describe(outcome)))

    report = "\n".join(
        f"{c.status:>9}  {c.pattern}: {c.detail}" for c in sorted(cases, key=lambda c: c.pattern)
    )
    print(f"\nartifact damage survey ({len(cases)} kinds of file):\n{report}")
    return cases


def test_every_damaged_artifact_gives_one_line(survey):
    failed = [f"{c.file}: {c.detail}" for c in survey if c.status == "FAILED"]
    assert not failed, "damaged files without a one-line error:\n" + "\n".join(failed)
    checked = {c.pattern for c in survey if c.status == "one line"}
    # the survey must have found the artifacts it exists for (guards against a walk that finds nothing)
    for expected in (
        "region_embs/shard_*.npy",
        "text_embs/embs.npy",
        "mapping_train.feather",
        "best.pkl",
        "images/*.png",
        "annotations.feather",
        "attributes.yaml",
        "dataset.json",
    ):
        assert any(p.endswith(expected) for p in checked), f"no damaged {expected} was checked"

"""The two code trees a before/after benchmark runs side by side, each in its own worker processes.

``baseline_tree``: ``git archive <rev> villa`` unpacked (that commit's code doing its real work its real way);
``current_tree``: a copy of this tree's package taken at the start (uncommitted changes included);
``worker_env``: the environment that makes a worker import ``villa`` from one of them;
``rev_parse``: the commit a baseline revision names, resolved once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baseline_tree(rev: str, dest: Path) -> Path:
    """``git archive <rev> villa`` unpacked under ``dest``: the baseline package, importable from there."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "villa"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def current_tree(dest: Path, source: Path = REPO) -> Path:
    """A copy of ``source``'s ``villa`` package (default: this tree, uncommitted changes included) under ``dest``."""
    shutil.copytree(source / "villa", dest / "villa", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def worker_env(tree: Path) -> dict:
    """This process's environment with ``tree`` first on ``PYTHONPATH``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))


def rev_parse(rev: str) -> str:
    """The full commit of ``rev`` (the baseline stays that commit even if the branch moves during the run)."""
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

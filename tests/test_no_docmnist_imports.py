"""No stage imports DocMNIST code: DocMNIST is one dataset among others.

A static scan of every module's imports (``import x`` and ``from x import y``, at any depth of the file, so a
lazy import inside a function counts too). Only the DocMNIST package itself (which holds the complexity sweep)
and the two commands that run DocMNIST experiments (``python -m villa.sweep``, ``python -m villa.demo``) may
import ``villa.docmnist``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import villa

PACKAGE = Path(villa.__file__).resolve().parent
ALLOWED = {"docmnist", "sweep.py", "demo.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_imports_docmnist():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ALLOWED:
            continue
        hits = sorted(name for name in imported_modules(path) if name.startswith("villa.docmnist"))
        if hits:
            offenders[str(relative)] = hits
    assert not offenders, f"modules outside the DocMNIST package import it: {offenders}"


def test_the_scan_sees_lazy_imports(tmp_path):
    # the scan must catch an import inside a function, or the test above could pass vacuously
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from villa.docmnist.vocabulary import ATTRIBUTES\n    return ATTRIBUTES\n"
    )
    assert "villa.docmnist.vocabulary" in imported_modules(module)

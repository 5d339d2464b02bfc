"""The package layout shows the architecture: commands at the top of villa/, everything else in packages, and
no two modules that import each other."""

from __future__ import annotations

import ast
from pathlib import Path

VILLA = Path(__file__).resolve().parents[1] / "villa"
#: the published commands (``python -m villa.<name>``)
COMMANDS = {"stage1", "stage2", "evaluate", "ingest", "sweep", "demo", "visualize", "predict", "export"}
#: folders of villa/ that hold data, not code
DATA_FOLDERS = {"configs", "example_model"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(VILLA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The villa modules ``path`` imports anywhere in it (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from villa.engine import training" imports villa.engine.training when that is a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def test_the_top_level_holds_commands_and_packages_only():
    for entry in sorted(VILLA.iterdir()):
        if entry.name.startswith((".", "__pycache__")) or entry.name == "__init__.py":
            continue
        if entry.is_dir():
            assert entry.name in DATA_FOLDERS or (entry / "__init__.py").is_file(), (
                f"{entry.name}/ is not a package"
            )
        else:
            assert entry.suffix == ".py" and entry.stem in COMMANDS, f"villa/{entry.name} is not a command"
            assert '__name__ == "__main__"' in entry.read_text(), f"villa/{entry.name} has no __main__ entry"


def test_no_two_modules_import_each_other():
    files = [p for p in VILLA.rglob("*.py") if "example_model" not in p.parts]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # a package's __init__ that re-exports its own modules is not a cycle with them
    pairs = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if a < b and a in graph.get(b, set()) and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert pairs == [], f"modules that import each other: {pairs}"

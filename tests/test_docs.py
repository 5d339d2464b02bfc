"""The documentation holds: links resolve, documented command lines parse, CSV-backed figures reproduce.

Scope: ``README.md``, ``benchmarks/README.md`` and ``docs/*.md``.

- Every relative link (files and ``#anchors`` of markdown headings) resolves.
- Every ``python -m villa...`` / ``python ...`` / ``python3 ...`` / ``torchrun ...`` / ``make ...`` command line in
  a fenced code block parses: for a Hydra entry point every key exists in the composed config
  (:func:`villa.engine.hydra_app.check_command_line`, ``+key=`` allowed, placeholder values such as ``DATA_DIR`` or
  ``<set>`` allowed) and the experiment suits the entry point; for an argparse command every flag is known to
  its parser (and values satisfy its types and choices); a module or script that does not exist fails.
- Every number of a CSV-backed table or of a tagged number (the convention at the top of ``docs/results.md``)
  equals its value recomputed from the CSV, to the decimals printed.

No subprocess: parsers are imported (``build_parser``), or taken from the command's ``main`` by stopping it at
its ``parse_args`` call.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import fnmatch
import importlib
import importlib.util
import io
import math
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: documentation files a link may name before they exist (a link to one passes only while it is missing); none
PENDING_DOCS: set[str] = set()
#: entry points whose documented commands are skipped while the module is missing; none
PENDING_MODULES: set[str] = set()
#: the experiments' ``stage`` each Hydra entry point accepts (villa.engine.hydra_app.require_stage and the adapters)
ENTRY_STAGES = {
    "villa.stage1": {"stage1"},
    "villa.stage2": {"stage2"},
    "villa.evaluate": {"stage2", "evaluate"},
}
#: words before the command itself on a line: environment assignments are skipped separately
PREFIXES = {"time", "/usr/bin/time", "srun", "nohup", "exec"}
SHELL_KEYWORDS = {"do", "done", "then", "fi", "else", "wait", "{", "}"}


# --------------------------------------------------------------------------- markdown
def _without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code blanked out (links inside them are not links)."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "``", text)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [
        (m.group(1).strip(), m.group(2))
        for m in re.finditer(r"^```(.*?)\n(.*?)^```", text, flags=re.M | re.S)
    ]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but ``-`` and ``_``), spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", text, flags=re.M | re.S).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return [m.group(1).split()[0] for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", text)]


def check_link(source: Path, target: str) -> str | None:
    """None when ``target`` (a link in ``source``) resolves, "pending" for an allowed future file, else why not."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    where, _, anchor = target.partition("#")
    file = (source.parent / where).resolve() if where else source
    rel = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
    if not file.exists():
        return "pending" if rel in PENDING_DOCS else f"{target}: no file {rel}"
    if anchor:
        if file.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if anchor not in anchors(file):
            return f"{target}: {rel} has no heading with the anchor #{anchor}"
    return None


# --------------------------------------------------------------------------- command lines
@dataclass
class Command:
    doc: str
    line: str
    module: str | None  # python -m <module>
    script: str | None  # python <script.py> (repository-relative)
    args: list[str]
    make: bool = False
    elided: bool = False  # the line leaves arguments out ("..."): required ones may be missing


def _usage(line: str) -> str:
    """A usage line as one concrete command: ``[--flag=x]`` -> ``--flag=x`` (an optional part, bracketed after a
    space; Hydra lists ``key=[a,b]`` stay), ``drop|keep`` -> ``drop`` (alternatives inside a word)."""
    line = re.sub(r"(?:(?<=\s)|^)\[([^\]\[]*)\]", r"\1", line)
    return re.sub(r"(?<=[=\w])(?:\|[\w.:<>\[\]-]+)+(?=\s|$)", "", line)


def _block_env(body: str) -> dict[str, str]:
    """Shell variables a code block sets: ``NAME='value'`` lines and the first value of ``for NAME in ...``."""
    env: dict[str, str] = {}
    for line in body.splitlines():
        assign = re.match(r"^\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if assign and " " not in assign.group(2).strip().strip("'\""):
            env[assign.group(1)] = assign.group(2).strip().strip("'\"")
        elif assign and assign.group(2).strip()[:1] in "'\"":
            env[assign.group(1)] = assign.group(2).strip()[1:-1]
        for name, first in re.findall(r"\bfor\s+(\w+)\s+in\s+(\S+)", line):
            env[name] = first.rstrip(";")
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _segments(words: list[str]) -> list[list[str]]:
    out, current = [], []
    for word in words:
        if set(word) <= set(";&|()"):
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [s for s in out if s]


def _command(doc: str, line: str, words: list[str]) -> Command | None:
    while words and (words[0] in PREFIXES | SHELL_KEYWORDS or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
        words = words[1:]
    if not words or words[0] == "for":
        return None
    head, rest = words[0], words[1:]
    if head == "make":
        return Command(doc, line, None, None, rest, make=True)
    if head == "torchrun":
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:] if "=" in rest[0] or rest[0] == "--standalone" else rest[2:]
    elif head not in ("python", "python3"):
        return None
    if rest[:1] == ["-m"] and len(rest) >= 2:
        args = [a for a in rest[2:] if a != "..."]
        return Command(doc, line, rest[1], None, args, elided=len(args) < len(rest[2:]))
    if rest and rest[0].endswith(".py"):
        args = [a for a in rest[1:] if a != "..."]
        return Command(doc, line, None, rest[0], args, elided=len(args) < len(rest[1:]))
    return None


def commands(path: Path) -> list[Command]:
    """Every command line of the fenced code blocks of ``path`` (continuation lines joined)."""
    out = []
    for language, body in code_blocks(path.read_text(encoding="utf-8")):
        if language not in ("", "bash", "sh", "shell", "console"):
            continue
        env = _block_env(body)
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                words = _words(_usage(_expand(line, env)))
            except ValueError:
                continue  # not shell (an output line with an apostrophe)
            for segment in _segments(words):
                command = _command(path.name, line.strip(), segment)
                if command is not None:
                    out.append(command)
    return out


def _placeholder(value: str) -> bool:
    return bool(re.search(r"[<>$]|\.\.\.", value)) or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(/.*)?", value))


def _hydra_overrides(args: list[str]) -> list[str]:
    """The overrides with placeholder values (``DATA_DIR``, ``<set>``, ``OUT/x``) replaced by a plain word."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        out.append(f"{key}=placeholder" if eq and _placeholder(value) else arg)
    return out


def _hydra_decorator(module: str) -> dict | None:
    """The arguments of ``@hydra_main(...)`` in ``module``'s source, or None when it is not a Hydra app."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "hydra_main":
                    names = ("default_experiment", "config_name", "generic_experiment")
                    found = dict(zip(names, (ast.literal_eval(a) for a in deco.args)))
                    found.update({k.arg: ast.literal_eval(k.value) for k in deco.keywords if k.arg in names})
                    return {
                        "default_experiment": None,
                        "config_name": "default",
                        "generic_experiment": None,
                    } | found
    return None


class _Captured(BaseException):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _capture_parser(entry) -> argparse.ArgumentParser:
    """The parser ``entry()`` builds, taken at its ``parse_args`` call (the command itself never runs)."""

    def stop(self, *args, **kwargs):
        raise _Captured(self)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", stop),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop),
        mock.patch.object(sys, "argv", ["docs-check"]),
    ):
        try:
            entry()
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{entry} returned without parsing arguments")


def _entry_of(namespace: dict):
    for name in ("build_parser",):
        if callable(namespace.get(name)):
            return namespace[name](), True
    for name in ("main", "cli_main"):
        if callable(namespace.get(name)):
            return namespace[name], False
    return None, False


def argparse_parser(command: Command) -> argparse.ArgumentParser | None:
    """The parser of an argparse command; None for a command without one (e.g. ``python -m villa.demo``)."""
    if command.module is not None:
        module = importlib.import_module(command.module)
        source = Path(module.__file__).read_text(encoding="utf-8")
        namespace = vars(module)
    else:
        path = ROOT / command.script
        source = path.read_text(encoding="utf-8")
        sys.path.insert(0, str(path.parent))  # as python puts a script's folder first
        try:
            namespace = runpy.run_path(str(path), run_name="docs_check")
        finally:
            sys.path.remove(str(path.parent))
    found, built = _entry_of(namespace)
    if found is None:
        return None
    if built:
        return found
    if "argparse" not in source and "cli_main" not in source and "build_parser" not in source:
        return None
    return _capture_parser(found)


def check_argparse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    if any(a in ("-h", "--help") for a in args):
        return None
    errors = io.StringIO()

    def fail(self, message):
        raise ValueError(message)

    with mock.patch.object(argparse.ArgumentParser, "error", fail), contextlib.redirect_stderr(errors):
        try:
            argparse.ArgumentParser.parse_args(parser, args)
        except (ValueError, SystemExit) as err:
            return f"{err} {errors.getvalue().strip()}".strip()
        except Exception as err:  # noqa: BLE001  (a parser's own error type, e.g. VillaError)
            return str(err)
    return None


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:", text, flags=re.M))


def check_command(command: Command) -> str | None:
    """None when the command line parses, "pending" for an allowed future module, else what is wrong."""
    if command.make:
        missing = [
            t for t in command.args if not t.startswith("-") and "=" not in t and t not in makefile_targets()
        ]
        return f"make has no target {missing}" if missing else None
    if command.module is not None:
        if not command.module.startswith("villa"):
            return None
        if importlib.util.find_spec(command.module) is None:
            return "pending" if command.module in PENDING_MODULES else f"no module {command.module}"
        hydra = _hydra_decorator(command.module)
        if hydra is not None:
            return check_hydra(command, hydra)
    elif not (ROOT / command.script).is_file():
        return f"no script {command.script}"
    parser = argparse_parser(command)
    if parser is None:
        return None
    why = check_argparse(parser, command.args)
    if why and command.elided and "arguments are required" in why:
        return None  # the line says "..." where the required arguments go
    return why


def check_hydra(command: Command, hydra: dict) -> str | None:
    from villa.engine.hydra_app import check_command_line, compose, implied_experiment
    from villa.storage.errors import VillaError

    argv = _hydra_overrides(command.args)
    chosen = implied_experiment(argv, hydra["default_experiment"], hydra["generic_experiment"])
    if chosen:
        argv.append(f"experiment={chosen}")
    try:
        check_command_line(argv, hydra["config_name"])
    except VillaError as err:
        return str(err)
    stages = ENTRY_STAGES.get(command.module)
    if stages:
        overrides = [a for a in argv if a not in ("-m", "--multirun") and "," not in a.partition("=")[2]]
        stage = compose(overrides, hydra["config_name"]).get("stage")
        if stage not in stages:
            return f"experiment of stage {stage!r} given to {command.module}"
    return None


# --------------------------------------------------------------------------- CSV-backed figures
NUMBER = r"[+-]?\d+(?:\.\d+)?"
CELL = re.compile(rf"^(?P<mean>{NUMBER})(?: \[(?P<low>{NUMBER}), (?P<high>{NUMBER})\])?(?P<star>\\?\*)?$")


@dataclass
class Figure:
    doc: str
    csv: str
    spec: str
    text: str  # as printed


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _same(cell: str, wanted: str) -> bool:
    if fnmatch.fnmatchcase(cell, wanted):
        return True
    try:
        return float(cell) == float(wanted)
    except ValueError:
        return False


def _in_column(rows, column: str, value: str) -> bool:
    return any(_same(r.get(column, ""), value) for r in rows)


def recompute(rows: list[dict[str, str]], spec: str) -> tuple[list[float], bool]:
    """The values a spec stands for (one per kept row, or per seed pair of a difference) and whether it is a
    difference. Raises ``ValueError`` for a spec that does not fit the CSV."""
    words = spec.split()
    metrics = [w for w in words if "=" not in w]
    if len(metrics) != 1 or (rows and metrics[0] not in rows[0]):
        raise ValueError(f"spec {spec!r} must name exactly one column of the CSV as its metric")
    metric = metrics[0]
    side_a, side_b, difference = [], [], False
    for word in (w for w in words if "=" in w):
        column, value = word.split("=", 1)
        if rows and column not in rows[0]:
            raise ValueError(f"spec {spec!r}: the CSV has no column {column!r}")
        if not _in_column(rows, column, value) and "-" in value:
            splits = [(value[:i], value[i + 1 :]) for i, c in enumerate(value) if c == "-"]
            pair = next(
                ((a, b) for a, b in splits if _in_column(rows, column, a) and _in_column(rows, column, b)),
                None,
            )
            if pair is None:
                raise ValueError(
                    f"spec {spec!r}: {value!r} is neither a value nor a difference of {column!r}"
                )
            side_a.append((column, pair[0]))
            side_b.append((column, pair[1]))
            difference = True
        else:
            side_a.append((column, value))
            side_b.append((column, value))

    def kept(filters):
        return [r for r in rows if all(_same(r.get(c, ""), v) for c, v in filters)]

    def number(r) -> float:
        return float(r[metric]) if r[metric] not in ("", None) else math.nan

    a = kept(side_a)
    if not a:
        raise ValueError(f"spec {spec!r} keeps no row of the CSV")
    if not difference:
        values = [number(r) for r in a]
    else:
        b = kept(side_b)
        key = "seed" if rows and "seed" in rows[0] else None
        if key is None:
            if len(a) != 1 or len(b) != 1:
                raise ValueError(f"spec {spec!r}: a difference without seeds needs one row a side")
            values = [number(a[0]) - number(b[0])]
        else:
            by_seed = {r[key]: number(r) for r in b}
            values = [number(r) - by_seed[r[key]] for r in a if r[key] in by_seed]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        raise ValueError(f"spec {spec!r} keeps no value of {metric!r}")
    return values, difference


def _agrees(printed: str, value: float) -> bool:
    """``value`` rounded half-up to the decimals of ``printed`` is ``printed`` (51.25 from a CSV of two decimals
    prints as 51.3: the shortest decimal form of the float is what is rounded)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    rounded = Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return rounded == Decimal(printed)


def check_figure(figure: Figure) -> str | None:
    from villa.docmnist.complexity_sweep import t_interval

    text = figure.text.replace("**", "").strip()
    match = CELL.match(text)
    if match is None:
        return f"cannot read {figure.text!r} as a number or 'mean [low, high]'"
    try:
        values, difference = recompute(_rows(ROOT / figure.csv), figure.spec)
    except (ValueError, KeyError) as err:
        return str(err)
    stats = t_interval(values)
    if match["low"] is None:
        if match["star"]:
            return f"{figure.text!r}: a star needs an interval"
        ok = _agrees(match["mean"], stats["mean"])
    else:
        if stats["n"] < 2:
            return (
                f"{figure.text!r}: an interval needs two values or more, {figure.spec!r} keeps {stats['n']}"
            )
        ok = all(
            _agrees(match[k], stats[s])
            for k, s in (("mean", "mean"), ("low", "ci95_low"), ("high", "ci95_high"))
        )
        excludes = stats["ci95_low"] > 0 or stats["ci95_high"] < 0
        if ok and difference and bool(match["star"]) != excludes:
            return f"{figure.text!r} ({figure.spec}): the star says the interval excludes 0 {'wrongly' if match['star'] else 'only when it does; it does'}"
    if not ok:
        got = f"{stats['mean']:.3f}" + (
            f" [{stats['ci95_low']:.3f}, {stats['ci95_high']:.3f}]" if stats["n"] >= 2 else ""
        )
        return f"{figure.text!r} ({figure.csv}: {figure.spec}) is {got} from the CSV"
    return None


def _table_cells(lines: list[str]) -> list[list[str]]:
    rows = []
    for line in lines:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):
            rows.append(cells)
    return rows


def _specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(";")]


def figures(path: Path) -> tuple[list[Figure], list[str]]:
    """The CSV-backed figures of ``path`` and the problems found while reading them (a table in a CSV's scope
    without a check comment, a comment that does not fit its table, a number a check leaves out)."""
    text = path.read_text(encoding="utf-8")
    lines = _without_code(text).splitlines()
    found, problems = [], []
    current_csv = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^#{1,2}\s", line):
            current_csv = None
        csv_line = re.match(r"^CSV:\s*\[?`?(assets/[^\]`)\s]+\.csv)", line)
        if csv_line:
            current_csv = csv_line.group(1)
            if not (ROOT / current_csv).is_file():
                problems.append(f"{path.name}: no file {current_csv}")
        for value, spec in re.findall(
            rf"((?:\*\*)?{NUMBER}(?: \[{NUMBER}, {NUMBER}\])?(?:\*\*)?(?:\\\*)?)<!--=\s*(.*?)\s*-->", line
        ):
            if current_csv is None:
                problems.append(f"{path.name}: {value} is tagged outside the scope of a CSV line")
            else:
                found.append(Figure(path.name, current_csv, spec, value))
        if line.lstrip().startswith("<!-- check"):
            comment = line
            while "-->" not in comment and i + 1 < len(lines):
                i += 1
                comment += " " + lines[i]
            body = re.match(r"^\s*<!--\s*check\s+rows:(.*)\|\s*cols:(.*?)-->", comment, flags=re.S)
            table = []
            while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("|"):
                i += 1
                table.append(lines[i])
            if body is None or not table or current_csv is None:
                problems.append(
                    f"{path.name}: a check comment without a table, its rows/cols, or a CSV line: {comment[:80]}"
                )
            else:
                found += _table_figures(
                    path, current_csv, _specs(body.group(1)), _specs(body.group(2)), table, problems
                )
        elif line.lstrip().startswith("|") and current_csv is not None:
            problems.append(
                f"{path.name}: a table in the scope of {current_csv} without a check comment: {line[:80]}"
            )
            while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("|"):
                i += 1
        i += 1
    return found, problems


def _table_figures(path, csv_name, row_specs, col_specs, table, problems) -> list[Figure]:
    cells = _table_cells(table)
    header, body = cells[0], cells[1:]
    if len(row_specs) == 1:
        row_specs = row_specs * len(body)
    if len(row_specs) != len(body) or len(col_specs) != len(header):
        problems.append(
            f"{path.name}: check comment of {len(row_specs)} rows x {len(col_specs)} columns on a table of "
            f"{len(body)} x {len(header)}: {table[0][:60]}"
        )
        return []
    out = []
    for row, row_spec in zip(body, row_specs):
        label = re.sub(r"[*`]", "", row[0])
        for cell, col_spec in zip(row, col_specs):
            words = [w for w in f"{row_spec} {col_spec}".replace("{}", label).split() if w != "-"]
            if not cell or col_spec == "-" or row_spec == "-":
                continue  # an empty cell, or a label
            if not [w for w in words if "=" not in w]:
                if re.fullmatch(rf"(\*\*)?{NUMBER}.*", cell) and col_spec != "-" and row_spec != "-":
                    problems.append(f"{path.name}: {cell!r} has no metric in its check spec")
                continue
            out.append(Figure(path.name, csv_name, " ".join(words), cell))
    return out


# --------------------------------------------------------------------------- the tests
def _all_links():
    return [(p, t) for p in DOC_FILES for t in links(p)]


def _all_commands():
    return [c for p in DOC_FILES for c in commands(p)]


def _all_figures():
    found, problems = [], []
    for path in DOC_FILES:
        f, p = figures(path)
        found += f
        problems += p
    return found, problems


def test_every_relative_link_resolves():
    found = _all_links()
    assert len(found) > 50  # the scan finds the links
    broken = [f"{p.name}: {why}" for p, t in found if (why := check_link(p, t)) not in (None, "pending")]
    assert not broken, "\n".join(broken)


def test_every_documented_command_line_parses():
    found = _all_commands()
    assert len(found) > 40 and {c.module for c in found} >= {"villa.stage1", "villa.ingest", "villa.sweep"}
    failures = []
    for command in found:
        why = check_command(command)
        if why not in (None, "pending"):
            failures.append(f"{command.doc}: {command.line}\n    -> {why}")
    assert not failures, "\n".join(failures)


def test_every_csv_backed_figure_reproduces_from_its_csv():
    found, problems = _all_figures()
    assert len(found) > 150 and any(f.doc == "README.md" for f in found)
    wrong = [f"{f.doc}: {why}" for f in found if (why := check_figure(f)) is not None]
    assert not problems + wrong, "\n".join(problems + wrong)


# --------------------------------------------------------------------------- the checks catch mistakes
def test_a_broken_link_is_caught(tmp_path):
    page = ROOT / "docs" / "method.md"
    assert check_link(page, "results.md#the-complexity-sweep") is None
    assert check_link(page, "results.md#no-such-section") is not None
    assert check_link(page, "no-such-file.md") is not None
    assert (
        slug("4.3 Loss") == "43-loss"
        and slug("The shared keys (default.yaml)") == "the-shared-keys-defaultyaml"
    )


def test_a_misspelt_key_or_flag_is_caught():
    def parses(line: str) -> str | None:
        (command,) = [c for s in _segments(_words(line)) if (c := _command("t", line, s))]
        return check_command(command)

    assert parses("python -m villa.stage1 experiment=stage1 data_dir=DATA_DIR mapping.epsilon=0.3") is None
    assert "mapping.epsilom" in parses(
        "python -m villa.stage1 experiment=stage1 data_dir=DATA_DIR mapping.epsilom=0.3"
    )
    assert parses("python -m villa.stage1 +new.key=1") is None
    assert (
        parses("python -m villa.stage2 experiment=stage1 data_dir=DATA_DIR") is not None
    )  # wrong entry point
    assert parses("python -m villa.sweep stage2.batch_sise=64") is not None
    assert parses("python -m villa.ingest table --table=t.csv --attributes=a.yaml --out=DATA_DIR") is None
    assert parses("python -m villa.ingest table --tabel=t.csv --attributes=a.yaml --out=DATA_DIR") is not None
    assert parses("python3 preprocess/preprocess_dataset.py --data_dir=X --region_features=rich") is None
    assert parses("python3 preprocess/preprocess_dataset.py --data_dir=X --region_features=fancy") is not None
    assert parses("python -m villa.visualize --data_dir=X --out=a.png --mapping_dri=Y") is not None
    assert parses("python benchmarks/bench_scale.py --sizes=10 --wokers=2") is not None
    assert parses("python -m villa.no_such_module x=1") is not None
    assert parses("make tset") is not None


def test_a_changed_number_is_caught():
    csv_name = "assets/sweep_30000_t32_3seeds_h100.csv"
    right = Figure("t", csv_name, "method=villa-clip text_to_region_r_precision", "+10.1 [8.8, 11.4]\\*")
    assert check_figure(right) is None
    assert check_figure(Figure("t", csv_name, right.spec, "+10.1")) is None  # a mean alone
    for text in ("+10.2 [8.8, 11.4]\\*", "+10.1 [8.7, 11.4]\\*", "+10.1 [8.8, 11.4]", "+10.0", "10.1 [8.8]"):
        assert check_figure(Figure("t", csv_name, right.spec, text)) is not None, text
    assert check_figure(Figure("t", csv_name, "method=clip text_to_region_r_precision", "33.3 [31.6, 35.0]"))
    assert (
        check_figure(Figure("t", csv_name, "method=clip text_to_region_r_precision", "33.3 [31.6, 34.9]"))
        is None
    )
    half = Figure(
        "t",
        "assets/sweep_30000_h100.csv",
        "target_sample_complexity=8 method=clip text_to_region_r_precision",
        "",
    )
    assert check_figure(Figure(**{**vars(half), "text": "51.3"})) is None  # 51.25 rounds half-up
    assert check_figure(Figure(**{**vars(half), "text": "51.2"})) is not None

"""The layout keeps its promises: DVC stage deps cover the code each stage runs, no import
cycles, no torch on the serving path, functions short enough to read.

The import graph is read from the source (``ast``), lazy imports inside functions included,
``if TYPE_CHECKING:`` blocks excluded: what a stage command can execute, not what happens to
be imported at start-up.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from seqops import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("seqops", "serve", "flows")
MAX_FUNCTION_LINES = 60


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of the first-party packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
        "TYPE_CHECKING"
    )


def imported_names(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names imported anywhere under ``node`` (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(n: ast.AST) -> None:
        if isinstance(n, ast.If) and _is_type_checking(n):
            for child in n.orelse:
                visit(child)
            return
        if isinstance(n, ast.Import):
            names.update(alias.name for alias in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in n.names)
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(node)
    return names


def first_party(names: Iterable[str], files: dict[str, Path]) -> set[str]:
    """The first-party modules ``names`` resolve to, with the packages that run on import."""
    found = set()
    for name in names:
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found & set(files)


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        graph[module] = first_party(names, files) - {module}
    return graph


def closure(start: Iterable[str], graph: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def stage_modules(cmd: str, files: dict[str, Path], graph: dict[str, set[str]]) -> set[str]:
    """The first-party modules a ``seqops <command> ...`` stage command can execute: the
    subcommand handler's imports and the CLI module's own, transitively. ``seqops/cli.py``
    itself is left out: it only parses arguments, and every stage would rerun on a new flag
    of any subcommand."""
    argv = shlex.split(cmd)
    assert argv[0] == "seqops", f"stage command {cmd!r} does not call seqops"
    handler = cli.build_parser().parse_args(argv[1:]).func
    tree = ast.parse(files[cli.__name__].read_text())
    node = next(n for n in ast.walk(tree) if getattr(n, "name", None) == handler.__name__)
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = imported_names(node, cli.__name__, False)
    for statement in top_level:
        names |= imported_names(statement, cli.__name__, False)
    return closure(first_party(names, files), graph) - {cli.__name__}


def uncovered_deps(dvc_yaml: dict, root: Path = ROOT) -> dict[str, list[str]]:
    """Per stage, the files its command can execute that none of its deps covers."""
    files = module_files(root)
    graph = import_graph(files)
    missing = {}
    for name, stage in dvc_yaml["stages"].items():
        deps = [(root / dep).resolve() for dep in stage.get("deps", [])]
        needed = {files[m].resolve() for m in stage_modules(stage["cmd"], files, graph)}
        gaps = sorted(
            str(path.relative_to(root))
            for path in needed
            if not any(path == dep or dep in path.parents for dep in deps)
        )
        if gaps:
            missing[name] = gaps
    return missing


def read_dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_the_code_it_runs():
    assert uncovered_deps(read_dvc_yaml()) == {}


@pytest.mark.parametrize("stage", ["prepare", "train", "export", "evaluate"])
def test_a_dropped_dep_is_caught(stage):
    """The check above can fail: drop one source dep of a stage and it names the files."""
    dvc_yaml = read_dvc_yaml()
    deps = dvc_yaml["stages"][stage]["deps"]
    source = next(d for d in deps if d.startswith("seqops/") and d.endswith(".py"))
    deps.remove(source)
    assert source in uncovered_deps(dvc_yaml)[stage]


def test_stage_deps_exist():
    for name, stage in read_dvc_yaml()["stages"].items():
        for dep in stage.get("deps", []):
            if dep.startswith(PACKAGES):
                assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_no_import_cycles():
    files = module_files()
    graph = import_graph(files)
    cycles = []
    for module in graph:
        # a module that reaches itself through another module, not through its own package
        for other in graph[module]:
            if module in closure([other], graph) and not (
                module.startswith(other + ".") or other.startswith(module + ".")
            ):
                cycles.append((module, other))
    assert cycles == []


def test_serving_never_imports_torch():
    """The predictor, the contract and the server run without torch (docs/architecture.md,
    principle 6)."""
    files = module_files()
    graph = import_graph(files)
    torch_modules = {
        m for m, path in files.items() if "torch" in {n.split(".")[0] for n in _names(path, m)}
    }
    for start in ("serve.app", "serve.run", "seqops.predictor", "seqops.evaluate"):
        reached = closure([start], graph) & torch_modules
        assert reached == set(), f"{start} reaches torch through {sorted(reached)}"


def _names(path: Path, module: str) -> set[str]:
    return imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")


def test_functions_are_short():
    long = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []

"""Guards on the shape of the code: no import cycle, short functions, files of readable size.

The layer contracts themselves (which module may import which) are import-linter contracts in
pyproject.toml, checked by ``lint-imports`` in ``.ci/run``. These tests add what import-linter does
not state: no cycle at all within either package, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("feature_extraction", "clam")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
# Files allowed to be longer, and why.
LONG_FILES: dict[str, str] = {}


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_either_package():
    modules = product_modules()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ is imported with each of its modules; it must not import them back.
    assert import_cycles(graph) == []


def test_stage_one_does_not_import_stage_two():
    modules = product_modules()
    for name, path in modules.items():
        if name.startswith("feature_extraction"):
            clam_imports = {m for m in imported_modules(name, path, set(modules)) if m.startswith("clam")}
            assert not clam_imports, f"{name} imports {sorted(clam_imports)}"


def long_functions() -> list[str]:
    found = []
    for path in product_modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    assert long_functions() == []


@pytest.mark.parametrize("name", sorted(product_modules()))
def test_file_size(name):
    path = product_modules()[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    relative = str(path.relative_to(ROOT))
    assert lines <= MAX_FILE_LINES or relative in LONG_FILES, (
        f"{relative} has {lines} lines; split it, or add it to LONG_FILES with the reason"
    )

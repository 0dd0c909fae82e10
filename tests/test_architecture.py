"""The import rules the code is laid out by: `sdk` (strategies, volumes, the Label Studio side) never
imports torch, Redis, RQ, Flask or `ml_backend`; `ml_backend` builds on it, its torch side
(`learner`) under its jobs, its jobs under serving; no module imports, even lazily or for type
checking only, a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "ml_backend")
SDK_MUST_NOT_IMPORT = ("torch", "redis", "rq", "flask", "werkzeug", "ml_backend")
SERVING = ("ml_backend.serving", "ml_backend.model", "ml_backend.cli", "flask")
BELOW = {  # a group of ml_backend and what it must not import: the groups above it
    "ml_backend.learner": (*SERVING, "ml_backend.jobs", "ml_backend.experiments", "rq"),
    "ml_backend.jobs": (*SERVING, "ml_backend.experiments"),
    "ml_backend.experiments": (*SERVING, "ml_backend.jobs", "rq"),
}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(module: str, path: Path) -> set[str]:
    """Every module named by an import anywhere in the file, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


MODULES = module_files()
GRAPH = {
    module: sorted(name for name in imported_names(module, path) if name in MODULES and name != module)
    for module, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("sdk")))
def test_sdk_stays_free_of_the_torch_and_server_side(module: str) -> None:
    names = imported_names(module, MODULES[module])
    bad = sorted(n for n in names if n.split(".")[0] in SDK_MUST_NOT_IMPORT)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(tuple(BELOW))))
def test_each_group_imports_only_what_lies_below_it(module: str) -> None:
    group = next(g for g in BELOW if module.startswith(g))
    names = imported_names(module, MODULES[module])
    bad = sorted(n for n in names if n.startswith(BELOW[group]))
    assert not bad, f"{module} imports {bad}"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the import graph: every one a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"modules importing each other: {cycles}"


def test_the_rules_see_real_imports() -> None:
    """The graph is not empty by accident: known edges are found."""
    assert "ml_backend.learner.training" in GRAPH["ml_backend.jobs.train_job"]
    assert "sdk.prefetch" in GRAPH["ml_backend.learner.training"]

"""The package's layout: no import circles anywhere in src/, the core apart from the application.

Every import counts, at the top of a module or inside a function, under `TYPE_CHECKING` or
not: a circle that only a lazy import keeps from failing is still two modules that cannot
be read, tested or moved one without the other. A package's `__init__` is counted only
where it is imported by name, not as the parent every submodule import runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "kbitprep"


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    names = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports, anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name`, the module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "kbitprep.plan" in graph["kbitprep.apply"]  # a relative top-level import
    assert "kbitprep.cli.console" in graph["kbitprep.cli"]  # `from . import console`
    assert len(graph) > 40


def test_no_import_circles_anywhere_in_the_package() -> None:
    found = circles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


# What may import the application: the command line, and the entry point that runs it.
ABOVE_THE_CORE = ("kbitprep.app", "kbitprep.cli", "kbitprep.__main__")


@pytest.mark.parametrize("layer", ["kbitprep.app", "kbitprep.cli"])
def test_the_core_and_the_loss_import_nothing_of_the_application(layer: str) -> None:
    graph = import_graph()
    core = [name for name in graph if not any(within(name, above) for above in ABOVE_THE_CORE)]
    assert "kbitprep.loss" in core and "kbitprep.plan" in core
    offenders = {name: sorted(t for t in graph[name] if within(t, layer)) for name in core}
    assert not {name: targets for name, targets in offenders.items() if targets}


def test_the_application_never_imports_the_command_line() -> None:
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if within(t, "kbitprep.cli"))
                 for name, targets in graph.items() if within(name, "kbitprep.app")}
    assert not {name: targets for name, targets in offenders.items() if targets}

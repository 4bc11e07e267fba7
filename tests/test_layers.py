"""The package's layers, read from its source: who may import what.

Protocol (the only place pika is imported) -> framework -> operations and the CLI (the only
place click is imported); no import cycle, those under ``TYPE_CHECKING`` included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import steadyrabbit

PACKAGE = Path(steadyrabbit.__file__).parent


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def imported(module: str, tree: ast.Module) -> set[str]:
    """Every module ``module`` imports, anywhere in it, with relative imports resolved."""
    package = module if module.count(".") == 0 else module.rpartition(".")[0]
    is_package = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
    if is_package:
        package = module
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            # ``from . import _headers`` imports a module too.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def importers_of(top_level: str) -> set[str]:
    return {
        module
        for module, tree in modules()
        if any(n == top_level or n.startswith(f"{top_level}.") for n in imported(module, tree))
    }


def test_pika_is_imported_only_by_the_protocol_layer() -> None:
    # _frames reads deliveries off the wire for _amqp: both are the protocol layer.
    assert importers_of("pika") == {"steadyrabbit._amqp", "steadyrabbit._frames"}


def test_click_is_imported_only_by_the_cli() -> None:
    assert importers_of("click")
    assert all(module.startswith("steadyrabbit._cli") for module in importers_of("click"))


def test_the_message_path_imports_no_builtin_middleware_or_operations_tool() -> None:
    """The supervisor, the consumer, the settlement and the publisher know no built-in
    middleware (metrics, alerts, crash loops) and no operations tool."""
    core = {"_supervisor", "_consumer", "_settle", "_publisher", "_amqp", "_message"}
    forbidden = ("_metrics", "_alerts", "_status", "_crashguard", "_crashlog", "_ops", "_cli")
    for module, tree in modules():
        if module.rpartition(".")[2] not in core:
            continue
        ours = {name.removeprefix("steadyrabbit.") for name in imported(module, tree)}
        assert not {name for name in ours if name.startswith(forbidden)}, module


def test_no_import_cycle() -> None:
    graph = {
        module: {n for n in imported(module, tree) if n.startswith("steadyrabbit.")}
        for module, tree in modules()
    }
    graph = {
        module: {n for n in targets if n in graph} - {module} for module, targets in graph.items()
    }
    assert "steadyrabbit._amqp" in graph["steadyrabbit._consumer"], "the graph has its edges"
    # A package's __init__ importing its own submodules is how it exports them, not a cycle.
    graph = {
        module: {t for t in targets if not t.startswith(f"{module}.")}
        for module, targets in graph.items()
    }
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)

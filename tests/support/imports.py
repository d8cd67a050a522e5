"""The import graph of ``relay/``, read with ``ast`` (nothing is imported to build it).

Every ``import`` statement counts wherever it stands: at module level, inside a
function, or under ``if TYPE_CHECKING:``.  A deferred import hides a cycle from the
interpreter without removing it (the two modules still need each other), and a
``TYPE_CHECKING`` import still says that one module's meaning depends on the other's.
``import relay.a.b`` counts as needing ``relay.a.b`` (not the parent packages the
interpreter initialises on the way); ``from relay.a import b`` as needing ``relay.a``
(``b`` may be a name defined there) and ``relay.a.b`` when that is a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = ["RELAY", "cycles", "import_graph", "imported_names", "package_graph", "unit_of"]

RELAY = Path(__file__).resolve().parents[2] / "relay"


def _module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every dotted name ``path`` (the module ``module``) imports, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path = RELAY) -> dict[str, set[str]]:
    """Each module of the package at ``root`` and the modules of it that it imports."""
    modules = _module_names(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported in imported_names(path, name):
            target = resolve(imported)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def unit_of(module: str, root: Path = RELAY) -> str:
    """The package-level unit of a module: its subpackage of relay, or itself if top-level."""
    parts = module.split(".")
    if len(parts) > 1 and (root / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def package_graph(graph: Mapping[str, Iterable[str]], root: Path = RELAY) -> dict[str, set[str]]:
    """The module graph collapsed onto subpackages (edges inside one are dropped)."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = units.setdefault(unit_of(module, root), set())
        edges.update(unit_of(t, root) for t in targets)
    for unit, edges in units.items():
        edges.discard(unit)
    return units


def cycles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found

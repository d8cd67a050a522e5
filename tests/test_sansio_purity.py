"""The sans-I/O engines import no I/O: no Twisted, sockets, os, time, threads or asyncio.

Neither directly nor through the modules of relay/ they import: the check follows the
import graph (:mod:`support.imports`) out of relay/sansio/ and checks every module it
reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support.imports import import_graph

SANSIO = Path(__file__).parent.parent / "relay" / "sansio"
FORBIDDEN = {
    "twisted",
    "socket",
    "os",
    "time",
    "select",
    "selectors",
    "threading",
    "asyncio",
    "subprocess",
    "ssl",
    "serial",
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(SANSIO.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SANSIO)))
def test_engine_module_imports_no_io(path: Path) -> None:
    """A module under relay/sansio imports none of the I/O modules."""
    assert not (_imported_roots(path) & FORBIDDEN)


def test_the_check_finds_modules() -> None:
    """The purity check looks at real files (so it cannot pass by finding nothing)."""
    assert SANSIO / "__init__.py" in MODULES
    for engine in ("smtp/server.py", "phone/frame.py", "phone/link.py", "phone/errors.py"):
        assert SANSIO / engine in MODULES
    assert _imported_roots(Path(__file__)) >= {"ast", "pytest"}


def _reached_from_sansio() -> list[str]:
    """Every module of relay/ that a module under relay/sansio/ imports, at any depth."""
    graph = import_graph()
    seen: set[str] = set()
    todo = [name for name in graph if name.startswith("relay.sansio")]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return sorted(seen)


REACHED = _reached_from_sansio()


def _path(module: str) -> Path:
    base = SANSIO.parent.parent / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@pytest.mark.parametrize("module", [m for m in REACHED if not m.startswith("relay.sansio")])
def test_what_the_engines_import_imports_no_io(module: str) -> None:
    """A module of relay/ that an engine imports (at any depth) imports no I/O module either."""
    assert not (_imported_roots(_path(module)) & FORBIDDEN)


def test_the_engines_reach_beyond_their_package() -> None:
    """The transitive check has modules outside relay/sansio to look at (it is not empty)."""
    assert {"relay.address", "relay.envelope"} <= set(REACHED)

"""The sans-I/O engines import no I/O: no Twisted, sockets, os, time, threads or asyncio."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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

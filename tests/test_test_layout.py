"""Test modules never import each other; helper code lives in tests/support/ (checked).

A helper kept in a test module, or beside the tests, is found only by whoever reads that
module, and importing a test module makes pytest's collection order matter.  The check
reads tests/ with ``ast`` (through :func:`support.imports.imported_names`, so imports
inside functions count too): outside ``support/`` there are only ``test_*.py`` modules
and ``conftest.py`` files, and no module anywhere under tests/ imports a ``test_*``
module, a ``conftest`` or the ``tests`` package.
"""

from __future__ import annotations

from pathlib import Path

from support.imports import imported_names

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    """Whether a dotted import names a test module, a conftest or the tests package."""
    parts = name.split(".")
    return parts[0] == "tests" or any(p.startswith("test_") or p == "conftest" for p in parts)


def _test_imports(root: Path) -> list[str]:
    """``file: name`` for each import of a test module by a module under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for name in imported_names(path, path.stem):
            if _is_test_module(name):
                found.append(f"{path.relative_to(root)}: {name}")
    return found


def _stray_helpers(root: Path) -> list[str]:
    """Python modules under ``root`` outside ``support/`` that are not tests or conftests."""
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path.relative_to(root).parts[0] != "support"
        and not path.name.startswith("test_")
        and path.name != "conftest.py"
    ]


def test_no_test_module_imports_another() -> None:
    """No module under tests/ imports a test module, a conftest or the ``tests`` package."""
    assert len(list(TESTS.rglob("test_*.py"))) > 50
    assert _test_imports(TESTS) == []


def test_helper_modules_live_in_support() -> None:
    """Outside tests/support/ every Python file is a ``test_*.py`` module or a conftest."""
    assert _stray_helpers(TESTS) == []


def test_the_checks_find_a_test_import_and_a_stray_helper(tmp_path: Path) -> None:
    """Plain, from- and late imports of a test module are reported, and so is a helper."""
    (tmp_path / "support").mkdir()
    (tmp_path / "support" / "fine.py").write_text("import os\n")
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "harness.py").write_text("")
    (tmp_path / "test_a.py").write_text("import test_b\nfrom support.fine import x\n")
    (tmp_path / "test_b.py").write_text("def f():\n    from test_a import helper\n")
    (tmp_path / "phone" / "test_c.py").write_text("from tests.phone import harness\n")
    assert _test_imports(tmp_path) == [
        "phone/test_c.py: tests.phone",
        "phone/test_c.py: tests.phone.harness",
        "test_a.py: test_b",
        "test_b.py: test_a",
        "test_b.py: test_a.helper",
    ]
    assert _stray_helpers(tmp_path) == ["phone/harness.py"]

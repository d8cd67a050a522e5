"""Every test says, in its docstring, the behaviour it pins (the project's rule, checked).

The check reads tests/ with ``ast``: every function whose name starts with ``test`` at
the top of a ``test_*.py`` module, or in a ``Test*`` class there, has a docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _tests(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The test functions pytest collects from a module's tree."""
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            found.append(node)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found.extend(_tests(ast.Module(body=node.body, type_ignores=[])))
    return found


def _undocumented(path: Path, root: Path = TESTS) -> list[str]:
    """``file:line name`` of each test in ``path`` that has no docstring."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name}"
        for node in _tests(tree)
        if not (ast.get_docstring(node) or "").strip()
    ]


def test_every_test_has_a_docstring() -> None:
    """No test function under tests/ lacks a docstring."""
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 50
    assert [line for path in modules for line in _undocumented(path)] == []


def test_the_check_finds_a_test_without_one(tmp_path: Path) -> None:
    """A module with an undocumented test, plain or in a class, is reported."""
    module = tmp_path / "test_sample.py"
    module.write_text(
        'def test_documented():\n    """Says what it pins."""\n\n'
        "def test_bare():\n    pass\n\n"
        "class TestGroup:\n    async def test_method(self):\n        pass\n"
        "    def helper(self):\n        pass\n"
    )
    names = [line.split()[-1] for line in _undocumented(module, tmp_path)]
    assert names == ["test_bare", "test_method"]

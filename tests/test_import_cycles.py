"""No two modules of relay/ need each other, and no two of its packages do either.

The graph comes from :mod:`support.imports` (imports at module level, inside functions
and under ``TYPE_CHECKING`` all count; see there why).  Packages are the subpackages of
relay/ and its top-level modules; a cycle between them is as much a tangle as one
between modules, even when no single module closes it.
"""

from __future__ import annotations

from pathlib import Path

from support.imports import cycles, import_graph, package_graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    """The module import graph of relay/ has no cycle."""
    assert cycles(import_graph()) == []


def test_packages_depend_on_each_other_one_way_only() -> None:
    """Collapsed onto packages, the graph of relay/ has no cycle either."""
    assert cycles(package_graph(import_graph())) == []


def test_the_shared_series_need_no_package_that_counts_into_them() -> None:
    """relay.instruments imports at most the pure relay.policy, so any other part can count."""
    assert package_graph(import_graph())["relay.instruments"] <= {"relay.policy"}


def test_the_graph_sees_imports_wherever_they_stand(tmp_path: Path) -> None:
    """Module-level, function-level, TYPE_CHECKING and relative imports all make edges."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/leaf.py", "other.py"):
        (root / name).write_text("")
    (root / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.other\n"
        "if TYPE_CHECKING:\n    from pkg.sub import leaf\n"
    )
    late = "def f():\n    from . import leaf\n    from .. import top\n"
    (root / "sub" / "late.py").write_text(late)
    graph = import_graph(root)
    assert graph["pkg.top"] == {"pkg.other", "pkg.sub.leaf", "pkg.sub"}
    assert graph["pkg.sub.late"] == {"pkg.sub.leaf", "pkg.sub", "pkg", "pkg.top"}
    assert package_graph(graph, root)["pkg.sub"] == {"pkg", "pkg.top"}
    assert len(import_graph()) > 100  # relay/ itself: every module, not a handful


def test_a_cycle_is_found_and_a_chain_is_not() -> None:
    """The cycle finder reports a loop of three and nothing for a chain."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []

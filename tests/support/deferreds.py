"""Reading a Deferred that a Clock-driven test expects to have fired already."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["fired"]


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired: its failure is raised, and one that has not
    fired yet fails the test."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result

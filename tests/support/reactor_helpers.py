"""Waiting on the real reactor, and catching what is logged, for tests on live sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twisted.internet import reactor, task
from twisted.logger import LogEvent, globalLogPublisher


async def until(condition: Callable[[], object], limit: float = 5.0) -> None:
    """Let the reactor run until ``condition()`` holds; AssertionError after ``limit`` s."""
    for _ in range(max(1, int(limit / 0.01))):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never became true")


@contextmanager
def logged_events() -> Iterator[list[LogEvent]]:
    """Every event logged (through twisted.logger) while the block runs."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)

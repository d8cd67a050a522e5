"""Fixtures every test module may use: a strict Clock, a temporary spool, the fakes.

Helper code that is not a test lives in ``tests/support/`` (imported as ``support.X``:
pytest puts ``tests/`` on ``sys.path`` because of this file); test modules never import
each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from relay.queue.store import SpoolQueue

from support.clocks import pending_timers
from support.memqueue import MemoryQueue
from support.queue_helpers import open_queue
from support.reactor_helpers import logged_events


@pytest.fixture
def clock() -> Iterator[Clock]:
    """A ``task.Clock`` for code that keeps time; the test fails if it leaves timers pending."""
    clock = Clock()
    yield clock
    left = pending_timers(clock)
    if left:
        pytest.fail(f"the test left {len(left)} timer(s) pending on its Clock: {left}")


@pytest_twisted.async_yield_fixture
async def spool(tmp_path: Path) -> AsyncIterator[SpoolQueue]:
    """An open spool in a fresh directory (on the real reactor: it has a writer thread)."""
    queue = await open_queue(tmp_path / "spool")
    try:
        yield queue
    finally:
        await queue.close()


@pytest.fixture
def memory_queue(clock: Clock) -> MemoryQueue:
    """The in-memory IQueue of the deliverer's tests, on the test's Clock."""
    return MemoryQueue(clock)


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Every event logged through twisted.logger while the test runs."""
    with logged_events() as seen:
        yield seen

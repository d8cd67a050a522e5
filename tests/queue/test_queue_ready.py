"""QueueReady: the one way parts built before the spool opens wait for its queue."""

from __future__ import annotations

import pytest
from twisted.python.failure import Failure

from relay.errors import SpoolError
from relay.queue.ready import QueueReady

from support.deferreds import fired


def test_waiters_before_and_after_the_opening_get_the_same_queue() -> None:
    """A waiter from before the opening and one from after both fire with the queue."""
    ready: QueueReady[object] = QueueReady()
    queue = object()
    early = ready.when_ready()
    assert not early.called
    ready.opened(queue)
    assert fired(early) is queue
    assert fired(ready.when_ready()) is queue


def test_a_spool_that_cannot_open_fails_every_waiter_now_and_later() -> None:
    """Waiters from before and after the failure hear the reason; none waits forever."""
    ready: QueueReady[object] = QueueReady()
    early = ready.when_ready()
    ready.failed(Failure(OSError("no spool")))
    for waiting in (early, ready.when_ready()):
        caught: list[Failure] = []
        waiting.addErrback(caught.append)
        assert len(caught) == 1 and caught[0].check(OSError)


def test_after_closing_a_waiter_fails_until_the_spool_opens_again() -> None:
    """Once the queue is closed, when_ready fails at once (a call that outlived the stop
    must not wait forever); a restarting spool's waiters wait for the next opening."""
    ready: QueueReady[object] = QueueReady()
    ready.opened(object())
    ready.closed()
    caught: list[Failure] = []
    ready.when_ready().addErrback(caught.append)
    assert len(caught) == 1 and caught[0].check(SpoolError)
    assert "closed" in caught[0].getErrorMessage()
    ready.opening()
    later = ready.when_ready()
    assert not later.called
    reopened = object()
    ready.opened(reopened)
    assert fired(later) is reopened


@pytest.mark.parametrize("waiters", [0, 1, 5])
def test_every_waiter_fires_once(waiters: int) -> None:
    """Each waiter registered before the opening fires exactly once, in order."""
    ready: QueueReady[int] = QueueReady()
    seen: list[int] = []
    for index in range(waiters):
        ready.when_ready().addCallback(lambda queue, index=index: seen.append(index))
    ready.opened(7)
    ready.opened(7)  # a second settlement does not fire the old waiters again
    assert seen == list(range(waiters))

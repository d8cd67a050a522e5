"""The queue, once it is open: the one way every part of the relay waits for the spool.

The spool opens when its service starts (lock, recovery in a thread), after the parts
that deliver from it and store into it have been built, so they are given this object
instead of the queue: :meth:`QueueReady.when_ready` fires with the open queue, at once
if it is already open, or fails with the reason it could not open.  ``relay.tap``
makes one, hands it to the spool's service (which settles it) and to everything that
needs the queue (the deliverer, the channels, the gateway and its worker processes, the
pickup, the phone calls), so no part is patched with the queue after it is built.

This is the one convention: a part that stores into or reads from the queue takes a
:class:`~relay.interfaces.QueueSource`.  Where the queue is open before the part is
built (a gateway worker's link to the spool's process, a test, a benchmark), it is
handed over as :meth:`QueueReady.of`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relay.errors import SpoolError

__all__ = ["QueueReady"]

Q = TypeVar("Q")


class QueueReady(Generic[Q]):
    """A queue that will be opened once: waiters fire when it is, or fail if it cannot be."""

    def __init__(self) -> None:
        self.queue: Q | None = None
        self._failure: Failure | None = None
        self._waiting: list[Deferred[Q]] = []

    @classmethod
    def of(cls, queue: Q) -> QueueReady[Q]:
        """One that is open already: ``queue`` is there before the parts that use it."""
        ready: QueueReady[Q] = cls()
        ready.opened(queue)
        return ready

    def when_ready(self) -> Deferred[Q]:
        """Fire with the open queue (at once if it is open), or fail if it cannot open."""
        if self.queue is not None:
            return defer.succeed(self.queue)
        if self._failure is not None:
            return defer.fail(self._failure)
        waiting: Deferred[Q] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def opened(self, queue: Q) -> None:
        """The queue is open: fire every waiter with it."""
        self.queue = queue
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(queue)

    def failed(self, failure: Failure) -> None:
        """The queue cannot be opened: every waiter, now and later, hears why."""
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def opening(self) -> None:
        """The spool's service is (re)starting: waiters from now on wait for it to open."""
        self._failure = None

    def closed(self) -> None:
        """The queue was closed (the relay is stopping): waiters from now on fail at once
        with :class:`~relay.errors.SpoolError`, so a part still running (a call that
        outlived the stop) reports an error instead of waiting for a queue that will not
        come back."""
        self.queue = None
        self.failed(Failure(SpoolError("the spool is closed")))  # type: ignore[no-untyped-call]

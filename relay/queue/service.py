"""The spool as a twistd service: open (lock + recover) at start, serve the control socket.

``relay.tap`` adds one :class:`SpoolService` to the service tree, with the
:class:`~relay.queue.ready.QueueReady` it settles when the queue opens (the gateway, the
deliverer and the channels wait on the same object) and the control socket's handlers
(``relay flush``, ``relay status``, ``relay call``), all given when it is built.
Opening runs recovery in a thread, so a large spool does not freeze the reactor while
it loads; stopping finishes the writes already queued before the lock is given up.  The
queue closes only when this service stops (not by itself when the reactor begins to
shut down), so the services stopped before it can still record what they did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.errors import SpoolError
from relay.queue.control import Caller, Flusher, Reporter, listen_control
from relay.queue.ready import QueueReady
from relay.queue.segment import DEFAULT_SEGMENT_LIMIT
from relay.queue.store import SpoolQueue

__all__ = ["SpoolService"]

_log = Logger()


class SpoolService(Service):
    """Owns the spool while the daemon runs."""

    def __init__(
        self,
        spool_dir: Path,
        reactor: Any,
        clock: IReactorTime | None = None,
        *,
        segment_limit: int = DEFAULT_SEGMENT_LIMIT,
        ready: QueueReady[SpoolQueue] | None = None,
        flusher: Flusher | None = None,
        reporter: Reporter | None = None,
        caller: Caller | None = None,
    ) -> None:
        """``reactor`` provides threads and UNIX sockets (the global reactor in twistd).

        ``ready`` is settled when the queue opens (a new one if None).  ``flusher`` is
        ``relay flush`` (the deliverer's, which also revives resting destinations; the
        queue's own without one), ``reporter`` the daemon's part of ``relay status``,
        ``caller`` ``relay call SITE`` (with a phone channel).
        """
        self.spool_dir = Path(spool_dir)
        self._reactor = reactor
        self._clock = clock
        self._segment_limit = segment_limit
        self.queue: SpoolQueue | None = None
        self.ready: QueueReady[SpoolQueue] = ready if ready is not None else QueueReady()
        self._port: IListeningPort | None = None
        self._starting: Deferred[None] | None = None
        self._flusher = flusher
        self._reporter = reporter
        self._caller = caller

    def when_ready(self) -> Deferred[SpoolQueue]:
        """Fire with the open queue (at once if it is open), or fail if it cannot open."""
        return self.ready.when_ready()

    def _flush(self, queue_ids: list[str] | None, channel: str | None) -> Deferred[int]:
        """``relay flush`` from the control socket: the deliverer's, or the queue's own."""
        if self._flusher is not None:
            return self._flusher(queue_ids, channel)
        assert self.queue is not None
        return self.queue.flush(queue_ids, channel)

    def _report(self) -> dict[str, Any]:
        """``relay status`` from the control socket: what the reporter says."""
        return self._reporter() if self._reporter is not None else {"running": True}

    def _call(self, site: str) -> Deferred[dict[str, Any]]:
        """``relay call SITE`` from the control socket: what the caller does."""
        if self._caller is None:
            return defer.fail(KeyError(site))
        return self._caller(site)

    def startService(self) -> None:
        """Open the spool and serve the control socket."""
        super().startService()  # type: ignore[no-untyped-call]
        self.ready.opening()
        self._starting = ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            queue = await SpoolQueue.open(
                self.spool_dir,
                self._reactor,
                self._clock,
                segment_limit=self._segment_limit,
                close_at_shutdown=False,  # stopService closes it, after the deliverer
            )
            self.queue = queue
            self._port = await listen_control(
                queue, self._reactor, self._flush, self._report, self._call
            )
        except Exception as e:
            failure = Failure(e)  # type: ignore[no-untyped-call]
            if isinstance(e, SpoolError):  # a reason meant for the operator: one line
                _log.critical(
                    "spool: cannot open {path}: {reason}", path=str(self.spool_dir), reason=str(e)
                )
            else:
                _log.failure("spool: cannot open {path}", failure, path=str(self.spool_dir))
            self.ready.failed(failure)
            return
        self.ready.opened(queue)

    def stopService(self) -> Deferred[None]:
        """Stop serving, finish queued writes, give up the lock."""
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        starting = self._starting
        if starting is not None:
            await starting
        if self._port is not None:
            stopping = self._port.stopListening()  # Twisted unlinks the socket file
            self._port = None
            if stopping is not None:
                await stopping
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
            self.ready.closed()

"""The spool as a twistd service: open (lock + recover) at start, serve the control socket.

``relay.tap`` adds one :class:`SpoolService` to the service tree; the gateway and the
deliverer wait on :meth:`SpoolService.when_ready` for the queue.  Opening runs recovery
in a thread, so a large spool does not freeze the reactor while it loads; stopping
finishes the writes already queued before the lock is given up.  The queue closes only
when this service stops (not by itself when the reactor begins to shut down), so the
services stopped before it can still record what they did.
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
    ) -> None:
        """``reactor`` provides threads and UNIX sockets (the global reactor in twistd)."""
        self.spool_dir = Path(spool_dir)
        self._reactor = reactor
        self._clock = clock
        self._segment_limit = segment_limit
        self.queue: SpoolQueue | None = None
        self._port: IListeningPort | None = None
        self._waiting: list[Deferred[SpoolQueue]] = []
        self._failure: Failure | None = None
        self._starting: Deferred[None] | None = None
        self.flusher: Flusher | None = None
        self.reporter: Reporter | None = None  # the daemon's part of ``relay status``
        self.caller: Caller | None = None  # ``relay call SITE``, with a phone channel

    def when_ready(self) -> Deferred[SpoolQueue]:
        """Fire with the open queue (at once if it is open), or fail if it cannot open."""
        if self.queue is not None:
            return defer.succeed(self.queue)
        if self._failure is not None:
            return defer.fail(self._failure)
        d: Deferred[SpoolQueue] = Deferred()
        self._waiting.append(d)
        return d

    def _flush(self, queue_ids: list[str] | None, channel: str | None) -> Deferred[int]:
        """``relay flush`` from the control socket: the deliverer's flush once it is set.

        ``relay.tap`` sets :attr:`flusher` to the deliverer's, which also revives resting
        destinations; until then (or without a deliverer) the queue flushes by itself.
        """
        if self.flusher is not None:
            return self.flusher(queue_ids, channel)
        assert self.queue is not None
        return self.queue.flush(queue_ids, channel)

    def _report(self) -> dict[str, Any]:
        """``relay status`` from the control socket: what :attr:`reporter` says."""
        return self.reporter() if self.reporter is not None else {"running": True}

    def _call(self, site: str) -> Deferred[dict[str, Any]]:
        """``relay call SITE`` from the control socket: what :attr:`caller` does."""
        if self.caller is None:
            return defer.fail(KeyError(site))
        return self.caller(site)

    def startService(self) -> None:
        """Open the spool and serve the control socket."""
        super().startService()  # type: ignore[no-untyped-call]
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
            self._failure = failure = Failure(e)  # type: ignore[no-untyped-call]
            if isinstance(e, SpoolError):  # a reason meant for the operator: one line
                _log.critical(
                    "spool: cannot open {path}: {reason}", path=str(self.spool_dir), reason=str(e)
                )
            else:
                _log.failure("spool: cannot open {path}", failure, path=str(self.spool_dir))
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.errback(failure)
            return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(queue)

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

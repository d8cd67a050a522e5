"""The daemon's side of ``relay queue``: a UNIX socket at ``<spool>/control``.

While the daemon owns the spool (it holds the lock), a command must not touch the log:
it could rewrite a status the deliverer is about to change, or read a segment the
daemon is deleting.  So the command asks the daemon instead, over this socket, and the
daemon carries the request out through its own :class:`~relay.queue.store.SpoolQueue`,
in the same serialised way as any deliverer update.  The protocol is in
:mod:`relay.queue.protocol`.

The socket is created mode 0600 in the spool directory (itself 0700): whoever may use
it may delete mail.  Requests on one connection are answered in order.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IReactorThreads, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from relay.errors import SpoolError
from relay.queue.protocol import (
    MAX_LINE,
    ProtocolError,
    Request,
    decode_line,
    encode_line,
    error_response,
    failed_result,
    parse_request,
    reason_of,
    result,
)
from relay.queue.state import NoSuchMessage
from relay.queue.store import SpoolQueue
from relay.queue.view import HEADER_READ_LIMIT, details, queue_status, summary

__all__ = [
    "Caller",
    "ControlFactory",
    "ControlProtocol",
    "Flusher",
    "Reporter",
    "execute",
    "listen_control",
]

Flusher = Callable[[list[str] | None, str | None], Deferred[int]]
"""Makes deferred mail due now: ``(queue ids or None for all, channel or None) -> count``.

The daemon passes the deliverer's flush, which also revives resting destinations (an
operator flushes because the destination is back); without one, the queue's own flush.
"""

Reporter = Callable[[], dict[str, Any]]
"""The daemon's part of ``relay status`` (:meth:`relay.report.DaemonReport.report`)."""

Caller = Callable[[str], Deferred[dict[str, Any]]]
"""``relay call SITE``: calls the site now; fires with the call's record once it ended.
Fails with KeyError for a site this relay does not call."""

_log = Logger()


async def execute(
    queue: SpoolQueue,
    request: Request,
    flusher: Flusher | None = None,
    reporter: Reporter | None = None,
    caller: Caller | None = None,
) -> dict[str, Any]:
    """Carry out one request on the daemon's queue; the response object."""
    flush: Flusher = flusher if flusher is not None else queue.flush
    if request.op == "call":
        assert request.site is not None
        if caller is None:
            return error_response("this relay runs no phone channel", "bad-request")
        try:
            record = await caller(request.site)
        except KeyError:
            return error_response(
                f"no phone site {request.site!r} that this relay calls", "not-found"
            )
        return {"ok": True, "call": record}
    if request.op == "list":
        return {"ok": True, "messages": [summary(e) for e in queue.entries()]}
    if request.op == "status":
        daemon = reporter() if reporter is not None else {"running": True}
        status = {"daemon": daemon, "queue": queue_status(queue.entries(), time.time())}
        return {"ok": True, "status": status}
    ids = request.ids
    if request.op == "show":
        assert ids is not None
        try:
            entry = queue.entry(ids[0])
            head = await read_head(queue, ids[0])
        except (NoSuchMessage, SpoolError) as e:
            return error_response(str(e), reason_of(e))
        return {"ok": True, "message": details(entry, head)}
    if ids is None:  # flush everything
        return {"ok": True, "changed": await flush(None, request.channel)}
    # Every id's change starts at once, so they share the writer's group commit (one
    # fsync, not one per id); the results are read back in the order of the ids.
    pending = [
        (queue_id, ensureDeferred(_one(queue, request, queue_id, flush))) for queue_id in ids
    ]
    results = []
    for queue_id, d in pending:
        try:
            changed = await d
        except (NoSuchMessage, SpoolError) as e:
            results.append(failed_result(queue_id, e))
        else:
            results.append(result(queue_id, changed))
    return {"ok": True, "results": results}


async def _one(queue: SpoolQueue, request: Request, queue_id: str, flush: Flusher) -> int:
    if request.op == "rm":
        await queue.remove(queue_id)
        return 1
    if request.op == "hold":
        return await queue.hold(queue_id)
    if request.op == "release":
        return await queue.release(queue_id)
    queue.entry(queue_id)  # NoSuchMessage for an unknown id, as for the other operations
    return await flush([queue_id], request.channel)


async def read_head(queue: SpoolQueue, queue_id: str) -> bytes:
    """The first part of a message's text, enough to show its header (one read)."""
    reader = queue.open_message(queue_id).open_text()
    try:
        return await reader.read(HEADER_READ_LIMIT)
    finally:
        reader.close()


class ControlProtocol(LineOnlyReceiver):
    """One connection of the control socket: JSON request lines in, response lines out."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(
        self,
        queue: SpoolQueue,
        flusher: Flusher | None = None,
        reporter: Reporter | None = None,
        caller: Caller | None = None,
    ) -> None:
        self._queue = queue
        self._flusher = flusher
        self._reporter = reporter
        self._caller = caller
        self._previous: Deferred[None] = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        """Answer requests in order: each waits for the one before it."""
        self._previous = self._previous.addCallback(lambda _: self._answer(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over the limit ends the connection (after saying why)."""
        self.transport.write(encode_line(error_response("request line too long", "bad-request")))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _answer(self, line: bytes) -> Deferred[None]:
        try:
            request = parse_request(decode_line(line.rstrip(b"\r")))
        except ProtocolError as e:
            self._send(error_response(str(e), "bad-request"))
            return defer.succeed(None)
        d = ensureDeferred(
            execute(self._queue, request, self._flusher, self._reporter, self._caller)
        )
        d.addErrback(self._failed, request)
        return d.addCallback(self._send)

    def _failed(self, failure: Failure, request: Request) -> dict[str, Any]:
        _log.failure("control: {op} failed", failure, op=request.op)
        return error_response(f"{request.op} failed: {failure.getErrorMessage()}")

    def _send(self, response: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode_line(response))


class ControlFactory(Factory):
    """Makes a :class:`ControlProtocol` per connection, all on one queue."""

    def __init__(
        self,
        queue: SpoolQueue,
        flusher: Flusher | None = None,
        reporter: Reporter | None = None,
        caller: Caller | None = None,
    ) -> None:
        self.queue = queue
        self.flusher = flusher
        self.reporter = reporter
        self.caller = caller

    def buildProtocol(self, addr: object) -> ControlProtocol:
        """A protocol bound to the queue."""
        protocol = ControlProtocol(self.queue, self.flusher, self.reporter, self.caller)
        protocol.factory = self
        return protocol


def listen_control(
    queue: SpoolQueue,
    reactor: IReactorUNIX,
    flusher: Flusher | None = None,
    reporter: Reporter | None = None,
    caller: Caller | None = None,
) -> Deferred[IListeningPort]:
    """Serve the control socket of ``queue``'s spool (the caller holds the spool's lock).

    A socket file left by a daemon that died is removed first: holding the lock proves
    no other daemon is serving it.
    """
    path = queue.layout.control_path
    threads: IReactorThreads = reactor  # type: ignore[assignment]

    def unlink_stale() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def listen() -> IListeningPort:
        await deferToThreadPool(threads, threads.getThreadPool(), unlink_stale)
        port: IListeningPort = reactor.listenUNIX(
            str(path), ControlFactory(queue, flusher, reporter, caller), mode=0o600
        )
        return port

    return ensureDeferred(listen())

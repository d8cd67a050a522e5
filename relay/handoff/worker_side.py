"""A gateway worker's end of its link: an :class:`~relay.interfaces.IStore` over a socket.

The worker's gateway calls :meth:`StoreClient.store` exactly as it would call the
spool's; the Deferred fires with the queue id when the spool's process answers
``STORED`` (after its fsync; on the link, or early as a datagram: :class:`AckReader`),
so the gateway's promise (250 only for a message on disk) holds across the process
boundary.  ``FAILED`` becomes the error the gateway maps
to 451, or an ``OSError(ENOSPC)`` for a full disk (452).  If the link drops, every store
still waiting fails (the clients get 451 and send again) and ``on_lost`` ends the worker:
a worker without its spool must not accept mail.  The same link carries the sessions'
questions about failed AUTH (:attr:`StoreClient.auth`,
:class:`~relay.handoff.remote_auth.RemoteAuthThrottle`).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope
from relay.handoff.codec import (
    MAX_ACK_DATAGRAM,
    MAX_REQUEST,
    AuthAnswer,
    AuthBegin,
    AuthEnd,
    Frame,
    HandoffError,
    Hello,
    Ready,
    Sessions,
    Stored,
    StoreFailed,
    StoreRequest,
    decode,
    encode,
    framed,
    unframed,
)
from relay.handoff.remote_auth import RemoteAuthThrottle
from relay.interfaces import IStore
from relay.queue.payload import encode_envelope
from relay.runtime.fastwrite import write_now

__all__ = ["AckReader", "StoreClient"]

_log = Logger()
_MAX_HELLO = 16 * 1024 * 1024  # frames from the spool's side: the HELLO is the biggest
_MAX_ACK = MAX_ACK_DATAGRAM


@implementer(IStore)
class StoreClient(Int32StringReceiver):
    """Sends messages to the spool's process and fires each store's Deferred on its answer."""

    def sendString(self, string: bytes) -> None:
        """Send one frame, straight to the socket when nothing is queued (fastwrite)."""
        write_now(self.transport, framed(string))

    MAX_LENGTH = _MAX_HELLO

    def __init__(
        self, on_hello: Callable[[Hello], object], on_lost: Callable[[str], object]
    ) -> None:
        self._on_hello = on_hello
        self._on_lost = on_lost
        self._hello: Hello | None = None
        self._pending: dict[int, Deferred[str]] = {}
        self._next = 0
        self._lost = False
        self._broken = False  # a malformed frame came: the link is being dropped
        self._drained: list[Deferred[None]] = []
        self.auth = RemoteAuthThrottle(self._send_frame)  # the sessions' IAuthThrottle

    # --- IStore -------------------------------------------------------------------------

    def store(self, envelope: Envelope, text: bytes) -> Deferred[str]:
        """Hand the message over; fire with its queue id once the spool has it on disk."""
        if self._lost or self.transport is None:
            return defer.fail(HandoffError("no link to the spool's process"))
        request = self._next
        self._next = 0 if request == MAX_REQUEST else request + 1
        d: Deferred[str] = Deferred()
        self._pending[request] = d
        self.sendString(encode(StoreRequest(request, encode_envelope(envelope), text)))
        return d

    # --- the link -----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Stores sent and not answered yet."""
        return len(self._pending)

    def drained(self) -> Deferred[None]:
        """Fire when no store is waiting for its answer (at once if none is)."""
        if not self._pending:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def ready(self, accepting: bool = True) -> None:
        """Tell the spool's process whether this worker takes new connections."""
        self._send_frame(Ready(accepting))

    def sessions(self, open_sessions: int, refused: dict[str, int]) -> None:
        """Tell the spool's process how many sessions are open and how many were refused."""
        self._send_frame(Sessions(open_sessions, refused))

    def _send_frame(self, frame: Frame) -> bool:
        """Send ``frame`` if there is a link to send it on; say whether there was."""
        if self._lost or self.transport is None:
            return False
        self.sendString(encode(frame))
        return True

    def datagramReceived(self, datagram: bytes) -> None:
        """Early answers, sent by the spool's writer thread (see :class:`AckReader`)."""
        try:
            payloads = unframed(datagram)
        except HandoffError as e:
            self._malformed(e)
            return
        for payload in payloads:
            if self._broken:  # an earlier frame of it was malformed: the link is going
                return
            self.stringReceived(payload)

    def stringReceived(self, string: bytes) -> None:
        """The spool's side speaks: HELLO once, then answers to our stores."""
        try:
            frame = decode(string)
            if isinstance(frame, Hello):
                if self._hello is not None:
                    raise HandoffError("a second HELLO")
                self._hello = frame
                self._on_hello(frame)
                return
            if isinstance(frame, StoreRequest | Ready | Sessions | AuthBegin | AuthEnd):
                raise HandoffError(f"the spool's side sent a {type(frame).__name__}")
            if isinstance(frame, AuthAnswer):
                self.auth.answered(frame)
                return
            d = self._pending.pop(frame.request, None)
            if d is None:
                raise HandoffError(f"an answer to request {frame.request}, which is not waiting")
        except HandoffError as e:
            self._malformed(e)
            return
        if isinstance(frame, Stored):
            d.callback(frame.queue_id)
        else:
            d.errback(_failure_of(frame))
        self._check_drained()

    def _malformed(self, error: HandoffError) -> None:
        self._broken = True
        _log.error("malformed frame from the spool's process ({why}); exiting", why=error)
        if self.transport is not None:
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        """The spool's side sent more than any HELLO could be."""
        _log.error("a frame of {length} bytes from the spool's process; exiting", length=length)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Fail what waits, and tell the worker it has no spool any more."""
        self._lost = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(HandoffError("the link to the spool's process went away"))
        self.auth.link_lost()
        self._check_drained()
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._on_lost(why)

    def _check_drained(self) -> None:
        if not self._pending:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)


def _failure_of(frame: StoreFailed) -> Exception:
    if frame.disk_full:
        return OSError(errno.ENOSPC, f"spool: {frame.reason}")
    return HandoffError(f"spool: {frame.reason}")


@implementer(IReadDescriptor)
class AckReader:
    """Reads the early answers: datagrams on a UNIX socket, each one or more framed
    STORED frames (all of one sync's answers to this worker; ``codec.unframed``).

    The spool's writer thread sends them the moment the messages are synced, on a socket
    of its own, so the 250 does not wait for the spool process's reactor (busy with
    deliveries) to get round to it.  A datagram arrives whole or not at all, so a
    writer that must never block can send one without framing state.
    """

    def __init__(self, sock: socket.socket, client: StoreClient) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._client = client

    def fileno(self) -> int:
        """The socket's descriptor, for the reactor."""
        return self._sock.fileno()

    def logPrefix(self) -> str:
        """How the reactor names it in the log."""
        return "AckReader"

    def doRead(self) -> None:
        """Take every datagram waiting."""
        while True:
            try:
                datagram = self._sock.recv(_MAX_ACK)
            except BlockingIOError:
                return
            except OSError as e:
                _log.error("early answers: {error}", error=e)
                return
            if not datagram:
                return
            self._client.datagramReceived(datagram)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor is done with it."""
        self._sock.close()

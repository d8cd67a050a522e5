"""The Twisted side of the SMTP client: bytes in and out of the engine, timers, TLS, flow.

:class:`SmtpClientProtocol` is a thin adapter over the sans-I/O
:class:`relay.sansio.smtp.client.SmtpClient`: the engine decides what may be sent and
what each reply answers; this class only

* writes what the engine encodes and hands each reply to the Deferred of the command it
  answers (:meth:`SmtpClientProtocol.command`).  A pipelined batch is just several calls
  in one reactor turn: MAIL and RCPT (RFC 2920's commands that more may follow) are held
  until the command that ends the group, or the end of the turn, so the batch leaves in
  one ``send``; so is text up to :data:`_HOLD_TEXT` bytes, which then leaves with the
  final dot; anything else goes out at once (:func:`relay.runtime.fastwrite.write_now`);
* runs the RFC 5321 §4.5.3.2 timers on the injected clock: one timer, for the oldest
  command still waiting for its reply, with that command's limit (:class:`ReplyTimeouts`),
  and the data-block timer while a text write waits for the transport to drain;
* gives backpressure for the message text: it registers as the transport's streaming
  producer, and :meth:`write_text` returns a Deferred that fires once the transport
  asked it to resume (every chunk is written at once; only the caller waits);
* runs STARTTLS (:meth:`start_tls`: fires when the handshake completed).

Whatever ends the connection (the peer closing, a 421, a timeout, garbage) is turned
into one :class:`SmtpClientError` that every waiting and every later call fails with;
each error knows the MMDF reply it means (:meth:`SmtpClientError.reply`), worded like
Postfix's ("lost connection with mx.example.test[192.0.2.1]:25 while sending RCPT TO").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config import SmtpClientSection
from relay.errors import RelayError
from relay.oneline import escape, one_line
from relay.reply import Reply, ReplyCode, from_smtp
from relay.runtime.fastwrite import write_now
from relay.sansio.smtp.client import (
    NEED_DATA,
    ClientEvent,
    ClientState,
    Command,
    ConnectionClosed,
    EndOfMessage,
    LocalProtocolError,
    MailFrom,
    MessageData,
    Quit,
    RcptTo,
    RemoteProtocolError,
    ServerReply,
    SmtpClient,
)
from relay.sansio.smtp.wire import MAX_TEXT_LINE, SmtpReply

_HOLD_TEXT = 64 * 1024  # text held for the final dot's write; more is written at once

__all__ = [
    "ConnectionLostError",
    "PeerProtocolError",
    "ReplyTimeout",
    "ReplyTimeouts",
    "ServerClosing",
    "SmtpClientError",
    "SmtpClientProtocol",
    "TlsHandshakeFailed",
]


_CLIENT_DEFAULTS = SmtpClientSection()  # [smtp_client]'s defaults, defined once there


@dataclass(frozen=True, slots=True)
class ReplyTimeouts:
    """How long to wait, in seconds (RFC 5321 §4.5.3.2 where it says; Postfix elsewhere)."""

    connect: float = _CLIENT_DEFAULTS.connect_timeout
    greeting: float = _CLIENT_DEFAULTS.greeting_timeout
    helo: float = _CLIENT_DEFAULTS.helo_timeout
    starttls: float = 300.0  # the reply to STARTTLS, then the handshake
    auth: float = 300.0
    mail: float = _CLIENT_DEFAULTS.mail_timeout
    rcpt: float = _CLIENT_DEFAULTS.rcpt_timeout
    data: float = _CLIENT_DEFAULTS.data_timeout  # DATA -> 354
    # one write of text may take this long to drain
    data_block: float = _CLIENT_DEFAULTS.data_block_timeout
    data_done: float = _CLIENT_DEFAULTS.data_done_timeout  # the final dot -> its reply
    rset: float = 120.0
    quit: float = 60.0
    # how long a connection waits in the cache for the next session
    idle: float = _CLIENT_DEFAULTS.connection_cache_time

    def for_command(self, command: Command) -> float:
        """The time allowed for the reply to ``command``."""
        value: float = getattr(self, _TIMEOUT_FIELD[command])
        return value


# Which ReplyTimeouts field bounds the reply to each command (a table built once: this is
# asked for every command sent).
_TIMEOUT_FIELD = {
    Command.GREETING: "greeting",
    Command.EHLO: "helo",
    Command.HELO: "helo",
    Command.STARTTLS: "starttls",
    Command.AUTH: "auth",
    Command.MAIL: "mail",
    Command.RCPT: "rcpt",
    Command.DATA: "data",
    Command.END_OF_DATA: "data_done",
    Command.RSET: "rset",
    Command.NOOP: "rset",
    Command.QUIT: "quit",
}


_PHASE = {
    None: "waiting for the server",
    Command.GREETING: "receiving the initial server greeting",
    Command.EHLO: "performing the EHLO handshake",
    Command.HELO: "performing the HELO handshake",
    Command.STARTTLS: "performing the STARTTLS handshake",
    Command.AUTH: "authenticating",
    Command.MAIL: "sending MAIL FROM",
    Command.RCPT: "sending RCPT TO",
    Command.DATA: "sending DATA command",
    Command.END_OF_DATA: "sending end of data -- message may be sent more than once",
    Command.RSET: "sending RSET",
    Command.NOOP: "sending NOOP",
    Command.QUIT: "sending QUIT",
}
_TEXT_PHASE = "sending message body"


def phase(command: Command | None) -> str:
    """What we were doing when ``command`` went unanswered, in Postfix's words."""
    return _PHASE[command]


class SmtpClientError(RelayError):
    """The connection cannot go on; :meth:`reply` says what that means for the mail."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def reply(self) -> Reply:
        """The MMDF reply every address not yet final gets."""
        return Reply(ReplyCode.NET, self.message)


class ConnectionLostError(SmtpClientError):
    """The peer closed (or the network dropped) the connection."""


class ServerClosing(SmtpClientError):
    """The server said 421: it is going away."""

    def __init__(self, message: str, smtp_reply: SmtpReply) -> None:
        super().__init__(message)
        self.smtp_reply = smtp_reply

    def reply(self) -> Reply:
        r = self.smtp_reply
        return from_smtp(r.code, one_line(self.message), r.enhanced)


class ReplyTimeout(SmtpClientError):
    """No reply (or no room to write) within the limit."""

    def reply(self) -> Reply:
        return Reply(ReplyCode.TIME, self.message)


class PeerProtocolError(SmtpClientError):
    """The server broke the protocol."""

    def reply(self) -> Reply:
        return Reply(ReplyCode.BHST, self.message)


class TlsHandshakeFailed(SmtpClientError):
    """The TLS handshake failed (including a certificate that did not verify)."""

    def reply(self) -> Reply:
        return Reply(ReplyCode.BHST, self.message, enhanced="4.7.5")


@implementer(IHandshakeListener, IPushProducer)
class SmtpClientProtocol(Protocol):
    """One connection to an SMTP server.  See the module docstring."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        timeouts: ReplyTimeouts,
        peer: str,
        *,
        line_length_limit: int = MAX_TEXT_LINE,
    ) -> None:
        """``line_length_limit``: the engine breaks longer text lines (0: never)."""
        self.engine = SmtpClient(line_length_limit=line_length_limit)
        self.peer = peer
        self.tls_active = False
        self.messages = 0  # transactions completed on this connection
        self._clock = clock
        self._timeouts = timeouts
        self._waiters: deque[Deferred[SmtpReply]] = deque()
        self._queue: deque[tuple[ClientEvent, Deferred[SmtpReply]]] = deque()
        self._gone: SmtpClientError | None = None
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._producing = False
        self._drain: list[Deferred[None]] = []
        self._drain_timer: IDelayedCall | None = None
        self._tls: Deferred[None] | None = None
        self._lost: list[Deferred[None]] = []
        self._is_lost = False
        self._on_lost: list[Callable[[], None]] = []
        self._held: list[bytes] = []  # MAIL/RCPT waiting for the rest of their group
        self._held_bytes = 0
        self._held_flush: IDelayedCall | None = None
        self.greeting: Deferred[SmtpReply] = Deferred()
        self._waiters.append(self.greeting)

    # --- state seen from outside --------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Whether commands can still be sent (connected, no 421, no error)."""
        return self._gone is None and self.transport is not None and not self._is_lost

    @property
    def ready(self) -> bool:
        """Usable and between transactions, nothing outstanding: fit for the next message."""
        return (
            self.usable
            and self.engine.state is ClientState.READY
            and not self.engine.unanswered
            and not self._queue
        )

    @property
    def error(self) -> SmtpClientError | None:
        """Why the connection is unusable, if it is."""
        return self._gone

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection is closed."""
        if self._is_lost:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the connection closes (for the connection cache)."""
        self._on_lost.append(callback)

    # --- Twisted callbacks --------------------------------------------------------------

    def connectionMade(self) -> None:
        # Commands and the text leave as soon as they are written: SMTP is a dialogue of
        # small writes, and Nagle's algorithm would hold one back for the peer's ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._rearm()

    def dataReceived(self, data: bytes) -> None:
        self.engine.receive_data(data)
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._is_lost = True
        doing = _TEXT_PHASE if self.engine.state is ClientState.TEXT else phase(self._waiting_for())
        self.engine.receive_data(b"")
        self._process()
        why = _describe(reason)
        if self._tls is not None:
            self._go(TlsHandshakeFailed(f"TLS handshake with {self.peer} failed: {why}"))
        self._go(ConnectionLostError(f"lost connection with {self.peer} while {doing}"))
        self._cancel_timers()
        for d in self._lost:
            d.callback(None)
        self._lost.clear()
        for callback in self._on_lost:
            callback()

    def handshakeCompleted(self) -> None:
        waiter, self._tls = self._tls, None
        if waiter is None:
            return
        self.engine.tls_started()
        self.tls_active = True
        self._cancel_timer()
        waiter.callback(None)

    # IPushProducer: the transport tells us when its buffer is full and when it drained.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._release_drain()

    def stopProducing(self) -> None:
        self._paused = False
        self._release_drain()

    # --- commands -------------------------------------------------------------------

    def command(self, event: ClientEvent) -> Deferred[SmtpReply]:
        """Send ``event`` (now, or once the replies it must wait for came); fire with its reply.

        Without PIPELINING a command waits in a queue until every earlier reply came; with
        it, MAIL, RCPT, RSET and the command after them go out at once.  Fails with the
        connection's :class:`SmtpClientError` if it is (or becomes) unusable before the
        reply; a command the engine does not allow in its state is a LocalProtocolError
        (a defect of the caller), raised now or, for a queued one, as the failure.
        """
        if self._gone is not None:
            return defer.fail(self._gone)
        d: Deferred[SmtpReply] = Deferred()
        if self._queue or not self.engine.may_send_now(event):
            self._queue.append((event, d))
        else:
            self._send_now(event, d)
        return d

    def _send_now(self, event: ClientEvent, d: Deferred[SmtpReply]) -> None:
        data = self.engine.send(event)
        self._waiters.append(d)
        if isinstance(event, MailFrom | RcptTo) and self.engine.offers("PIPELINING"):
            self._hold(data)
        else:
            self._write(data)
        if len(self._waiters) == 1:
            self._rearm()

    def _hold(self, data: bytes) -> None:
        """Keep a command more may follow until its group ends, at the latest this turn."""
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_flush is None:
            self._held_flush = self._clock.callLater(0, self._write_held)

    def _write_held(self) -> None:
        self._held_flush = None
        transport = self.transport
        if not self._held or transport is None or self._is_lost or self._gone is not None:
            return
        if getattr(transport, "disconnecting", False):  # we closed it meanwhile
            self._drop_held()
            return
        self._write(b"")

    def _drop_held(self) -> None:
        """Forget held commands: the connection is closing or unusable."""
        if self._held_flush is not None and self._held_flush.active():
            self._held_flush.cancel()
        self._held_flush = None
        self._held.clear()
        self._held_bytes = 0

    def _flush_queue(self) -> None:
        """Send the queued commands the outstanding replies no longer hold back."""
        while self._queue and self._gone is None and self.engine.may_send_now(self._queue[0][0]):
            event, d = self._queue.popleft()
            try:
                self._send_now(event, d)
            except LocalProtocolError as e:
                d.errback(e)

    def begin_text(self) -> None:
        """The 354 came: register for flow control while the text is written."""
        if self.transport is not None and self._gone is None and not self._producing:
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._producing = True

    def write_text(self, chunk: bytes) -> Deferred[None]:
        """Stuff and write a chunk; fire when the transport can take more."""
        if self._gone is not None:
            return defer.fail(self._gone)
        data = self.engine.send(MessageData(chunk))
        if not self._paused and len(data) + self._held_bytes <= _HOLD_TEXT:
            self._hold(data)  # a small message leaves with its final dot, in one send
        else:
            self._write(data)
        if not self._paused:
            return defer.succeed(None)
        if self._drain_timer is None:
            self._drain_timer = self._clock.callLater(
                self._timeouts.data_block, self._text_timed_out
            )
        waiter: Deferred[None] = Deferred()
        self._drain.append(waiter)
        return waiter

    def end_text(self) -> Deferred[SmtpReply]:
        """Send the end of the text (``CRLF.CRLF``); fire with the final reply."""
        if self.transport is not None and self._producing:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self._producing = False
        self._paused = False
        return self.command(EndOfMessage())

    def start_tls(self, options: Any) -> Deferred[None]:
        """Start the TLS handshake (after the 220 to STARTTLS); fire when it completed."""
        if self._gone is not None:
            return defer.fail(self._gone)
        assert self.transport is not None
        self._tls = Deferred()
        waiter = self._tls
        self._cancel_timer()
        self._timer = self._clock.callLater(self._timeouts.starttls, self._tls_timed_out)
        self.transport.startTLS(options)  # type: ignore[attr-defined]
        return waiter

    def quit(self) -> Deferred[None]:
        """Say QUIT (if the state allows) and close; fire once the connection is closed."""
        lost = self.when_lost()
        if self.transport is None or self._is_lost:
            return lost
        if self.usable and not self.engine.unanswered and not self._queue:
            try:
                d = self.command(Quit())
            except Exception:  # the state does not allow QUIT (e.g. in the text): just close
                self._drop_held()
                self.transport.loseConnection()
            else:
                d.addBoth(lambda _: self._close())
                return lost
        self._drop_held()
        self.transport.loseConnection()
        return lost

    def abort(self) -> None:
        """Drop the connection now (a timeout, or a message abandoned during its text)."""
        if self._gone is None:
            self._gone = ConnectionLostError(f"connection with {self.peer} closed by us")
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # --- internals --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self._held:  # the group's held commands go first, in the same write
            data = b"".join((*self._held, data))
            self._held.clear()
            self._held_bytes = 0
            if self._held_flush is not None:
                self._held_flush.cancel()
                self._held_flush = None
        if data:
            write_now(self.transport, data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _process(self) -> None:
        """Hand every complete reply to the command it answers."""
        while True:
            try:
                event = self.engine.next_event()
            except RemoteProtocolError as e:
                self._log.warn(
                    "protocol error from {peer}: {error}", peer=self.peer, error=escape(str(e))
                )
                self._go(PeerProtocolError(f"protocol error from {self.peer}: {e}"))
                self.abort()
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, ServerReply)
            self._reply(event)

    def _reply(self, event: ServerReply) -> None:
        reply = event.reply
        if event.command is None:  # a 421 nobody asked for (the server's idle timeout)
            self._go(ServerClosing(f"{self.peer} closed the connection: {reply}", reply))
            self._close()
            return
        waiter = self._waiters.popleft()
        self._rearm()
        if reply.code == 421 and event.command is not Command.QUIT:
            self._go(
                ServerClosing(
                    f"{self.peer} said: {reply} (in reply to {event.command.value})", reply
                )
            )
            self._close()
        else:
            self._flush_queue()
        waiter.callback(reply)

    def _waiting_for(self) -> Command | None:
        unanswered = self.engine.unanswered
        return unanswered[0] if unanswered else None

    def _go(self, error: SmtpClientError) -> None:
        """The connection is unusable: fail everything waiting, and everything later."""
        if self._gone is None:
            self._gone = error
        self._cancel_timer()
        self._drop_held()
        waiters, self._waiters = self._waiters, deque()
        queued, self._queue = self._queue, deque()
        for d in [*waiters, *(d for _, d in queued)]:
            d.errback(self._gone)
        if self._tls is not None:
            tls, self._tls = self._tls, None
            tls.errback(self._gone)
        self._release_drain(self._gone)

    def _rearm(self) -> None:
        """(Re)start the timer for the oldest command still waiting for its reply."""
        self._cancel_timer()
        command = self._waiting_for()
        if command is None or self._gone is not None:
            return
        self._timer = self._clock.callLater(
            self._timeouts.for_command(command), self._timed_out, command
        )

    def _timed_out(self, command: Command) -> None:
        self._timer = None
        self._log.info("timeout from {peer} while {phase}", peer=self.peer, phase=phase(command))
        self._go(ReplyTimeout(f"conversation with {self.peer} timed out while {phase(command)}"))
        self.abort()

    def _tls_timed_out(self) -> None:
        self._timer = None
        self._go(ReplyTimeout(f"TLS handshake with {self.peer} timed out"))
        self.abort()

    def _text_timed_out(self) -> None:
        self._drain_timer = None
        self._go(ReplyTimeout(f"conversation with {self.peer} timed out while {_TEXT_PHASE}"))
        self.abort()

    def _release_drain(self, error: SmtpClientError | None = None) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        drain, self._drain = self._drain, []
        for waiter in drain:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        self._drop_held()
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None


def _describe(reason: Failure) -> str:
    """A short human text for why a connection ended (TLS errors made readable)."""
    value = reason.value
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):  # OpenSSL.SSL.Error: [(lib, func, reason), ...]
        reasons = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            return ", ".join(reasons)
    text = str(value) or type(value).__name__
    return one_line(text)

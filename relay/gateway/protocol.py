"""The Twisted side of the SMTP gateway: bytes between a socket and the engine, and I/O.

:class:`SmtpServerProtocol` does only what the sans-I/O engine cannot: it moves bytes,
runs timers on the injected clock, counts sessions, starts TLS, asks the policy, checks
passwords (in a thread) and stores messages in the spool.  Every protocol decision is
the engine's (:mod:`relay.sansio.smtp.server`).

The loop is :meth:`SmtpServerProtocol._pump`: take events from the engine until it needs
data, answering each.  An answer that takes time (the spool's fsync, a password check,
the TLS handshake) sets ``_busy``; the engine is paused on that event anyway, and the
transport stops reading while the engine holds more than :data:`_READ_PAUSE_BYTES`, so a
client pipelining into a slow moment cannot make us buffer without bound.

**The 250 after DATA is written only when the spool's Deferred has fired**, i.e. when
the message is fsynced (IQueue.store's contract).  If the store fails the reply is
``451 4.3.0``, or ``452 4.3.1`` when the disk is full, and the spool keeps nothing.

Replies go out through :func:`~relay.gateway.fastwrite.write_now`, which sends at once
when the socket is idle plain TCP instead of waiting for the reactor's next pass (see
there for why and when it falls back to ``transport.write``).
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import Address
from relay.envelope import Envelope, Recipient, Submitter
from relay.errors import SpoolError
from relay.gateway.auth import PasswordChecker
from relay.gateway.fastwrite import write_now
from relay.gateway.policy import RelayPolicy
from relay.gateway.received import received_header
from relay.gateway.tls import tls_description
from relay.interfaces import IQueue
from relay.sansio.smtp.events import (
    AuthCredentials,
    EndOfMessage,
    Greeting,
    MailFrom,
    MessageData,
    RcptTo,
    Refuse,
    Respond,
    Sentinel,
    Shutdown,
    StartTls,
)
from relay.sansio.smtp.server import CLOSED, ServerConnection, ServerSettings, State
from relay.sansio.smtp.wire import SmtpReply

__all__ = ["GatewayFactory", "SessionLimiter", "SmtpServerProtocol", "Timeouts"]

_log = Logger()

_READ_PAUSE_BYTES = 256 * 1024


def _reply(code: int, enhanced: str, text: str) -> SmtpReply:
    return SmtpReply(code, enhanced, (text,))


class SessionLimiter:
    """Counts open sessions, overall and per client address, for all listeners at once."""

    def __init__(self, max_sessions: int, max_per_client: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self.sessions: set[SmtpServerProtocol] = set()

    def admit(self, client: str) -> str | None:
        """Count a new session; or say why not (and count nothing)."""
        if self.total >= self.max_sessions:
            return "too many sessions"
        if self.per_client[client] >= self.max_per_client:
            return "too many sessions from your address"
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        """A counted session ended."""
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Session timing, in seconds (``[smtp]`` idle_timeout, session_timeout).

    ``greet_delay`` holds the greeting back from clients outside ``trusted_networks`` so
    that one talking first is caught (RFC 5321 section 4.3.1; postscreen's pregreet
    test, which also spares trusted clients the wait); 0 greets everyone at once.
    ``auth_failure_delay`` is how long a failed AUTH waits before its 535.
    """

    idle: float = 300.0
    session: float = 1800.0
    greet_delay: float = 0.0
    auth_failure_delay: float = 1.0


@dataclass(slots=True)
class _Transaction:
    """What the adapter keeps of the current message beside the engine's state."""

    recipients: list[Address] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)


class GatewayFactory(Factory):
    """Builds sessions for one listener; sessions of all listeners share a limiter."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        policy: RelayPolicy,
        queue: IQueue | None,
        clock: IReactorTime,
        limiter: SessionLimiter,
        timeouts: Timeouts,
        tls_options: CertificateOptions | None = None,
        checker: PasswordChecker | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.clock = clock
        self.limiter = limiter
        self.timeouts = timeouts
        self.tls_options = tls_options
        self.checker = checker
        self.accepted = 0  # messages stored, for the benchmark and tests

    def buildProtocol(self, addr: Any) -> SmtpServerProtocol:
        """A new session for a connection from ``addr``."""
        return SmtpServerProtocol(self, _client_ip(addr))


def _client_ip(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else "unix"


@implementer(IHandshakeListener)
class SmtpServerProtocol(Protocol):
    """One SMTP session: the engine's adapter."""

    def __init__(self, factory: GatewayFactory, client_ip: str) -> None:
        self.gateway = factory
        self.client_ip = client_ip
        self.engine = ServerConnection(factory.settings)
        self.tls_info: str | None = None
        self._counted = False
        self._busy = False
        self._paused_reading = False
        self._transaction = _Transaction()
        self._idle_timer: IDelayedCall | None = None
        self._last_activity = 0.0
        self._session_timer: IDelayedCall | None = None
        self._greet_timer: IDelayedCall | None = None
        self._auth_timer: IDelayedCall | None = None
        self._lost = False

    # --- connection -------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Admit (or refuse) the session, arm the timers, greet (maybe after a delay)."""
        gateway = self.gateway
        hostname = gateway.settings.hostname
        refusal = gateway.limiter.admit(self.client_ip)
        reply = _reply(421, "4.7.0", f"{hostname} Error: {refusal}")
        if refusal is None and gateway.queue is None:
            gateway.limiter.release(self.client_ip)
            refusal = "spool not ready"
            reply = _reply(421, "4.3.2", f"{hostname} Service not available, try again later")
        if refusal is not None:
            _log.info("smtp: refused {client}: {why}", client=self.client_ip, why=refusal)
            self._write(self.engine.send(Refuse(reply)))
            self._close()
            return
        self._counted = True
        gateway.limiter.sessions.add(self)
        clock = gateway.clock
        self._session_timer = clock.callLater(gateway.timeouts.session, self._timeout, "session")
        self._touch()
        if gateway.timeouts.greet_delay > 0 and not gateway.policy.is_trusted(self.client_ip):
            self._greet_timer = clock.callLater(gateway.timeouts.greet_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greet_timer = None
        if self.engine.closed or self._lost:
            return
        if self.engine.buffered:  # it talked first: let the engine answer that
            self._pump()
            return
        self._write(self.engine.send(Greeting()))

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: to the engine, then answer what it found."""
        self._touch()
        self.engine.receive_data(data)
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        self._pump()

    def handshakeCompleted(self) -> None:
        """TLS is up: after STARTTLS the engine starts over; for implicit TLS just note it."""
        self.tls_info = tls_description(self.transport)
        if self._busy and self.engine.state is State.TLS:
            self.engine.tls_started()
            self._busy = False
            self._resume_reading()
            self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the session's slot and timers; an unfinished message is dropped."""
        self._lost = True
        for timer in (self._idle_timer, self._session_timer, self._greet_timer, self._auth_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._counted:
            self._counted = False
            self.gateway.limiter.release(self.client_ip)
            self.gateway.limiter.sessions.discard(self)
        self._transaction = _Transaction()

    @property
    def busy(self) -> bool:
        """Whether the session waits on the spool, a password check or a TLS handshake."""
        return self._busy

    def shutdown(self, reply: SmtpReply) -> None:
        """End the session unasked (timeout, service stopping): the reply, then close."""
        if not self._lost:
            self._write(self.engine.send(Shutdown(reply)))
            self._close()

    # --- the loop ---------------------------------------------------------------------

    def _pump(self) -> None:
        engine = self.engine
        while not self._busy and not self._lost:
            event = engine.next_event()
            if event is CLOSED:
                self._close()
                return
            if isinstance(event, Sentinel):
                return
            if isinstance(event, Respond):
                self._answer(event.reply)
            elif isinstance(event, MessageData):
                self._transaction.chunks.append(event.data)
            elif isinstance(event, RcptTo):
                self._answer(self._recipient(event))
            elif isinstance(event, MailFrom):
                self._transaction = _Transaction()
                self._answer(self.gateway.policy.check_sender(event))
            elif isinstance(event, EndOfMessage):
                self._store()
            elif isinstance(event, AuthCredentials):
                self._authenticate(event)
            elif isinstance(event, StartTls):
                self._start_tls()
        if self._busy and engine.buffered > _READ_PAUSE_BYTES and not self._paused_reading:
            self._paused_reading = True
            self._transport().pauseProducing()

    def _answer(self, reply: SmtpReply) -> None:
        self._write(self.engine.send(reply))
        if self.engine.closed:
            self._close()

    def _finish_async(self, reply: SmtpReply) -> None:
        """The reply to a slow event: send it and go on reading."""
        self._busy = False
        if self._lost or self.engine.closed:  # the session ended meanwhile (timeout, stop)
            return
        self._answer(reply)
        self._touch()
        self._resume_reading()
        self._pump()

    def _resume_reading(self) -> None:
        if self._paused_reading and not self._lost:
            self._paused_reading = False
            self._transport().resumeProducing()

    # --- decisions --------------------------------------------------------------------

    def _recipient(self, event: RcptTo) -> SmtpReply:
        may_relay = self.gateway.policy.may_relay(
            self.client_ip, self.engine.authenticated_user is not None
        )
        try:
            reply = self.gateway.policy.check_recipient(event.address, may_relay=may_relay)
        except Exception:
            # A broken lookup (aliases, passwd) must not cost the client more than a retry.
            _log.failure("smtp: recipient check failed for {client}", client=self.client_ip)
            return _reply(451, "4.3.0", "Temporary lookup failure, try again later")
        if reply.is_positive and event.address not in self._transaction.recipients:
            self._transaction.recipients.append(event.address)
        return reply

    def _store(self) -> None:
        engine = self.engine
        mail = engine.mail
        queue = self.gateway.queue
        assert mail is not None and queue is not None
        transaction, self._transaction = self._transaction, _Transaction()
        now = self.gateway.clock.seconds()
        recipients = transaction.recipients
        submitter = Submitter(
            protocol=engine.protocol_name,
            client_address=self.client_ip,
            client_name=None,
            helo=engine.helo_name,
            auth_user=engine.authenticated_user,
            tls=self.tls_info,
        )
        header = received_header(
            helo=engine.helo_name,
            client_ip=self.client_ip,
            client_name=None,
            hostname=self.gateway.settings.hostname,
            protocol=engine.protocol_name,
            when=now,
            tls=self.tls_info,
            auth_user=engine.authenticated_user,
            recipient=recipients[0] if len(recipients) == 1 else None,
        )
        envelope = Envelope(
            return_path=mail.reverse_path,
            recipients=tuple(Recipient(a) for a in recipients),
            arrival=now,
            submitter=submitter,
            body_type=mail.body,
            smtputf8=mail.smtputf8,
        )
        text = b"".join([header, *transaction.chunks])
        self._busy = True
        d: Deferred[str] = queue.store(envelope, text)
        d.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(envelope, len(text)),
        )

    def _stored(self, queue_id: str, envelope: Envelope, size: int) -> None:
        self.gateway.accepted += 1
        # One preformatted field for the text (the observer formats it per event, on the
        # hot path), the same values as separate keys for structured observers.
        sender = envelope.sender_text
        helo = self.engine.helo_name
        protocol = envelope.submitter.protocol
        _log.info(
            "{summary}",
            summary=f"smtp: {queue_id} stored from=<{sender}> nrcpt={len(envelope.recipients)} "
            f"size={size} client={self.client_ip} helo={helo} proto={protocol}",
            queue_id=queue_id,
            sender=sender,
            client=self.client_ip,
            helo=helo,
            proto=protocol,
            size=size,
        )
        self._finish_async(_reply(250, "2.0.0", f"Ok: queued as {queue_id}"))

    def _store_failed(self, failure: Failure) -> None:
        _log.failure("smtp: cannot store message from {client}", failure, client=self.client_ip)
        if _disk_full(failure.value):
            reply = _reply(452, "4.3.1", "Insufficient system storage")
        else:
            reply = _reply(451, "4.3.0", "Local error in processing, try again later")
        self._finish_async(reply)

    def _authenticate(self, event: AuthCredentials) -> None:
        checker = self.gateway.checker
        self._busy = True
        if checker is None:  # the engine only offers AUTH with a checker
            self._finish_async(_reply(454, "4.7.0", "Temporary authentication failure"))
            return

        def checked(ok: bool) -> None:
            if ok:
                _log.info(
                    "smtp: {client} authenticated as {user}",
                    client=self.client_ip,
                    user=event.username,
                )
                self._finish_async(_reply(235, "2.7.0", "Authentication successful"))
                return
            _log.info(
                "smtp: {client} failed AUTH {mechanism} for {user}",
                client=self.client_ip,
                mechanism=event.mechanism,
                user=event.username,
            )
            self._auth_timer = self.gateway.clock.callLater(
                self.gateway.timeouts.auth_failure_delay,
                self._finish_async,
                _reply(535, "5.7.8", "Authentication credentials invalid"),
            )

        checker.check(event.username, event.password).addCallback(checked)

    def _start_tls(self) -> None:
        options = self.gateway.tls_options
        if options is None:
            self._answer(_reply(454, "4.7.0", "TLS not available"))
            return
        self._answer(_reply(220, "2.0.0", "Ready to start TLS"))
        self._busy = True
        self._transport().startTLS(options)

    # --- timers and output ------------------------------------------------------------

    def _touch(self) -> None:
        """Note activity (input arrived, or we answered and now wait for input).

        The idle timer is lazy: it is armed once and, when it fires, re-arms itself for
        whatever is left since the last activity.  Resetting a timer on every read would
        cost a reactor heap operation per packet on the hot path.
        """
        clock = self.gateway.clock
        self._last_activity = clock.seconds()
        if self._idle_timer is None and not self._lost:
            self._idle_timer = clock.callLater(self.gateway.timeouts.idle, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._lost:
            return
        clock = self.gateway.clock
        if self._busy and self.engine.state is not State.TLS:
            self._last_activity = clock.seconds()  # we are the slow one, not the client
        remaining = self._last_activity + self.gateway.timeouts.idle - clock.seconds()
        if remaining > 0:
            self._idle_timer = clock.callLater(remaining, self._idle_check)
            return
        self._timeout("idle")

    def _timeout(self, which: str) -> None:
        if self._lost:
            return
        _log.info("smtp: {client}: {which} timeout", client=self.client_ip, which=which)
        hostname = self.gateway.settings.hostname
        self.shutdown(_reply(421, "4.4.2", f"{hostname} Error: timeout exceeded"))

    def _transport(self) -> Any:
        """The TCP (or TLS) transport, with its producer and startTLS methods."""
        return self.transport

    def _write(self, data: bytes) -> None:
        if data and not self._lost:
            write_now(self.transport, data)

    def _close(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.loseConnection()


def _disk_full(error: BaseException | None) -> bool:
    """Whether a store failure is a full disk (ENOSPC/EDQUOT anywhere in its causes)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, SpoolError) and "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False

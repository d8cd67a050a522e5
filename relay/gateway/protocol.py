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

**A client that does not read its replies** would otherwise make us buffer them without
bound: it can pipeline cheap commands (``VRFY``, ``NOOP``) forever, each answered into
the transport's buffer.  So the session is a streaming producer registered on its
transport, which pauses it while more than its ``bufferSize`` (64 KiB) of output is
unsent and resumes it once that has drained.  While paused the session answers nothing
more, and once the engine holds :data:`_READ_PAUSE_BYTES` of unanswered input the
transport stops reading too: the client's further commands wait in its own socket
buffers, not in ours.  (Reading does not stop at once because TLS pauses its producer
while the handshake is under way, and the handshake needs reading.)  A client that
leaves it so for ``idle_timeout`` (it sends nothing we read meanwhile) is dropped at
once, without the ``421`` it would not read.

**The 250 after DATA is written only when the spool's Deferred has fired**, i.e. when
the message is fsynced (IStore.store's contract).  If the store fails the reply is
``451 4.3.0``, or ``452 4.3.1`` when the disk is full, and the spool keeps nothing.
Nothing ends a session while its store is in flight: a timeout or a service stop that
comes then waits for the store's reply to be written, and only then sends its ``421``.
Otherwise the client would see a ``421`` for a message the spool did keep, and send it
again (a duplicate).  A hung spool cannot hold a session open for ever: the client's own
timeout (10 minutes for the final dot, RFC 5321 section 4.5.3.2) closes it.

**Each accepted recipient is stored with its destination**, as the policy's router
decided it at RCPT time (see :mod:`relay.policy.acceptance`).

**Message text in memory.**  A session keeps its text in one ``BytesIO`` that starts
with the ``Received:`` header (made at the first piece of text: everything in it is
settled once DATA is accepted), so the bytes handed to the spool come out of
``getvalue()`` without a second full copy.  Every byte held counts against the
gateway-wide :class:`~relay.gateway.limits.TextBudget` until the spool's Deferred
fires; a message that does not fit is read and thrown away, and answered ``452 4.3.1``.

**AUTH.**  A failed AUTH is answered after a delay and counted per client address in the
relay's :class:`~relay.gateway.limits.AuthThrottle`, which the session asks through an
:class:`~relay.interfaces.IAuthThrottle` before each password check (in a gateway worker
that asks the spool's process); a client over its limit gets ``454 4.7.0`` without a
password check.  A users file that cannot be read, or a question that cannot be asked
(a worker's link gone), answers ``454 4.7.0`` too (our problem, not a wrong password).

Replies go out through :func:`~relay.runtime.fastwrite.write_now`, which sends at once
when the socket is idle plain TCP instead of waiting for the reactor's next pass (see
there for why and when it falls back to ``transport.write``).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import Address
from relay.config import SmtpSection
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.gateway.auth import AuthUnavailable, PasswordChecker
from relay.gateway.limits import AuthThrottle, LocalAuthThrottle, TextBudget
from relay.gateway.tls import tls_description
from relay.interfaces import AuthVerdict, IAuthThrottle, IStore, QueueSource
from relay.oneline import escape
from relay.policy.acceptance import RelayPolicy
from relay.queue.intake import disk_full, log_stored
from relay.received import received_header
from relay.runtime.fastwrite import write_now
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
from relay.sansio.smtp.server import CLOSED, ServerConnection, ServerSettings
from relay.sansio.smtp.state import ServerState
from relay.sansio.smtp.wire import SmtpReply

__all__ = [
    "GatewayFactory",
    "SessionLimiter",
    "SessionTimeouts",
    "SmtpServerProtocol",
]

_log = Logger()

_READ_PAUSE_BYTES = 256 * 1024
_TEXT_STATES = (ServerState.DATA, ServerState.BDAT)  # the engine is reading a message's text


def _reply(code: int, enhanced: str, text: str) -> SmtpReply:
    return SmtpReply(code, enhanced, (text,))


class SessionLimiter:
    """Counts open sessions, overall and per client address, for all listeners at once.

    ``max_per_client`` holds for clients outside ``trusted_networks`` only (as Postfix
    exempts ``mynetworks`` from its per-client limit): a trusted client that opens many
    sessions at once is a submission program or a list server doing its job, and only
    ``max_sessions`` bounds it.  A session is released as soon as it has ended (its
    ``221`` or ``421`` written), not when the client's close reaches us: a client that
    reconnects right after QUIT would otherwise find its old session still counted.
    """

    def __init__(self, max_sessions: int, max_per_client: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self.sessions: set[SmtpServerProtocol] = set()
        self.refused: Counter[str] = Counter()  # sessions refused, by REFUSALS reason
        self._listeners: list[Callable[[int, int], object]] = []

    def add_listener(self, listener: Callable[[int, int], object]) -> None:
        """Tell ``listener(total, max_sessions)`` after each change: a gateway worker
        reports its room from it, the spool's process balances its workers by it."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener(self.total, self.max_sessions)

    def admit(self, client: str, *, trusted: bool = False) -> str | None:
        """Count a new session; or say why not (and count only the refusal).

        A ``trusted`` client is counted too, but never refused for its own count.
        """
        if self.total >= self.max_sessions:
            self.refuse("max_sessions")
            return "too many sessions"
        if not trusted and self.per_client[client] >= self.max_per_client:
            self.refuse("max_sessions_per_client")
            return "too many sessions from your address"
        self.total += 1
        self.per_client[client] += 1
        self._changed()
        return None

    def room(self) -> int:
        """How many more sessions may open now (0 when full)."""
        return max(0, self.max_sessions - self.total)

    def refuse(self, reason: str) -> None:
        """Count a session refused at connect, by reason (a metric label)."""
        self.refused[reason] += 1
        self._changed()

    def release(self, client: str) -> None:
        """A counted session ended."""
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        self._changed()


_SMTP_DEFAULTS = SmtpSection()  # the defaults of [smtp], defined once, in the config


@dataclass(frozen=True, slots=True)
class SessionTimeouts:
    """Session timing, in seconds (``[smtp]`` idle_timeout, session_timeout, greet_delay).

    ``greet_delay`` holds the greeting back from clients outside ``trusted_networks`` so
    that one talking first is caught (RFC 5321 section 4.3.1; postscreen's pregreet
    test, which also spares trusted clients the wait); 0 greets everyone at once.
    ``auth_failure_delay`` is how long a failed AUTH waits before its 535.
    """

    idle: float = _SMTP_DEFAULTS.idle_timeout
    session: float = _SMTP_DEFAULTS.session_timeout
    greet_delay: float = _SMTP_DEFAULTS.greet_delay
    auth_failure_delay: float = 1.0


@dataclass(slots=True)
class _Transaction:
    """What the adapter keeps of the current message beside the engine's state.

    ``recipients`` maps each accepted address (once, in order) to its destination;
    ``text`` is the ``Received:`` header and the text so far (None before the first
    piece), ``held`` the bytes of it reserved from the gateway's TextBudget, and
    ``over_budget`` says the text did not fit and is being thrown away.
    """

    recipients: dict[Address, Destination] = field(default_factory=dict)
    text: io.BytesIO | None = None
    held: int = 0
    over_budget: bool = False


class GatewayFactory(Factory):
    """Builds sessions for one listener; sessions of all listeners share a limiter."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        policy: RelayPolicy,
        queue: QueueSource,
        clock: IReactorTime,
        limiter: SessionLimiter,
        timeouts: SessionTimeouts,
        tls_options: CertificateOptions | None = None,
        checker: PasswordChecker | None = None,
        text_budget: TextBudget | None = None,
        auth_throttle: IAuthThrottle | None = None,
        log_stored: bool = True,
    ) -> None:
        """``queue`` is the store, once open: until it is, sessions are answered ``421``.
        ``text_budget`` and ``auth_throttle`` are shared by all listeners' factories
        (:func:`~relay.gateway.service.build_gateway`); by default each factory has its own.
        A gateway worker's factories say ``log_stored=False``: the spool's process logs
        the "stored" line when it stores (relay.handoff.spool_side), one line per message
        either way.
        """
        self.settings = settings
        self.policy = policy
        self.queue: IStore | None = None
        self.clock = clock
        self.limiter = limiter
        self.timeouts = timeouts
        self.tls_options = tls_options
        self.checker = checker
        self.text_budget = TextBudget() if text_budget is None else text_budget
        self.auth_throttle: IAuthThrottle = (
            LocalAuthThrottle(AuthThrottle(clock)) if auth_throttle is None else auth_throttle
        )
        self.accepted = 0  # messages stored, for the benchmark and tests
        self.log_stored = log_stored
        # A spool that cannot open is logged once, by build_gateway; here it only means
        # the sessions keep answering 421.
        queue.when_ready().addCallbacks(self._opened, lambda _: None)

    def _opened(self, queue: IStore) -> None:
        self.queue = queue

    def buildProtocol(self, addr: Any) -> SmtpServerProtocol:
        """A new session for a connection from ``addr``."""
        return SmtpServerProtocol(self, _client_ip(addr))


def _client_ip(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else "unix"


@implementer(IHandshakeListener, IPushProducer)
class SmtpServerProtocol(Protocol):
    """One SMTP session: the engine's adapter, and the producer of its replies."""

    def __init__(self, factory: GatewayFactory, client_ip: str) -> None:
        self.gateway = factory
        self.client_ip = client_ip
        self.engine = ServerConnection(factory.settings)
        self.tls_info: str | None = None
        self._counted = False
        self._busy = False
        self._storing = False
        self._shutdown_after_store: SmtpReply | None = None
        self._paused_reading = False
        self._output_full = False  # the transport paused us: too much output unsent
        self._producing = False  # registered as the transport's producer
        self._transaction = _Transaction()
        self._idle_timer: IDelayedCall | None = None  # also watches the session deadline
        self._last_activity = 0.0
        self._session_deadline = float("inf")
        self._greet_timer: IDelayedCall | None = None
        self._auth_timer: IDelayedCall | None = None
        self._lost = False

    # --- connection -------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Admit (or refuse) the session, arm the timers, greet (maybe after a delay)."""
        gateway = self.gateway
        hostname = gateway.settings.hostname
        # Replies leave as soon as they are written: SMTP is a dialogue of small writes,
        # and Nagle's algorithm would hold a reply back for the client's delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        trusted = gateway.policy.is_trusted(self.client_ip)
        refusal = gateway.limiter.admit(self.client_ip, trusted=trusted)
        if refusal is None and gateway.queue is None:
            gateway.limiter.release(self.client_ip)
            gateway.limiter.refuse("spool_not_ready")
            refusal = "spool not ready"
            reply = _reply(421, "4.3.2", f"{hostname} Service not available, try again later")
        elif refusal is not None:
            reply = _reply(421, "4.7.0", f"{hostname} Error: {refusal}")
        if refusal is not None:
            _log.info("smtp: refused {client}: {why}", client=self.client_ip, why=refusal)
            self._write(self.engine.send(Refuse(reply)))
            self._close()
            return
        self._counted = True
        gateway.limiter.sessions.add(self)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._producing = True
        clock = gateway.clock
        self._session_deadline = clock.seconds() + gateway.timeouts.session
        self._touch()
        if gateway.timeouts.greet_delay > 0 and not trusted:
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
        if self._busy and self.engine.state is ServerState.TLS:
            self.engine.tls_started()
            self._busy = False
            self._update_reading()
            self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the session's slot and timers; an unfinished message is dropped."""
        self._lost = True
        for timer in (self._idle_timer, self._greet_timer, self._auth_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._release()
        self._drop_text()
        self._transaction = _Transaction()

    @property
    def busy(self) -> bool:
        """Whether the session waits on the spool, a password check or a TLS handshake."""
        return self._busy

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (its slot may have been given back earlier)."""
        return self._lost

    @property
    def storing(self) -> bool:
        """Whether the session waits for the spool to store a message."""
        return self._storing

    def shutdown(self, reply: SmtpReply) -> None:
        """End the session unasked (timeout, service stopping): the reply, then close.

        While a store is in flight this only takes note: the store's own reply goes out
        first, then ``reply``, so the client learns whether its message was kept.
        """
        if self._lost:
            return
        if self._storing:
            if self._shutdown_after_store is None:
                self._shutdown_after_store = reply
            return
        if self._output_full or self.engine.closed:
            # It does not read: a reply would only wait in our buffer, as the last one
            # (221, 421) of a session already closing does.
            _log.info(
                "smtp: {client}: dropped: it leaves its replies unread", client=self.client_ip
            )
            self._release()
            self._transport().abortConnection()
            return
        self._write(self.engine.send(Shutdown(reply)))
        self._close()

    # --- output flow control (IPushProducer, called by the transport) -------------------

    def pauseProducing(self) -> None:
        """The transport holds more unsent output than its bound: answer nothing more."""
        self._output_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport has sent what it held: answer what the client sent meanwhile."""
        self._output_full = False
        if self._lost:
            return
        self._update_reading()
        self._pump()

    def stopProducing(self) -> None:
        """The connection is going away (``connectionLost`` follows)."""
        self._output_full = False

    # --- the loop ---------------------------------------------------------------------

    def _pump(self) -> None:
        engine = self.engine
        while not self._busy and not self._lost and not self._output_full:
            event = engine.next_event()
            if event is CLOSED:
                self._close()
                return
            if isinstance(event, Sentinel):
                return
            if isinstance(event, Respond):
                self._answer(event.reply)
            elif isinstance(event, MessageData):
                self._keep_text(event.data)
            elif isinstance(event, RcptTo):
                self._answer(self._recipient(event))
            elif isinstance(event, MailFrom):
                self._drop_text()
                self._transaction = _Transaction()
                self._answer(self.gateway.policy.check_sender(event))
            elif isinstance(event, EndOfMessage):
                self._store()
            elif isinstance(event, AuthCredentials):
                self._authenticate(event)
            elif isinstance(event, StartTls):
                self._start_tls()
        if engine.buffered > _READ_PAUSE_BYTES and not self._paused_reading:
            self._update_reading()

    def _answer(self, reply: SmtpReply) -> None:
        self._write(self.engine.send(reply))
        if self._transaction.held and self.engine.state not in _TEXT_STATES:
            self._drop_text()  # the engine refused the text (bare LF, too big, RSET...)
        if self.engine.closed:
            self._close()

    def _finish_async(self, reply: SmtpReply) -> None:
        """The reply to a slow event: send it and go on reading (or end, if asked to)."""
        self._busy = False
        if self._lost or self.engine.closed:  # the session ended meanwhile
            return
        self._answer(reply)
        shutdown, self._shutdown_after_store = self._shutdown_after_store, None
        if shutdown is not None:
            self.shutdown(shutdown)
            return
        self._touch()
        self._update_reading()
        self._pump()

    def _update_reading(self) -> None:
        """Stop reading while the engine holds enough input that we cannot answer now."""
        waiting = self._busy or self._output_full
        pause = waiting and self.engine.buffered > _READ_PAUSE_BYTES
        if pause == self._paused_reading or self._lost:
            return
        self._paused_reading = pause
        if pause:
            self._transport().pauseProducing()
        else:
            self._transport().resumeProducing()

    # --- decisions --------------------------------------------------------------------

    def _recipient(self, event: RcptTo) -> SmtpReply:
        may_relay = self.gateway.policy.may_relay(
            self.client_ip, self.engine.authenticated_user is not None
        )
        try:
            decision = self.gateway.policy.decide_recipient(event.address, may_relay=may_relay)
        except Exception:
            # A broken lookup (aliases, passwd) must not cost the client more than a retry.
            _log.failure("smtp: recipient check failed for {client}", client=self.client_ip)
            return _reply(451, "4.3.0", "Temporary lookup failure, try again later")
        reply = decision.reply
        if reply.is_positive and decision.destination is not None:
            self._transaction.recipients.setdefault(event.address, decision.destination)
        return reply

    # --- message text -----------------------------------------------------------------

    def _keep_text(self, data: bytes) -> None:
        """Buffer a piece of text, if the gateway's budget has room for it."""
        transaction = self._transaction
        if transaction.over_budget:
            return
        text = transaction.text
        header = b"" if text is not None else self._received_header()
        size = len(header) + len(data)
        budget = self.gateway.text_budget
        if not budget.reserve(size):
            _log.warn(
                "smtp: {client}: message text thrown away: {used} of {limit} bytes of text "
                "already held in memory",
                client=self.client_ip,
                used=budget.used,
                limit=budget.limit,
            )
            self._drop_text()
            transaction.over_budget = True
            return
        transaction.held += size
        if text is None:
            text = transaction.text = io.BytesIO()
            text.write(header)
        text.write(data)

    def _drop_text(self) -> None:
        """Forget the current transaction's text and give its bytes back to the budget."""
        transaction = self._transaction
        if transaction.held:
            self.gateway.text_budget.release(transaction.held)
            transaction.held = 0
        if transaction.text is not None:
            transaction.text.close()
            transaction.text = None

    def _received_header(self) -> bytes:
        """The ``Received:`` header for the current transaction (its text not yet read)."""
        engine = self.engine
        recipients = self._transaction.recipients
        return received_header(
            helo=engine.helo_name,
            client_ip=self.client_ip,
            client_name=None,
            hostname=self.gateway.settings.hostname,
            protocol=engine.protocol_name,
            when=self.gateway.clock.seconds(),
            tls=self.tls_info,
            auth_user=engine.authenticated_user,
            recipient=next(iter(recipients)) if len(recipients) == 1 else None,
        )

    def _store(self) -> None:
        engine = self.engine
        mail = engine.mail
        queue = self.gateway.queue
        assert mail is not None and queue is not None
        transaction = self._transaction
        if transaction.text is None and not transaction.over_budget:
            self._keep_text(b"")  # an empty message: the header alone
        if transaction.over_budget or transaction.text is None:
            self.gateway.text_budget.refused += 1
            self._transaction = _Transaction()
            self._answer(_reply(452, "4.3.1", "Insufficient system storage"))
            return
        # getvalue() hands over the BytesIO's own buffer (no copy: nothing else refers
        # to it); the reservation moves with the text and is given back when the store
        # is done, since the spool holds the bytes until then.
        text = transaction.text.getvalue()
        transaction.text.close()
        held, transaction.held, transaction.text = transaction.held, 0, None
        self._transaction = _Transaction()
        now = self.gateway.clock.seconds()
        submitter = Submitter(
            protocol=engine.protocol_name,
            client_address=self.client_ip,
            client_name=None,
            helo=engine.helo_name,
            auth_user=engine.authenticated_user,
            tls=self.tls_info,
        )
        envelope = Envelope(
            return_path=mail.reverse_path,
            recipients=tuple(Recipient(a, d) for a, d in transaction.recipients.items()),
            arrival=now,
            submitter=submitter,
            body_type=mail.body,
            smtputf8=mail.smtputf8,
        )
        self._busy = True
        self._storing = True
        budget = self.gateway.text_budget

        def release(result: object) -> object:
            budget.release(held)
            return result

        d: Deferred[str] = queue.store(envelope, text)
        d.addBoth(release)
        d.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(envelope, len(text)),
        )

    def _stored(self, queue_id: str, envelope: Envelope, size: int) -> None:
        self._storing = False
        self.gateway.accepted += 1
        if self.gateway.log_stored:
            log_stored(queue_id, envelope, size)
        self._finish_async(_reply(250, "2.0.0", f"Ok: queued as {queue_id}"))

    def _store_failed(self, failure: Failure) -> None:
        self._storing = False
        _log.failure("smtp: cannot store message from {client}", failure, client=self.client_ip)
        if disk_full(failure.value):
            reply = _reply(452, "4.3.1", "Insufficient system storage")
        else:
            reply = _reply(451, "4.3.0", "Local error in processing, try again later")
        self._finish_async(reply)

    def _authenticate(self, event: AuthCredentials) -> None:
        self._busy = True
        if self.gateway.checker is None:  # the engine only offers AUTH with a checker
            self._finish_async(_reply(454, "4.7.0", "Temporary authentication failure"))
            return
        asked = self.gateway.auth_throttle.begin(self.client_ip)
        asked.addCallbacks(self._auth_verdict, self._auth_not_asked, callbackArgs=(event,))

    def _auth_not_asked(self, failure: Failure) -> None:
        """No verdict (a worker's link to the spool's process went): check nothing, 454."""
        _log.warn(
            "smtp: cannot check AUTH for {client}: {why}",
            client=self.client_ip,
            why=failure.getErrorMessage(),
        )
        self._finish_async(_reply(454, "4.7.0", "Temporary authentication failure"))

    def _auth_verdict(self, verdict: AuthVerdict, event: AuthCredentials) -> None:
        checker = self.gateway.checker
        throttle = self.gateway.auth_throttle
        client = self.client_ip
        user = escape(event.username)  # the client's bytes: never raw into the log
        assert checker is not None  # _authenticate asks only with one
        if self._lost:  # the client left while we asked: nothing to check
            if verdict.allowed:
                throttle.end(client, failed=False)
            return
        if not verdict.allowed:
            _log.info(
                "smtp: {client} refused AUTH {mechanism} for {user}: "
                "{failures} failures in {window:.0f}s, {pending} in progress",
                client=client,
                mechanism=event.mechanism,
                user=user,
                failures=verdict.failures,
                pending=verdict.pending,
                window=verdict.window,
            )
            self._answer_later(
                _reply(454, "4.7.0", "Too many failed authentications, try again later")
            )
            return
        if event.authzid and event.authzid != event.username:
            # RFC 4616: the server must refuse to act as another identity unless it is
            # allowed to; nobody here is.  Counted, so it is no free way to probe.
            throttle.end(client, failed=True)
            _log.info(
                "smtp: {client} failed AUTH {mechanism} for {user}: may not act as {authzid}",
                client=client,
                mechanism=event.mechanism,
                user=user,
                authzid=escape(event.authzid),
            )
            self._answer_later(_reply(535, "5.7.8", "Authentication credentials invalid"))
            return

        def checked(ok: bool) -> None:
            throttle.end(client, failed=not ok)
            if ok:
                _log.info("smtp: {client} authenticated as {user}", client=client, user=user)
                self._finish_async(_reply(235, "2.7.0", "Authentication successful"))
                return
            _log.info(
                "smtp: {client} failed AUTH {mechanism} for {user}",
                client=client,
                mechanism=event.mechanism,
                user=user,
            )
            self._answer_later(_reply(535, "5.7.8", "Authentication credentials invalid"))

        def unavailable(failure: Failure) -> None:
            throttle.end(client, failed=False)
            if not isinstance(failure.value, AuthUnavailable):  # that one is logged already
                _log.failure("smtp: AUTH check for {client} failed", failure, client=client)
            self._finish_async(_reply(454, "4.7.0", "Temporary authentication failure"))

        checker.check(event.username, event.password).addCallbacks(checked, unavailable)

    def _answer_later(self, reply: SmtpReply) -> None:
        """Send ``reply`` to an AUTH after the failure delay (guessing costs time)."""
        self._auth_timer = self.gateway.clock.callLater(
            self.gateway.timeouts.auth_failure_delay, self._finish_async, reply
        )

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

        One timer per session watches both limits, and it is lazy: armed once for the
        nearer of the idle limit and the session deadline, and when it fires it re-arms
        itself for whatever is left.  Resetting a timer on every read (or keeping a
        second one for the session) would cost reactor heap operations on the hot path.
        """
        clock = self.gateway.clock
        now = self._last_activity = clock.seconds()
        if self._idle_timer is None and not self._lost:
            wait = min(self.gateway.timeouts.idle, self._session_deadline - now)
            self._idle_timer = clock.callLater(max(wait, 0.0), self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._lost:
            return
        clock = self.gateway.clock
        now = clock.seconds()
        if now >= self._session_deadline:
            self._timeout("session")
            return
        if self._busy and self.engine.state is not ServerState.TLS:
            self._last_activity = now  # we are the slow one, not the client
        remaining = self._last_activity + self.gateway.timeouts.idle - now
        if remaining > 0:
            wait = min(remaining, self._session_deadline - now)
            self._idle_timer = clock.callLater(wait, self._idle_check)
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
        self._drop_text()
        self._release()  # the session is over: its slot is free before the client's FIN
        if not self._lost and self.transport is not None:
            if self._producing:  # a transport closes only once its producer is gone
                self._producing = False
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def _release(self) -> None:
        """Give the session's slot back to the limiter, once."""
        if self._counted:
            self._counted = False
            self.gateway.limiter.release(self.client_ip)
            self.gateway.limiter.sessions.discard(self)

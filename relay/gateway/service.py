"""The gateway as a twistd service: one listener per ``[smtp]`` endpoint string.

:func:`build_gateway` is the one builder of the gateway:
:func:`relay.gateway.build.build_smtp` calls it for the spool's process (``twistd relay``),
:mod:`relay.gateway.worker` for each worker process, and the benchmarks that measure a
gateway alone for theirs.  It reads everything from the configuration once (TLS files, the
policy's routes), so a bad certificate stops the relay at start.  The tree it returns is
a :class:`Gateway` named ``smtp`` holding:

* ``listen:<endpoint>`` — a ``StreamServerEndpointService`` per ``listen`` string
  (plain SMTP, with STARTTLS when a certificate is configured);
* ``listen_tls:<endpoint>`` — one per ``listen_tls`` string, the endpoint wrapped in
  TLS (``wrapServerTLS``): SMTP submission over implicit TLS;
* ``sessions`` — owns the password checker's threads and, on stop, ends open sessions
  with ``421 4.3.2`` so clients retry elsewhere instead of hanging (a session waiting for
  the spool gets the store's reply first), and waits for them to close.

It is an :class:`~relay.runtime.services.OrderedMultiService`: it stops the gateway
workers (``workers``, which :func:`~relay.gateway.build.build_smtp` attaches last)
first, then the listeners, then the sessions, each stop awaited; so the spool, which the
relay stops after the gateway, is still open while the stores in flight are answered.

In a gateway worker process (:mod:`relay.gateway.worker`) the listeners are
``adopted:<fd>`` services instead: sockets the spool's process bound and passed down
(:meth:`Gateway.shared_listeners` finds them), so both processes accept on the same ports.

All listeners share one :class:`~relay.gateway.protocol.SessionLimiter`, so
``max_sessions`` and ``max_sessions_per_client`` hold across them, one
:class:`~relay.gateway.limits.TextBudget` (``max_text_in_memory`` bytes of message text
in memory across all sessions) and one :class:`~relay.interfaces.IAuthThrottle`
(failed AUTH per client address): the relay's :class:`~relay.gateway.limits.AuthThrottle`
(:func:`build_auth_throttle`), which a worker asks over its link.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString, wrapServerTLS
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import POSTMASTER, Address, AddressError, parse_mailbox
from relay.config import Config
from relay.gateway.auth import PasswordChecker
from relay.gateway.limits import AuthThrottle, LocalAuthThrottle, TextBudget
from relay.gateway.protocol import (
    GatewayFactory,
    SessionLimiter,
    SessionTimeouts,
    SmtpServerProtocol,
)
from relay.gateway.tls import load_server_tls
from relay.interfaces import IAuthThrottle, ILocalRecipients, QueueSource
from relay.policy.acceptance import RelayPolicy
from relay.policy.routing import Router
from relay.runtime.services import OrderedMultiService, attach
from relay.sansio.smtp.server import Limits, ServerSettings
from relay.sansio.smtp.wire import SmtpReply

__all__ = [
    "AdoptedListener",
    "Gateway",
    "RecordingEndpoint",
    "SharedListener",
    "build_auth_throttle",
    "build_gateway",
    "settings_from_config",
]

_log = Logger()
_V = TypeVar("_V")

SESSIONS_STOP_LIMIT = 10.0  # seconds a stop waits for the sessions it ended to close


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """An endpoint that remembers the port it listens on (``tcp:0`` in tests, logs)."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen with the wrapped endpoint and keep the port."""

        def record(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        d: Deferred[IListeningPort] = self._endpoint.listen(protocolFactory)
        return d.addCallback(record)


@dataclass(frozen=True, slots=True)
class SharedListener:
    """A listening socket of this process that a gateway worker process may accept on."""

    fd: int
    family: int  # socket.AF_INET, AF_INET6 or AF_UNIX
    tls: bool  # implicit TLS (a ``listen_tls`` endpoint)
    port: Any = field(default=None, compare=False, repr=False)  # this process's port


class Gateway(OrderedMultiService):
    """The ``smtp`` service tree (see the module docstring), with what the spool's process
    shares with its gateway worker processes: the session count and the sockets."""

    def __init__(self, limiter: SessionLimiter) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName("smtp")  # type: ignore[no-untyped-call]
        self.limiter = limiter  # every listener's: the workers and the metrics read it

    def shared_listeners(self) -> list[SharedListener]:
        """The running gateway's listening sockets that a worker can adopt.

        Plain TCP and UNIX listeners qualify (``listen`` and ``listen_tls``: the worker
        wraps its own factory in TLS for the latter).  An ``ssl:`` endpoint does not: its
        TLS lives in the listening port itself, so only this process serves it.
        """
        found: list[SharedListener] = []
        for child in self:
            name = getattr(child, "name", "") or ""
            endpoint = getattr(child, "endpoint", None)
            port = getattr(endpoint, "port", None)
            if not name.startswith(("listen:", "listen_tls:")) or type(port) not in (
                tcp.Port,
                unix.Port,
            ):
                continue
            sock = port.socket  # type: ignore[union-attr]
            tls = name.startswith("listen_tls:")
            found.append(SharedListener(sock.fileno(), sock.family, tls, port))
        return found


class AdoptedListener(Service):
    """Accepts on a listening socket handed down by the spool's process.

    A worker must never take more connections at once than it has room for: Twisted's
    TCP port accepts up to its ``numberAccepts`` connections in one read, whatever
    happens to the first ones, so a worker that becomes full within a burst would answer
    the rest 421 although the spool's process (which takes over once the worker says it
    is full) has room.  So each read of the port is bounded by ``room()``, the sessions
    the worker may still open.
    """

    def __init__(
        self,
        reactor: Any,
        listener: SharedListener,
        factory: IProtocolFactory,
        room: Callable[[], int],
    ):
        self._reactor = reactor
        self._listener = listener
        self._factory = factory
        self._room = room
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Accept on the socket (Twisted duplicates the descriptor)."""
        super().startService()  # type: ignore[no-untyped-call]
        listener = self._listener
        port = self._reactor.adoptStreamPort(listener.fd, listener.family, self._factory)
        read = port.doRead

        def read_within_room() -> object:
            port.numberAccepts = max(1, self._room())  # tcp.Port's public batch size
            return read()

        port.doRead = read_within_room
        self.port = port

    def stopService(self) -> Deferred[None] | None:
        """Stop accepting; the spool's process (or another worker) goes on."""
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return None
        stopped: Deferred[None] | None = port.stopListening()
        return stopped


class _SessionsService(Service):
    """Starts the password checker; at stop, ends the sessions still open."""

    def __init__(
        self,
        limiter: SessionLimiter,
        checker: PasswordChecker | None,
        hostname: str,
        clock: IReactorTime,
    ):
        self.limiter = limiter  # the sessions to end at stop (every listener's)
        self._checker = checker
        self._hostname = hostname
        self._clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._checker is not None:
            self._checker.start()

    def stopService(self) -> Deferred[None]:
        """421 to the sessions; fire once they have closed (at most ``SESSIONS_STOP_LIMIT``).

        Waiting keeps the spool open (it stops after this) until a store in flight has
        been answered and that answer has left: the client must learn its message was kept.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        reply = SmtpReply(421, "4.3.2", (f"{self._hostname} Service shutting down",))
        ending: list[SmtpServerProtocol] = []
        for session in list(self.limiter.sessions):
            # One waiting for the spool gets the store's real answer first (if the spool
            # answers in time), then this one; shutdown() sees to the order.
            if session.storing or not session.busy:
                session.shutdown(reply)
                ending.append(session)
        if self._checker is not None:
            self._checker.stop()
        return ensureDeferred(self._until_closed(ending))

    async def _until_closed(self, sessions: list[SmtpServerProtocol]) -> None:
        deadline = self._clock.seconds() + SESSIONS_STOP_LIMIT
        while not all(s.closed for s in sessions):
            if self._clock.seconds() >= deadline:
                return
            await deferLater(self._clock, 0.05, lambda: None)


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``serverFromString``, which Twisted leaves unannotated."""
    endpoint: IStreamServerEndpoint = serverFromString(  # type: ignore[no-untyped-call]
        reactor, description
    )
    return endpoint


def _listener(endpoint: IStreamServerEndpoint, factory: GatewayFactory) -> IService:
    """A service that listens on ``endpoint`` while it runs."""
    service = StreamServerEndpointService(endpoint, factory)  # type: ignore[no-untyped-call]
    # A relay that cannot bind its SMTP port must not run deaf: like the services that
    # twisted.application.strports.service() makes, fail startup when listen() fails, so
    # twistd exits with "Couldn't listen" instead of logging it and carrying on.
    service._raiseSynchronously = True
    listener: IService = service
    return listener


def settings_from_config(config: Config, *, tls_active: bool) -> ServerSettings:
    """The engine's settings for one listener (implicit TLS or not).

    The domain-less ``RCPT TO:<postmaster>`` means ``postmaster@`` the first local domain,
    which every local domain has (:data:`relay.address.POSTMASTER`), so it is accepted from any
    client even when ``[relay] postmaster`` is remote; without local domains it is
    ``[relay] postmaster`` itself.
    """
    smtp = config.smtp
    domains = config.relay.local_domains
    try:
        postmaster = (
            Address(POSTMASTER, domains[0]) if domains else parse_mailbox(config.relay.postmaster)
        )
    except AddressError:
        postmaster = None
    return ServerSettings(
        hostname=config.relay.hostname,
        limits=Limits(
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
        ),
        tls_available=smtp.tls_cert_file is not None and smtp.tls_key_file is not None,
        tls_active=tls_active,
        auth_available=smtp.auth_users_file is not None,
        auth_requires_tls=smtp.auth_requires_tls,
        postmaster=postmaster,
    )


def _given(value: _V | None, configured: _V) -> _V:
    """An explicit argument, else the configuration's value."""
    return configured if value is None else value


def build_auth_throttle(
    config: Config,
    clock: IReactorTime,
    *,
    max_failures: int | None = None,
    window: float | None = None,
) -> AuthThrottle:
    """The relay's failed-AUTH count, from ``[smtp]`` unless given (one per relay: the
    spool's process holds it, and its gateway workers ask it)."""
    return AuthThrottle(
        clock,
        max_failures=_given(max_failures, config.smtp.auth_max_failures),
        window=_given(window, config.smtp.auth_failure_window),
    )


def build_gateway(
    config: Config,
    queue: QueueSource,
    local_recipients: ILocalRecipients,
    reactor: Any,
    *,
    greet_delay: float | None = None,
    max_text_in_memory: int | None = None,
    auth_max_failures: int | None = None,
    auth_failure_window: float | None = None,
    router: Router | None = None,
    processes: int = 1,
    adopted: Sequence[SharedListener] | None = None,
    auth_throttle: IAuthThrottle | None = None,
) -> Gateway:
    """The SMTP gateway's services for ``config``.

    ``queue`` is the store, once open (a worker's is its link to the spool's process,
    open from the start): until it is, connections are answered ``421 4.3.2``.
    ``reactor`` provides TCP, threads and time.
    ``greet_delay`` holds the greeting back to catch clients that talk first.
    ``max_text_in_memory`` bounds the message text all sessions hold at once (past it:
    ``452 4.3.1``); a client with ``auth_max_failures`` failed AUTH within
    ``auth_failure_window`` seconds gets ``454 4.7.0`` to AUTH until they age out.
    Each of these comes from ``[smtp]`` unless given here (tests give them).
    ``auth_throttle`` is where sessions count AUTH attempts; by default a count of this
    gateway's own (``build_smtp`` passes the relay's, a worker its link's).

    ``processes`` is how many processes share the listeners (this one and the gateway
    workers): each takes that share of ``max_sessions`` and ``max_text_in_memory``, so
    the totals hold.  A worker passes ``adopted``, the listening sockets it was handed,
    instead of listening on the configured endpoints, and leaves the "stored" log line
    to the spool's process.  Whoever needs the session count (a worker reporting its
    room, the spool's process balancing its workers) listens to the returned
    gateway's ``limiter``.
    """
    smtp = config.smtp
    tls_options: CertificateOptions | None = None
    if smtp.tls_cert_file is not None and smtp.tls_key_file is not None:
        tls_options = load_server_tls(smtp.tls_cert_file, smtp.tls_key_file)
    checker = PasswordChecker(smtp.auth_users_file, reactor) if smtp.auth_users_file else None
    limiter = SessionLimiter(max(1, smtp.max_sessions // processes), smtp.max_sessions_per_client)
    text_budget = TextBudget(
        max(1, _given(max_text_in_memory, smtp.max_text_in_memory) // processes)
    )
    if auth_throttle is None:
        auth_throttle = LocalAuthThrottle(
            build_auth_throttle(
                config, reactor, max_failures=auth_max_failures, window=auth_failure_window
            )
        )
    policy = RelayPolicy(config, local_recipients, router)
    timeouts = SessionTimeouts(
        idle=smtp.idle_timeout,
        session=smtp.session_timeout,
        greet_delay=_given(greet_delay, smtp.greet_delay),
    )

    def factory(tls_active: bool) -> GatewayFactory:
        return GatewayFactory(
            settings=settings_from_config(config, tls_active=tls_active),
            policy=policy,
            queue=queue,
            clock=reactor,
            limiter=limiter,
            timeouts=timeouts,
            tls_options=tls_options,
            checker=checker,
            text_budget=text_budget,
            auth_throttle=auth_throttle,
            log_stored=adopted is None,
        )

    top = Gateway(limiter)
    attach(_SessionsService(limiter, checker, config.relay.hostname, reactor), top, "sessions")
    if adopted is not None:
        for shared in adopted:
            made: IProtocolFactory = factory(shared.tls)
            if shared.tls:
                assert tls_options is not None  # the configuration requires a certificate
                made = TLSMemoryBIOFactory(tls_options, False, made)
            attach(
                AdoptedListener(reactor, shared, made, limiter.room), top, f"adopted:{shared.fd}"
            )
    else:
        _listen_on_configured_endpoints(top, config, reactor, factory, tls_options)

    def failed(failure: Failure) -> None:
        _log.failure("smtp: the spool did not open; refusing mail with 421", failure)

    queue.when_ready().addErrback(failed)
    return top


def _listen_on_configured_endpoints(
    top: Gateway,
    config: Config,
    reactor: Any,
    factory: Callable[[bool], GatewayFactory],
    tls_options: CertificateOptions | None,
) -> None:
    """A listener per ``[smtp] listen`` and ``listen_tls`` endpoint (the spool's process)."""
    smtp = config.smtp
    for description in smtp.listen:
        endpoint = RecordingEndpoint(_endpoint(reactor, description))
        attach(_listener(endpoint, factory(False)), top, f"listen:{description}")
    for description in smtp.listen_tls:
        assert tls_options is not None  # the configuration requires a certificate
        wrapped = wrapServerTLS(tls_options, _endpoint(reactor, description))
        listener = _listener(RecordingEndpoint(wrapped), factory(True))
        attach(listener, top, f"listen_tls:{description}")

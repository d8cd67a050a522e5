"""The gateway as a twistd service: one listener per ``[smtp]`` endpoint string.

:func:`build_gateway` is what ``relay.tap`` calls.  It reads everything from the
configuration once (TLS files, the policy's routes), so a bad certificate stops the
relay at start.  The tree it returns is a ``MultiService`` named ``smtp`` holding:

* ``listen:<endpoint>`` — a ``StreamServerEndpointService`` per ``listen`` string
  (plain SMTP, with STARTTLS when a certificate is configured);
* ``listen_tls:<endpoint>`` — one per ``listen_tls`` string, the endpoint wrapped in
  TLS (``wrapServerTLS``): SMTP submission over implicit TLS;
* ``sessions`` — owns the password checker's threads and, on stop, ends open sessions
  with ``421 4.3.2`` so clients retry elsewhere instead of hanging (a session waiting for
  the spool gets the store's reply first).

All listeners share one :class:`~relay.gateway.protocol.SessionLimiter`, so
``max_sessions`` and ``max_sessions_per_client`` hold across them, one
:class:`~relay.gateway.limits.TextBudget` (``max_text_in_memory`` bytes of message text
in memory across all sessions) and one :class:`~relay.gateway.limits.AuthThrottle`
(failed AUTH per client address).
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString, wrapServerTLS
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import AddressError, parse_mailbox
from relay.config import Config
from relay.gateway.auth import PasswordChecker
from relay.gateway.limits import AuthThrottle, TextBudget
from relay.gateway.policy import RelayPolicy
from relay.gateway.protocol import GatewayFactory, SessionLimiter, Timeouts
from relay.gateway.tls import load_server_tls
from relay.interfaces import ILocalRecipients, IQueue
from relay.policy.routing import Router
from relay.sansio.smtp.server import Limits, ServerSettings
from relay.sansio.smtp.wire import SmtpReply
from relay.services import attach, named_multiservice

__all__ = ["RecordingEndpoint", "build_gateway", "settings_from_config"]

_log = Logger()
_V = TypeVar("_V")


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


class _SessionsService(Service):
    """Starts the password checker; at stop, ends the sessions still open."""

    def __init__(self, limiter: SessionLimiter, checker: PasswordChecker | None, hostname: str):
        self._limiter = limiter
        self._checker = checker
        self._hostname = hostname

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._checker is not None:
            self._checker.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        reply = SmtpReply(421, "4.3.2", (f"{self._hostname} Service shutting down",))
        for session in list(self._limiter.sessions):
            # One waiting for the spool gets the store's real answer first (if the spool
            # answers in time), then this one; shutdown() sees to the order.
            if session.storing or not session.busy:
                session.shutdown(reply)
        if self._checker is not None:
            self._checker.stop()


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
    """The engine's settings for one listener (implicit TLS or not)."""
    smtp = config.smtp
    try:
        postmaster = parse_mailbox(config.relay.postmaster)
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


def build_gateway(
    config: Config,
    queue: IQueue | Deferred[IQueue],
    local_recipients: ILocalRecipients,
    reactor: Any,
    *,
    greet_delay: float | None = None,
    max_text_in_memory: int | None = None,
    auth_max_failures: int | None = None,
    auth_failure_window: float | None = None,
    router: Router | None = None,
) -> IService:
    """The SMTP gateway's services for ``config``.

    ``queue`` may be a Deferred (the spool service's ``when_ready()``): until it fires,
    connections are answered ``421 4.3.2``.  ``reactor`` provides TCP, threads and time.
    ``greet_delay`` holds the greeting back to catch clients that talk first.
    ``max_text_in_memory`` bounds the message text all sessions hold at once (past it:
    ``452 4.3.1``); a client with ``auth_max_failures`` failed AUTH within
    ``auth_failure_window`` seconds gets ``454 4.7.0`` to AUTH until they age out.
    Each of these comes from ``[smtp]`` unless given here (tests give them).
    """
    smtp = config.smtp
    tls_options: CertificateOptions | None = None
    if smtp.tls_cert_file is not None and smtp.tls_key_file is not None:
        tls_options = load_server_tls(smtp.tls_cert_file, smtp.tls_key_file)
    checker = PasswordChecker(smtp.auth_users_file, reactor) if smtp.auth_users_file else None
    limiter = SessionLimiter(smtp.max_sessions, smtp.max_sessions_per_client)
    text_budget = TextBudget(_given(max_text_in_memory, smtp.max_text_in_memory))
    auth_throttle = AuthThrottle(
        reactor,
        max_failures=_given(auth_max_failures, smtp.auth_max_failures),
        window=_given(auth_failure_window, smtp.auth_failure_window),
    )
    policy = RelayPolicy(config, local_recipients, router)
    timeouts = Timeouts(
        idle=smtp.idle_timeout,
        session=smtp.session_timeout,
        greet_delay=_given(greet_delay, smtp.greet_delay),
    )
    factories: list[GatewayFactory] = []

    def factory(tls_active: bool) -> GatewayFactory:
        made = GatewayFactory(
            settings=settings_from_config(config, tls_active=tls_active),
            policy=policy,
            queue=None if isinstance(queue, Deferred) else queue,
            clock=reactor,
            limiter=limiter,
            timeouts=timeouts,
            tls_options=tls_options,
            checker=checker,
            text_budget=text_budget,
            auth_throttle=auth_throttle,
        )
        factories.append(made)
        return made

    top: MultiService = named_multiservice("smtp")
    attach(_SessionsService(limiter, checker, config.relay.hostname), top, "sessions")
    for description in smtp.listen:
        endpoint = RecordingEndpoint(_endpoint(reactor, description))
        attach(_listener(endpoint, factory(tls_active=False)), top, f"listen:{description}")
    for description in smtp.listen_tls:
        assert tls_options is not None  # the configuration requires a certificate
        wrapped = wrapServerTLS(tls_options, _endpoint(reactor, description))
        listener = _listener(RecordingEndpoint(wrapped), factory(tls_active=True))
        attach(listener, top, f"listen_tls:{description}")
    if isinstance(queue, Deferred):

        def ready(opened: IQueue) -> IQueue:
            for made in factories:
                made.queue = opened
            return opened

        def failed(failure: Failure) -> None:
            _log.failure("smtp: the spool did not open; refusing mail with 421", failure)

        queue.addCallbacks(ready, failed)
    return top

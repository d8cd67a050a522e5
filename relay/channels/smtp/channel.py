"""The SMTP channel: mail to the Internet (by MX) or to a route's smarthost.

:class:`SmtpChannel` is the ``IChannel`` (name ``"smtp"``, address-then-text mode).  Its
parts, one job each:

* :mod:`relay.dns.mx` — MX and address lookups (twisted.names);
* :mod:`.connect` — which hosts and addresses to try, in what order, until one works;
* :mod:`.handshake` — greeting, EHLO, STARTTLS, AUTH;
* :mod:`.protocol` over :mod:`relay.sansio.smtp.client` — the SMTP dialogue itself;
* :mod:`.session` — the MMDF calls mapped onto that dialogue;
* :mod:`.route_settings` and :mod:`.tls` — per-route TLS and credentials.

**Connection reuse.**  When a session ends with its connection healthy and between
transactions, the connection waits in a cache keyed by destination, for
:attr:`ReplyTimeouts.idle` seconds (``[smtp_client] connection_cache_time``, 2 s like
Postfix's ``smtp_connection_cache_time``; 0 turns the cache off), and the next
``open_session`` for that destination takes it instead of connecting again (after an
RSET, which also proves the server is still there: Postfix's connection cache does the
same).  A connection carries at most ``max_messages`` messages (100 by default), then
the next message opens a new one, so that a long queue to one host cannot keep a single
connection (and a single server process) busy forever.

**Settings.**  :func:`build_smtp_channel` takes the timeouts, the cache time, the message
cap, the name servers and the CA file from ``[smtp_client]``, and gives the channel the
configuration's router, with which a session tells which recipients of a message travel
in its transaction (for SMTPUTF8: :mod:`.smtputf8`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from relay.address import Address
from relay.channels.smtp.connect import Connector, parse_destination
from relay.channels.smtp.protocol import ReplyTimeouts, SmtpClientError, SmtpClientProtocol
from relay.channels.smtp.route_settings import RoutePolicies
from relay.channels.smtp.session import SmtpSession
from relay.channels.smtp.tls import TlsContexts
from relay.config import Config, SmtpClientSection
from relay.dns.mx import MxResolver, make_resolver
from relay.envelope import Destination, Recipient
from relay.errors import SessionFailed
from relay.interfaces import IChannel, IChannelSession, SequencingMode
from relay.policy.routing import NoRoute, Router
from relay.reply import Reply, ReplyCode
from relay.sansio.smtp.client import Rset
from relay.sansio.smtp.wire import MAX_TEXT_LINE

__all__ = ["SmtpChannel", "build_smtp_channel", "timeouts_from"]

DEFAULT_MAX_MESSAGES = SmtpClientSection().max_messages_per_connection


@dataclass
class _Idle:
    """A cached connection and its idle timer."""

    conn: SmtpClientProtocol
    timer: IDelayedCall


@implementer(IChannel)
class SmtpChannel:
    """Delivers mail by SMTP.  See the module docstring.

    ``reactor`` provides IReactorTCP and IReactorTime (tests: the real reactor, or a
    ``MemoryReactorClock``); ``port`` is the port for MX delivery and address literals
    (25; tests point it at their own servers); ``ca_file`` replaces the system trust
    store for ``tls = "required"`` routes; ``route`` gives an address's destination (the
    configuration's router; without one, a recipient the queue has not routed yet counts
    as travelling in every transaction of its message); text lines longer than
    ``line_length_limit`` octets are broken with ``CRLF SP`` as Postfix does (0: never).
    """

    name = "smtp"
    mode = SequencingMode.ADDRESS_THEN_TEXT
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        mx: MxResolver,
        helo_name: str,
        *,
        policies: RoutePolicies | None = None,
        port: int = 25,
        ca_file: Path | None = None,
        timeouts: ReplyTimeouts | None = None,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        route: Callable[[Address], Destination] | None = None,
        line_length_limit: int = MAX_TEXT_LINE,
    ) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self._route = route
        self.timeouts = timeouts or ReplyTimeouts()
        self._clock = reactor
        self._policies = policies or RoutePolicies()
        self._port = port
        self._connector = Connector(
            reactor,
            mx,
            helo_name=helo_name,
            timeouts=self.timeouts,
            tls=TlsContexts(ca_file),
            line_length_limit=line_length_limit,
        )
        self._idle: dict[str, list[_Idle]] = {}
        self.connections_opened = 0
        self.connections_reused = 0

    # --- IChannel -----------------------------------------------------------------------

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: a session on a cached connection, or on a new one.

        Fails with :class:`SessionFailed` when no host of the destination can be reached
        (the reply says why: ``DHST``, ``TIME``, ``NS``, or a permanent DNS answer).
        """
        return defer.ensureDeferred(self._open(destination))

    async def _open(self, destination: Destination) -> IChannelSession:
        conn = await self._reuse(destination.host)
        if conn is None:
            conn = await self.connect(destination)
        return SmtpSession(self, destination, conn)

    def travels_to(self, recipient: Recipient, destination: Destination) -> bool:
        """Whether ``recipient`` goes to ``destination``, so may travel in its transaction.

        Its destination as queued, else as the router says: the deliverer's own rule.  A
        recipient that cannot be routed goes nowhere; without a router, one not routed yet
        may go anywhere.
        """
        where = recipient.destination
        if where is None and self._route is not None:
            try:
                where = self._route(recipient.address)
            except NoRoute:
                return False
        return where is None or where == destination

    # --- connections --------------------------------------------------------------------

    async def connect(self, destination: Destination) -> SmtpClientProtocol:
        """A new connection, ready for MAIL; raises SessionFailed."""
        try:
            target = parse_destination(destination.host, self._port)
        except ValueError as e:
            raise SessionFailed(
                Reply(ReplyCode.NDEL, f"bad SMTP destination: {e}", enhanced="5.1.2")
            ) from None
        policy = self._policies.for_destination(destination.host)
        conn = await self._connector.connect(target, policy)
        self.connections_opened += 1
        return conn

    def park(self, destination: Destination, conn: SmtpClientProtocol) -> None:
        """Keep ``conn`` for the next session to ``destination`` (or close it)."""
        if not conn.ready or conn.messages >= self.max_messages or self.timeouts.idle <= 0:
            conn.quit()
            return
        entry = _Idle(
            conn, self._clock.callLater(self.timeouts.idle, self._expire, destination.host, conn)
        )
        self._idle.setdefault(destination.host, []).append(entry)
        conn.on_lost(_forget(self._idle, destination.host, conn))

    async def _reuse(self, host: str) -> SmtpClientProtocol | None:
        """A cached connection that still answers RSET, or None."""
        while True:
            entry = self._take(host)
            if entry is None:
                return None
            conn = entry.conn
            if not conn.ready:
                conn.quit()
                continue
            try:
                reply = await conn.command(Rset())
            except SmtpClientError:
                continue
            if reply.code // 100 == 2 and conn.ready:
                self.connections_reused += 1
                return conn
            conn.quit()

    def _take(self, host: str) -> _Idle | None:
        entries = self._idle.get(host)
        if not entries:
            return None
        entry = entries.pop()
        if not entries:
            del self._idle[host]
        if entry.timer.active():
            entry.timer.cancel()
        return entry

    def _expire(self, host: str, conn: SmtpClientProtocol) -> None:
        entries = self._idle.get(host, [])
        for entry in entries:
            if entry.conn is conn:
                entries.remove(entry)
                break
        if not entries:
            self._idle.pop(host, None)
        conn.quit()

    def idle_connections(self, host: str | None = None) -> int:
        """How many connections wait in the cache (for ``host``, or in all)."""
        if host is not None:
            return len(self._idle.get(host, []))
        return sum(len(v) for v in self._idle.values())

    def close_idle(self) -> Deferred[None]:
        """QUIT every cached connection (the service is stopping); fires when all closed."""
        closing = []
        for host in list(self._idle):
            while (entry := self._take(host)) is not None:
                closing.append(entry.conn.quit())
        return defer.gatherResults(closing).addCallback(lambda _: None)


def _forget(
    idle: dict[str, list[_Idle]], host: str, conn: SmtpClientProtocol
) -> Callable[[], None]:
    """A callback that drops ``conn`` from the cache when it closes while waiting there."""

    def forget() -> None:
        entries = idle.get(host, [])
        for entry in entries:
            if entry.conn is conn:
                entries.remove(entry)
                if entry.timer.active():
                    entry.timer.cancel()
                break
        if not entries:
            idle.pop(host, None)

    return forget


def build_smtp_channel(
    config: Config,
    reactor: Any,
    resolver: Any = None,
    rng: random.Random | None = None,
    **options: Any,
) -> SmtpChannel:
    """The SMTP channel for ``config`` (for :mod:`relay.tap`).

    EHLO uses ``[relay] hostname`` (also the name MX loops are detected by); TLS policy
    and credentials come from the SMTP ``[[route]]`` tables; timeouts, connection cache
    time, message cap, CA file and line length limit from ``[smtp_client]``.
    ``resolver`` defaults to a twisted.names client over ``[smtp_client] dns_servers``
    (if empty, the servers of ``/etc/resolv.conf``).  ``options`` go to
    :class:`SmtpChannel` (``port``, ``ca_file``, ``timeouts``, ``max_messages``,
    ``route``, ``line_length_limit``) and win over the configuration: tests and
    benchmarks use them.
    """
    client = config.smtp_client
    if resolver is None:
        resolver = make_resolver(reactor, client.dns_servers or None)
    mx = MxResolver(resolver, rng, local_names=(config.relay.hostname,))
    settings: dict[str, Any] = {
        "ca_file": client.ca_file,
        "timeouts": timeouts_from(client),
        "max_messages": client.max_messages_per_connection,
        "line_length_limit": client.line_length_limit,
        "route": Router(config).route,
    }
    settings.update(options)
    return SmtpChannel(
        reactor,
        mx,
        config.relay.hostname,
        policies=RoutePolicies(config.routes),
        **settings,
    )


def timeouts_from(client: SmtpClientSection) -> ReplyTimeouts:
    """The channel's :class:`ReplyTimeouts` for ``[smtp_client]`` (the rest keep their defaults)."""
    return ReplyTimeouts(
        connect=client.connect_timeout,
        greeting=client.greeting_timeout,
        helo=client.helo_timeout,
        mail=client.mail_timeout,
        rcpt=client.rcpt_timeout,
        data=client.data_timeout,
        data_block=client.data_block_timeout,
        data_done=client.data_done_timeout,
        idle=client.connection_cache_time,
    )

"""Finding a server that takes the mail: MX hosts, their addresses, one after the other.

:func:`parse_destination` reads the destination key routing made
(:mod:`relay.policy.routing`):

==============================  =========================================  ==============
key                             means                                      port
==============================  =========================================  ==============
``example.test``                MX lookup of the domain                    the channel's
``[192.0.2.1]``                 an address literal: that address, no DNS   the channel's
``[IPv6:2001:db8::1]``          the same, IPv6                             the channel's
``[mail.example.test]:587``     that host's A/AAAA, no MX lookup (Postfix)  587
``mail.example.test:587``       MX lookup of the smarthost name            587
``[192.0.2.1]:2526``            that address                               2526
==============================  =========================================  ==============

"The channel's" port is 25, or what the channel was built with (tests use it to run
several "MX hosts" on 127.0.0.1).

:class:`Connector` then tries each host in MX order and each of its addresses in turn
(A, then AAAA).  A refused or timed-out connection, a 4xx/5xx greeting, a failed
EHLO/STARTTLS/AUTH (:mod:`.handshake`) all move on to the next address; the first
address that gets all the way to "ready for MAIL" wins.  When every one failed, the
session fails with :class:`relay.errors.SessionFailed` carrying the last reason
(``DHST``, ``TIME``, ``NS``…), so the deliverer defers the recipients and marks the
destination dead.  DNS answers that say there is nothing to try at all (NXDOMAIN, null
MX, MX hosts without any address) fail the session with a permanent reply instead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.channels.smtp.handshake import AttemptFailed, handshake
from relay.channels.smtp.protocol import ReplyTimeouts, SmtpClientProtocol
from relay.channels.smtp.route_settings import RoutePolicy
from relay.channels.smtp.tls import TlsContexts
from relay.config import TlsPolicy
from relay.dns.mx import DnsError, MailHost, MxResolver
from relay.errors import SessionFailed
from relay.oneline import escape
from relay.reply import Reply, ReplyCode
from relay.sansio.smtp.wire import MAX_TEXT_LINE

__all__ = ["Connector", "Target", "parse_destination"]

_log = Logger()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a destination key says to go: a domain to look up by MX, or one host."""

    name: str  # the domain (MX lookup) or the host (name or IP address)
    port: int
    mx_lookup: bool


def parse_destination(host: str, default_port: int = 25) -> Target:
    """Read a destination key (see the module docstring); ValueError if it is not one."""
    text = host.strip()
    if not text:
        raise ValueError("empty destination")
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or not inner:
            raise ValueError(f"unbalanced brackets in destination {host!r}")
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        port = _port(rest[1:], host) if rest.startswith(":") else default_port
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ] in destination {host!r}")
        return Target(inner.lower(), port, mx_lookup=False)
    if ":" in text:
        name, _, port_text = text.rpartition(":")
        return Target(name.lower(), _port(port_text, host), mx_lookup=True)
    return Target(text.lower(), default_port, mx_lookup=True)


def _port(text: str, host: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in destination {host!r}")
    return int(text)


class Connector:
    """Opens a session-ready connection to a destination.  See the module docstring."""

    def __init__(
        self,
        reactor: Any,
        mx: MxResolver,
        *,
        helo_name: str,
        timeouts: ReplyTimeouts,
        tls: TlsContexts,
        line_length_limit: int = MAX_TEXT_LINE,
    ) -> None:
        self._reactor = reactor
        self._line_length_limit = line_length_limit
        self._clock: IReactorTime = reactor
        self._mx = mx
        self._helo_name = helo_name
        self._timeouts = timeouts
        self._tls = tls

    async def connect(self, target: Target, policy: RoutePolicy) -> SmtpClientProtocol:
        """The first address that gets to "ready for MAIL"; SessionFailed if none does."""
        hosts = await self._hosts(target)
        last: Reply | None = None
        for host in hosts:
            try:
                addresses = await self._mx.addresses(host.name)
            except DnsError as e:
                last = e.reply
                continue
            if not addresses:
                _log.info("{host}: no address", host=escape(host.name))
                continue
            for address in addresses:
                try:
                    return await self._attempt(host, address, target.port, policy)
                except AttemptFailed as e:
                    _log.info("{reason}", reason=escape(e.reply.description))
                    last = e.reply
        if last is None:
            what = "MX host" if any(not h.implicit for h in hosts) else "host"
            names = ", ".join(h.name for h in hosts)
            last = Reply(
                ReplyCode.NDEL,
                f"no address found for {what} {names}",
                smtp_code=550,
                enhanced="5.4.4",
            )
        raise SessionFailed(last)

    async def _hosts(self, target: Target) -> list[MailHost]:
        if not target.mx_lookup:
            return [MailHost(target.name, 0, implicit=True)]
        try:
            return await self._mx.mail_hosts(target.name)
        except DnsError as e:
            raise SessionFailed(e.reply) from None

    async def _attempt(
        self, host: MailHost, address: str, port: int, policy: RoutePolicy
    ) -> SmtpClientProtocol:
        """One address: connect and hand-shake; on a failed opportunistic TLS, once more."""
        try:
            return await self._attempt_once(host, address, port, policy)
        except AttemptFailed as e:
            if not (e.tls_handshake and policy.tls is TlsPolicy.OPPORTUNISTIC):
                raise
            _log.info("{reason}; trying again without TLS", reason=escape(e.reply.description))
            plain = RoutePolicy(TlsPolicy.NONE, policy.credentials)
            return await self._attempt_once(host, address, port, plain)

    async def _attempt_once(
        self, host: MailHost, address: str, port: int, policy: RoutePolicy
    ) -> SmtpClientProtocol:
        peer = _peer(host.name, address, port)
        proto = SmtpClientProtocol(
            self._clock, self._timeouts, peer, line_length_limit=self._line_length_limit
        )
        endpoint_class = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = endpoint_class(self._reactor, address, port, timeout=self._timeouts.connect)
        connecting: Deferred[Any] = connectProtocol(endpoint, proto)  # type: ignore[no-untyped-call]
        connecting.addTimeout(self._timeouts.connect, self._clock)
        try:
            await connecting
        except (
            error.TimeoutError,
            defer.TimeoutError,
            defer.CancelledError,
            error.ConnectingCancelledError,  # our own timeout cancelled the attempt
        ):
            raise AttemptFailed(
                Reply(ReplyCode.TIME, f"connect to {peer}: Connection timed out")
            ) from None
        except error.ConnectionRefusedError:
            raise AttemptFailed(
                Reply(ReplyCode.DHST, f"connect to {peer}: Connection refused")
            ) from None
        except error.ConnectError as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise AttemptFailed(Reply(ReplyCode.DHST, f"connect to {peer}: {why}")) from None
        try:
            await handshake(
                proto,
                helo_name=self._helo_name,
                policy=policy,
                tls=self._tls,
                server_name=host.name,
            )
        except AttemptFailed:
            proto.quit()
            raise
        return proto


def _peer(name: str, address: str, port: int) -> str:
    """``mx1.example.test[192.0.2.1]:25``, as Postfix writes a peer."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"{name}[{address}]:{port}"
    return f"[{address}]:{port}"

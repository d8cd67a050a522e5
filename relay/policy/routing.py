"""Where a recipient goes: from an address and the configuration to a Destination.

The rules, in order (SPEC.md, "The configuration's shape"):

1. A domain in ``[relay] local_domains`` goes to the local channel:
   ``Destination("local", "")``.  So does an address literal of a loopback address
   (``user@[127.0.0.1]``): that is this host by definition, and sending it out by SMTP
   would only loop back here.
2. Otherwise the first ``[[route]]`` whose pattern matches wins (``partner.test`` matches
   exactly that domain, ``*.partner.test`` the domains below it).  Its destination key
   is the smarthost (``str(Smarthost)``, e.g. ``"[192.0.2.1]:25"``) for an SMTP route with
   one, the recipient's domain (to be looked up by MX) for an SMTP route without, the
   site's name for a phone route, and ``""`` for a local route.
3. Everything else goes by SMTP to its domain's MX: ``Destination("smtp", domain)``;
   an address literal goes to the literal itself, which the SMTP channel connects to
   without DNS.

An address that cannot be routed raises :class:`NoRoute` carrying the permanent reply
it fails with, so the sender learns why: a route naming a channel this relay does not
run, a phone route whose site is not configured, an address literal that names no host
(``[0.0.0.0]``, a multicast or reserved address).

**Routing tricks.**  ``user%other@here``, ``other!user@here``, ``"user@other"@here`` and
source routes are legal syntax that once asked a relay to forward mail onward.  We never
honour them for a local domain: routing looks at the domain alone, so such an address
goes to the local channel with its whole local part, and the local channel refuses it as
an unknown user (or delivers it, if an operator really has a user by that name).  For
other domains the trick is the next hop's business, and the address is routed by its
domain like any other; the gateway decides whether to accept it at all.

Routing is pure: the :class:`Router` compiles the routes once from a configuration and
then answers from memory, without DNS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from relay.address import Address
from relay.config import Channel, Config, Route
from relay.envelope import Destination
from relay.errors import RelayError
from relay.reply import Reply, ReplyCode

__all__ = ["LOCAL", "NoRoute", "Router", "route_recipient"]

LOCAL: Final = Destination("local", "")
"""The one destination of the local channel."""

_BAD_DESTINATION: Final = "5.1.2"  # RFC 3463: bad destination system address
_MISCONFIGURED: Final = "5.3.5"  # RFC 3463: system incorrectly configured


class NoRoute(RelayError):
    """An address that cannot be routed; ``reply`` is the permanent failure it gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.description)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    """A route with its destination worked out once.

    ``destination`` is None for an SMTP route without a smarthost, whose key is the
    recipient's own domain; ``failure`` is set for a route that can never deliver.
    """

    route: Route
    destination: Destination | None
    failure: Reply | None


class Router:
    """Routes addresses by one configuration; build one per configuration and reuse it.

    ``channels`` names the channels this relay runs; a route (or the default SMTP route)
    to a channel outside it is a :class:`NoRoute`.  None means every channel the
    configuration can name.
    """

    def __init__(self, config: Config, channels: Collection[str] | None = None) -> None:
        self._channels = frozenset(c.value for c in Channel) if channels is None else channels
        self._local_domains = frozenset(config.relay.local_domains)
        self._sites = frozenset(config.phone.sites)
        self._routes = tuple(self._compile(route) for route in config.routes)

    @property
    def channels(self) -> frozenset[str]:
        """The channels this router sends mail to (the ones that run)."""
        return frozenset(self._channels)

    def route(self, address: Address) -> Destination:
        """The destination of ``address``; raises :class:`NoRoute` if it has none."""
        domain = address.domain
        if domain in self._local_domains or _is_loopback_literal(address):
            return self._available(LOCAL, f"mail for local domain {domain}")
        for compiled in self._routes:
            if compiled.route.matches(domain):
                return _resolve(compiled, domain)
        return self._default(address)

    def _default(self, address: Address) -> Destination:
        """Mail for no local domain and no route: SMTP to the domain (or the literal)."""
        if address.is_literal and not _is_routable_literal(address):
            raise NoRoute(
                _no_route(f"address literal {address.domain} names no host to deliver to")
            )
        return self._available(Destination("smtp", address.domain), f"remote {address.domain}")

    def _available(self, destination: Destination, what: str) -> Destination:
        """``destination`` if its channel runs here, else NoRoute saying so."""
        if destination.channel not in self._channels:
            raise NoRoute(_misconfigured(f"{what}: channel {destination.channel!r} not running"))
        return destination

    def _compile(self, route: Route) -> _CompiledRoute:
        channel = route.channel.value
        if channel not in self._channels:
            reason = f"route {route.domain}: channel {channel!r} is not running on this relay"
            return _CompiledRoute(route, None, _misconfigured(reason))
        if route.channel is Channel.LOCAL:
            return _CompiledRoute(route, LOCAL, None)
        if route.channel is Channel.PHONE:
            return _compile_phone(route, self._sites)
        if route.smarthost is not None:
            return _CompiledRoute(route, Destination(channel, str(route.smarthost)), None)
        return _CompiledRoute(route, None, None)


def route_recipient(
    address: Address, config: Config, channels: Collection[str] | None = None
) -> Destination:
    """The destination of ``address`` under ``config`` (a one-off :class:`Router`)."""
    return Router(config, channels).route(address)


def _compile_phone(route: Route, sites: frozenset[str]) -> _CompiledRoute:
    """A phone route goes to its site, which must be one of ``[phone.sites]``."""
    if route.site is None:
        reason = f"route {route.domain}: phone route without a site"
        return _CompiledRoute(route, None, _misconfigured(reason))
    if route.site not in sites:
        reason = f"route {route.domain}: no phone site {route.site!r} is configured"
        return _CompiledRoute(route, None, _misconfigured(reason))
    return _CompiledRoute(route, Destination(route.channel.value, route.site), None)


def _resolve(compiled: _CompiledRoute, domain: str) -> Destination:
    if compiled.failure is not None:
        raise NoRoute(compiled.failure)
    if compiled.destination is not None:
        return compiled.destination
    return Destination(compiled.route.channel.value, domain)


def _is_loopback_literal(address: Address) -> bool:
    ip = _literal_ip(address)
    return ip is not None and ip.is_loopback


def _is_routable_literal(address: Address) -> bool:
    """Whether an address literal names a host one could connect to."""
    ip = _literal_ip(address)
    if ip is None:
        return True
    return not (ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_loopback)


def _literal_ip(address: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of an address literal, an IPv4-mapped IPv6 address taken as the IPv4 one."""
    ip = address.literal_ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _no_route(reason: str) -> Reply:
    return Reply(ReplyCode.NDEL, reason, enhanced=_BAD_DESTINATION)


def _misconfigured(reason: str) -> Reply:
    return Reply(ReplyCode.MECH, reason, enhanced=_MISCONFIGURED)

"""A real DNS server for tests: twisted.names serving a zone the test writes, on 127.0.0.1.

Tests never reach the Internet's DNS: each MX test starts one of these on an ephemeral
port (UDP and TCP on the same port number, as a real server listens) and points a
``twisted.names.client.Resolver`` at it, so the code under test speaks real DNS packets.

The zone is a dict from owner name to records (built with :func:`mx`, :func:`a`,
:func:`aaaa`, :func:`cname`).  The server answers like an authoritative one:

* a name in the zone with records of the asked type: those records;
* a name in the zone without them: NOERROR and an empty answer (NODATA);
* a name not in the zone: NXDOMAIN;
* a CNAME owner: the CNAME, and, when ``chase_cnames`` is set and the target is in the
  zone, the target's records too (as BIND does for in-zone targets); otherwise the
  client has to ask again for the target;
* a name in ``servfail``: SERVFAIL; a name in ``drop``: no answer at all (a timeout).

``queries`` records every (name, type) asked, so a test can check what was looked up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.names import dns, server
from twisted.names import error as dns_error
from twisted.names.common import ResolverBase

__all__ = ["DnsServer", "a", "aaaa", "cname", "mx", "start_dns_server"]


@dataclass(frozen=True)
class _Record:
    type: int
    payload: Any


def mx(preference: int, exchange: str) -> _Record:
    """An MX record (``"."`` for a null MX)."""
    return _Record(dns.MX, dns.Record_MX(preference, exchange.encode(), ttl=60))


def a(address: str) -> _Record:
    """An A record."""
    return _Record(dns.A, dns.Record_A(address, ttl=60))


def aaaa(address: str) -> _Record:
    """An AAAA record."""
    return _Record(dns.AAAA, dns.Record_AAAA(address, ttl=60))


def cname(target: str) -> _Record:
    """A CNAME record."""
    return _Record(dns.CNAME, dns.Record_CNAME(target.encode(), ttl=60))


class _ZoneResolver(ResolverBase):
    """An authoritative ``IResolver`` over the test's zone."""

    def __init__(
        self,
        zone: Mapping[str, Iterable[_Record]],
        servfail: Iterable[str],
        drop: Iterable[str],
        chase_cnames: bool,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.zone = {_key(name): list(records) for name, records in zone.items()}
        self.servfail = {_key(n) for n in servfail}
        self.drop = {_key(n) for n in drop}
        self.chase_cnames = chase_cnames
        self.queries: list[tuple[str, int]] = []
        self.dropped: list[Deferred[Any]] = []

    def _lookup(self, name: bytes | str, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = _key(name.decode() if isinstance(name, bytes) else name)
        self.queries.append((key, type))
        if key in self.drop:
            d: Deferred[Any] = Deferred()
            self.dropped.append(d)
            return d
        if key in self.servfail:
            # any failure but a DomainError makes DNSServerFactory answer SERVFAIL
            return defer.fail(RuntimeError("SERVFAIL for " + key))
        if key not in self.zone:
            return defer.fail(dns_error.DomainError(key))
        answers = self._answer(key, type, depth=0)
        return defer.succeed((answers, [], []))

    def _answer(self, key: str, type: int, depth: int) -> list[dns.RRHeader]:
        out: list[dns.RRHeader] = []
        for record in self.zone.get(key, []):
            if record.type == type or (record.type == dns.CNAME and type != dns.CNAME):
                out.append(dns.RRHeader(key, record.type, dns.IN, 60, record.payload, auth=True))
                if record.type == dns.CNAME and self.chase_cnames and depth < 8:
                    target = _key(str(record.payload.name))
                    out.extend(self._answer(target, type, depth + 1))
        return out


def _key(name: str) -> str:
    return name.rstrip(".").lower()


@dataclass
class DnsServer:
    """A running test DNS server: where it listens, what it was asked; ``stop()`` it."""

    port: int
    resolver: _ZoneResolver
    _listeners: list[Any] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for ``client.Resolver(servers=[...])``."""
        return ("127.0.0.1", self.port)

    @property
    def queries(self) -> list[tuple[str, int]]:
        """Every (name, type) asked so far, in order."""
        return self.resolver.queries

    async def stop(self) -> None:
        """Stop listening (and forget queries that were never to be answered)."""
        for d in self.resolver.dropped:
            d.cancel()
        for listener in self._listeners:
            await listener.stopListening()


def start_dns_server(
    reactor: Any,
    zone: Mapping[str, Iterable[_Record]],
    *,
    servfail: Iterable[str] = (),
    drop: Iterable[str] = (),
    chase_cnames: bool = False,
) -> DnsServer:
    """Serve ``zone`` on 127.0.0.1, UDP and TCP on one ephemeral port."""
    resolver = _ZoneResolver(zone, servfail, drop, chase_cnames)
    factory = server.DNSServerFactory(authorities=[resolver])  # type: ignore[no-untyped-call]
    factory.noisy = False
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except error.CannotListenError:
            udp.stopListening()
            continue
        return DnsServer(port, resolver, [udp, tcp])
    raise RuntimeError("no port free for both UDP and TCP")

"""MX resolution: from a mail domain to the hosts to try, and from a host to its addresses.

RFC 5321 §5.1, as Postfix applies it:

* The MX records of the domain, lowest preference first; hosts of **equal preference in
  random order** (an injected ``random.Random``, so tests are reproducible), which spreads
  the load the way the domain's owner asked.
* **No MX records** (the name exists, the answer is empty): the domain itself is the one
  mail host, the *implicit MX*, at preference 0.
* **Null MX** (RFC 7505: one MX whose exchange is ``.``): the domain says it takes no
  mail; that is a permanent failure, ``5.1.10``.  A null MX mixed with real ones is a
  broken zone; the real ones are used and the null one is ignored.
* **NXDOMAIN** for the domain: permanent, ``5.1.2`` (bad destination system address).
* **SERVFAIL, REFUSED, a timeout**, anything else that is not an answer: temporary
  (``NS``, ``4.4.3``); the deliverer keeps the mail and marks the destination dead.
* **CNAMEs are followed** (up to :data:`MAX_CNAME_DEPTH` links), whether the server put
  the target's records in the same answer or the client has to ask again.
* **Mail that would loop**: an MX naming this host (``local_names``) means we are one of
  the domain's mail hosts; only hosts *more preferred* than we are may be used, and if
  there are none the mail "loops back to myself" (permanent, ``5.4.6``) — better a
  bounce than a message bouncing between a primary and a backup MX for days.

Addresses (:meth:`MxResolver.addresses`) are the host's A records then its AAAA records.
A host whose lookups say "no such name" or "no address" has no addresses (permanent for
that host); a temporary failure of both lookups is an :class:`DnsError` with ``NS``.
An IP address given as a host name is its own address (some zones do put one in an MX).

Errors are :class:`DnsError` carrying the :class:`relay.reply.Reply` every recipient of
the domain gets, so the caller never guesses why a lookup failed.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import client, dns, error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from relay.errors import RelayError
from relay.reply import Reply, ReplyCode

__all__ = [
    "MAX_CNAME_DEPTH",
    "DnsError",
    "MailHost",
    "MxResolver",
    "make_resolver",
]

MAX_CNAME_DEPTH: Final = 8
"""CNAME links followed before a lookup is called broken (BIND follows 16; 8 is plenty)."""

DEFAULT_DNS_TIMEOUT: Final = (1.0, 3.0, 11.0)
"""Retransmission timeouts of one query (seconds; 15 s in all, then the query has failed)."""


class DnsError(RelayError):
    """A lookup that yields no host to try; ``reply`` is what every recipient gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.description)
        self.reply = reply

    @property
    def permanent(self) -> bool:
        """Whether the recipients bounce (True) or wait for a retry (False)."""
        return self.reply.code.is_permanent


@dataclass(frozen=True, slots=True)
class MailHost:
    """One host to try for a domain, from its MX records (or the implicit MX)."""

    name: str
    preference: int
    implicit: bool = False


class _NoSuchName(Exception):
    """NXDOMAIN: the name does not exist (permanent)."""


class _Unavailable(Exception):
    """The lookup could not be answered now (SERVFAIL, timeout, ...): temporary."""


def make_resolver(
    reactor: Any,
    servers: Sequence[tuple[str, int]] | None = None,
    timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
) -> ResolverBase:
    """A twisted.names resolver: the given servers, else the system's ``/etc/resolv.conf``.

    No cache: MX answers are looked up once per session, and sessions are reused, so a
    cache would save little and hide a changed zone from an operator who just fixed it.
    """
    if servers:
        options: dict[str, Any] = {"servers": list(servers)}
    else:
        options = {"resolv": "/etc/resolv.conf"}
    resolver: ResolverBase = client.Resolver(  # type: ignore[no-untyped-call]
        timeout=tuple(timeout), reactor=reactor, **options
    )
    return resolver


class MxResolver:
    """Turns domains into ordered :class:`MailHost` lists and hosts into addresses.

    ``resolver`` is any twisted.names ``IResolver`` (a ``client.Resolver`` pointed at the
    relay's name servers, or a test's own server); ``rng`` orders hosts of equal
    preference; ``local_names`` are this relay's own host names (for loop detection).
    """

    def __init__(
        self,
        resolver: Any,
        rng: random.Random | None = None,
        local_names: Collection[str] = (),
    ) -> None:
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()
        self._local_names = frozenset(_normal(name) for name in local_names)

    def mail_hosts(self, domain: str) -> Deferred[list[MailHost]]:
        """Fire with the hosts to try for ``domain``, in order; fail with :class:`DnsError`."""
        return defer.ensureDeferred(self._mail_hosts(_normal(domain)))

    def addresses(self, host: str) -> Deferred[list[str]]:
        """Fire with ``host``'s IP addresses (A, then AAAA); fail with :class:`DnsError`.

        An empty list means the host has no address (NXDOMAIN or no A/AAAA records):
        the caller moves to the next host.  Only a temporary failure of every lookup is
        an error, since then we do not know whether the host has an address.
        """
        return defer.ensureDeferred(self._addresses(_normal(host)))

    # --- MX --------------------------------------------------------------------------

    async def _mail_hosts(self, domain: str) -> list[MailHost]:
        try:
            records = await self._follow(domain, dns.MX, self._resolver.lookupMailExchange)
        except _NoSuchName:
            raise DnsError(
                Reply(
                    ReplyCode.NDEL,
                    f"domain {domain} not found (DNS type=MX: NXDOMAIN)",
                    smtp_code=550,
                    enhanced="5.1.2",
                )
            ) from None
        except _Unavailable as e:
            raise DnsError(_temporary(domain, "MX", str(e))) from None
        mx = [
            MailHost(_normal(str(r.name)), int(r.preference))
            for r in records
            if isinstance(r, dns.Record_MX)
        ]
        if not mx:
            return self._without_loops(domain, [MailHost(domain, 0, implicit=True)])
        real = [host for host in mx if host.name]
        if not real:
            raise DnsError(
                Reply(
                    ReplyCode.NDEL,
                    f"domain {domain} does not accept mail (null MX)",
                    smtp_code=556,
                    enhanced="5.1.10",
                )
            )
        return self._without_loops(domain, self._ordered(real))

    def _ordered(self, hosts: list[MailHost]) -> list[MailHost]:
        """By preference; each group of equal preference shuffled by the injected rng."""
        ordered: list[MailHost] = []
        unique = sorted(set(hosts), key=lambda h: (h.preference, h.name))
        for _, group in groupby(unique, key=lambda h: h.preference):
            same = list(group)
            self._rng.shuffle(same)
            ordered.extend(same)
        return ordered

    def _without_loops(self, domain: str, hosts: list[MailHost]) -> list[MailHost]:
        """Drop this host and every host not more preferred than it (RFC 5321 §5.1)."""
        ours = [h.preference for h in hosts if h.name in self._local_names]
        if not ours:
            return hosts
        kept = [h for h in hosts if h.preference < min(ours)]
        if not kept:
            raise DnsError(
                Reply(
                    ReplyCode.NDEL,
                    f"mail for {domain} loops back to myself",
                    smtp_code=554,
                    enhanced="5.4.6",
                )
            )
        return kept

    # --- addresses --------------------------------------------------------------------

    async def _addresses(self, host: str) -> list[str]:
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        outcomes = await defer.DeferredList(
            [
                defer.ensureDeferred(self._one_family(host, dns.A, self._resolver.lookupAddress)),
                defer.ensureDeferred(
                    self._one_family(host, dns.AAAA, self._resolver.lookupIPV6Address)
                ),
            ],
            consumeErrors=True,
        )
        found: list[str] = []
        problems: list[str] = []
        for ok, value in outcomes:
            if ok:
                found.extend(value)
            elif isinstance(value, Failure) and value.check(_Unavailable):
                problems.append(str(value.value))
            elif isinstance(value, Failure):
                value.raiseException()
        if not found and problems:
            raise DnsError(_temporary(host, "A/AAAA", "; ".join(problems)))
        return found

    async def _one_family(
        self, host: str, rtype: int, lookup: Callable[[str], Deferred[Any]]
    ) -> list[str]:
        try:
            records = await self._follow(host, rtype, lookup)
        except _NoSuchName:
            return []
        out: list[str] = []
        for r in records:
            if isinstance(r, dns.Record_A):
                out.append(str(ipaddress.IPv4Address(r.address)))
            elif isinstance(r, dns.Record_AAAA):
                out.append(str(ipaddress.IPv6Address(r.address)))
        return out

    # --- the lookup itself, with CNAMEs -------------------------------------------------

    async def _follow(
        self, name: str, rtype: int, lookup: Callable[[str], Deferred[Any]]
    ) -> list[Any]:
        """The records of type ``rtype`` for ``name``, following CNAMEs.

        Each answer may hold a chain (``name CNAME a``, ``a CNAME b``, ``b MX …``): walk
        it as far as it goes, and ask again for the end of the chain if the server did
        not give that name's records.  A chain longer than :data:`MAX_CNAME_DEPTH` or a
        loop is a broken zone: temporary, as an operator will fix it.
        """
        seen = {name}
        current = name
        for _ in range(MAX_CNAME_DEPTH + 1):
            answers = await self._query(current, lookup)
            records, end = _walk(current, answers, rtype, seen)
            if records or end == current:
                return records
            current = end
        raise _Unavailable(f"CNAME chain from {name} longer than {MAX_CNAME_DEPTH}")

    async def _query(self, name: str, lookup: Callable[[str], Deferred[Any]]) -> list[Any]:
        try:
            answers, _authority, _additional = await lookup(name)
        except (error.DNSQueryTimeoutError, defer.TimeoutError):
            raise _Unavailable(f"lookup of {name} timed out") from None
        except error.DNSServerError:
            raise _Unavailable(f"lookup of {name}: SERVFAIL") from None
        except error.DNSQueryRefusedError:
            raise _Unavailable(f"lookup of {name}: REFUSED") from None
        except (error.DNSFormatError, error.DNSNotImplementedError, error.DNSUnknownError) as e:
            raise _Unavailable(f"lookup of {name}: {type(e).__name__}") from None
        except (error.DomainError, error.AuthoritativeDomainError):
            # DNSNameError (NXDOMAIN from a server) or an in-process resolver's "no such name"
            raise _NoSuchName(name) from None
        except Exception as e:  # any other failure: no answer now, try again later
            raise _Unavailable(f"lookup of {name} failed: {type(e).__name__}: {e}") from None
        return list(answers)


def _walk(name: str, answers: list[Any], rtype: int, seen: set[str]) -> tuple[list[Any], str]:
    """Follow ``name``'s CNAMEs through ``answers``: (records of ``rtype`` found, last name)."""
    by_name: dict[str, list[Any]] = {}
    aliases: dict[str, str] = {}
    for rr in answers:
        owner = _normal(str(rr.name))
        if rr.type == rtype:
            by_name.setdefault(owner, []).append(rr.payload)
        elif rr.type == dns.CNAME:
            aliases[owner] = _normal(str(rr.payload.name))
    current = name
    while current not in by_name and current in aliases:
        target = aliases[current]
        if target in seen:
            raise _Unavailable(f"CNAME loop at {target}")
        seen.add(target)
        current = target
    return by_name.get(current, []), current


def _temporary(name: str, rtype: str, why: str) -> Reply:
    return Reply(
        ReplyCode.NS,
        f"temporary DNS failure for {name} type={rtype}: {why}",
        smtp_code=451,
        enhanced="4.4.3",
    )


def _normal(name: str) -> str:
    """A domain name as compared here: lower case, no trailing dot (root is ``""``)."""
    return name.strip().rstrip(".").lower()


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None

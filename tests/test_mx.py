"""MX resolution against a real DNS server the test starts on 127.0.0.1 (tests/dnsserver.py)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.names import dns

from relay.dns.mx import DnsError, MailHost, MxResolver, make_resolver
from relay.reply import ReplyCode

from support.dnsserver import DnsServer, _Record, a, aaaa, cname, mx, start_dns_server

reactor: Any = _reactor


async def _resolver_for(
    zone: Mapping[str, Iterable[_Record]],
    rng: random.Random | None = None,
    local_names: Iterable[str] = (),
    **options: Any,
) -> tuple[MxResolver, DnsServer]:
    server = start_dns_server(reactor, zone, **options)
    resolver = make_resolver(reactor, [server.address], timeout=(0.3,))
    return MxResolver(resolver, rng or random.Random(1), tuple(local_names)), server


def _names(hosts: list[MailHost]) -> list[str]:
    return [h.name for h in hosts]


@pytest_twisted.ensureDeferred
async def test_mx_hosts_come_in_preference_order() -> None:
    """MX hosts are returned lowest preference first, whatever order the server gives."""
    zone = {
        "example.test": [
            mx(30, "mx3.example.test"),
            mx(10, "mx1.example.test"),
            mx(20, "MX2.example.test."),
        ]
    }
    resolver, server = await _resolver_for(zone)
    try:
        hosts = await resolver.mail_hosts("Example.Test.")
    finally:
        await server.stop()
    assert hosts == [
        MailHost("mx1.example.test", 10),
        MailHost("mx2.example.test", 20),
        MailHost("mx3.example.test", 30),
    ]
    assert ("example.test", dns.MX) in server.queries


@pytest_twisted.ensureDeferred
async def test_equal_preferences_are_shuffled_by_the_injected_rng() -> None:
    """Hosts of equal preference come in the order the seeded rng gives; all orders occur."""
    zone = {
        "example.test": [
            mx(10, "a.example.test"),
            mx(10, "b.example.test"),
            mx(10, "c.example.test"),
            mx(5, "first.example.test"),
            mx(20, "last.example.test"),
        ]
    }
    server = start_dns_server(reactor, zone)
    try:
        dns_client = make_resolver(reactor, [server.address], timeout=(0.3,))
        orders = set()
        for seed in range(30):
            hosts = await MxResolver(dns_client, random.Random(seed)).mail_hosts("example.test")
            names = _names(hosts)
            assert names[0] == "first.example.test"
            assert names[-1] == "last.example.test"
            assert sorted(names[1:4]) == ["a.example.test", "b.example.test", "c.example.test"]
            orders.add(tuple(names[1:4]))
            # the same seed gives the same order: reproducible
            again = await MxResolver(dns_client, random.Random(seed)).mail_hosts("example.test")
            assert _names(again) == names
    finally:
        await server.stop()
    assert len(orders) == 6


@pytest_twisted.ensureDeferred
async def test_no_mx_means_the_implicit_mx() -> None:
    """A domain with no MX records (NODATA) is its own mail host, preference 0."""
    resolver, server = await _resolver_for({"plain.test": [a("127.0.0.1"), aaaa("::1")]})
    try:
        hosts = await resolver.mail_hosts("plain.test")
        addresses = await resolver.addresses("plain.test")
    finally:
        await server.stop()
    assert hosts == [MailHost("plain.test", 0, implicit=True)]
    assert addresses == ["127.0.0.1", "::1"]


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_permanently() -> None:
    """A single MX "." (RFC 7505) is a permanent NDEL with 5.1.10."""
    resolver, server = await _resolver_for({"nomail.test": [mx(0, ".")]})
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("nomail.test")
    finally:
        await server.stop()
    reply = caught.value.reply
    assert reply.code is ReplyCode.NDEL
    assert reply.effective_enhanced == "5.1.10"
    assert "does not accept mail" in reply.text
    assert caught.value.permanent


@pytest_twisted.ensureDeferred
async def test_null_mx_beside_real_ones_is_ignored() -> None:
    """A null MX mixed with real MX records (a broken zone) is skipped, the rest used."""
    resolver, server = await _resolver_for({"mixed.test": [mx(0, "."), mx(10, "mx.mixed.test")]})
    try:
        hosts = await resolver.mail_hosts("mixed.test")
    finally:
        await server.stop()
    assert hosts == [MailHost("mx.mixed.test", 10)]


@pytest_twisted.ensureDeferred
async def test_nxdomain_fails_permanently() -> None:
    """A domain that does not exist is a permanent failure with 5.1.2."""
    resolver, server = await _resolver_for({"example.test": [mx(10, "mx.example.test")]})
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("nowhere.test")
    finally:
        await server.stop()
    assert caught.value.reply.code is ReplyCode.NDEL
    assert caught.value.reply.effective_enhanced == "5.1.2"
    assert caught.value.reply.effective_smtp_code == 550
    assert caught.value.permanent


@pytest_twisted.ensureDeferred
async def test_servfail_is_a_temporary_name_server_failure() -> None:
    """SERVFAIL for the MX lookup is NS (temporary, 4.4.3)."""
    resolver, server = await _resolver_for({}, servfail=["broken.test"])
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("broken.test")
    finally:
        await server.stop()
    assert caught.value.reply.code is ReplyCode.NS
    assert caught.value.reply.effective_enhanced == "4.4.3"
    assert "SERVFAIL" in caught.value.reply.text
    assert not caught.value.permanent


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_is_a_temporary_failure() -> None:
    """A lookup that times out is NS (temporary), never a bounce."""
    resolver, server = await _resolver_for({}, drop=["slow.test"])
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("slow.test")
    finally:
        await server.stop()
    assert caught.value.reply.code is ReplyCode.NS
    assert "timed out" in caught.value.reply.text


@pytest_twisted.ensureDeferred
async def test_cname_to_the_domain_with_mx_is_followed() -> None:
    """An MX lookup of a CNAME owner follows it to the target's MX (asking again)."""
    zone = {
        "alias.test": [cname("real.test")],
        "real.test": [mx(10, "mx.real.test")],
        "mx.real.test": [cname("box.real.test")],
        "box.real.test": [a("127.0.0.1")],
    }
    resolver, server = await _resolver_for(zone)
    try:
        hosts = await resolver.mail_hosts("alias.test")
        addresses = await resolver.addresses("mx.real.test")
    finally:
        await server.stop()
    assert hosts == [MailHost("mx.real.test", 10)]
    assert addresses == ["127.0.0.1"]
    assert ("real.test", dns.MX) in server.queries  # the target was asked for separately
    assert ("box.real.test", dns.A) in server.queries


@pytest_twisted.ensureDeferred
async def test_cname_chain_in_one_answer_is_followed_without_asking_again() -> None:
    """When the server puts the chain and the target's records in one answer, they are used."""
    zone = {
        "alias.test": [cname("middle.test")],
        "middle.test": [cname("real.test")],
        "real.test": [mx(10, "mx.real.test")],
    }
    resolver, server = await _resolver_for(zone, chase_cnames=True)
    try:
        hosts = await resolver.mail_hosts("alias.test")
    finally:
        await server.stop()
    assert hosts == [MailHost("mx.real.test", 10)]
    assert server.queries == [("alias.test", dns.MX)]


@pytest_twisted.ensureDeferred
async def test_cname_loop_is_temporary() -> None:
    """A CNAME loop is a broken zone: a temporary NS failure, not a hang or a bounce."""
    resolver, server = await _resolver_for(
        {"x.test": [cname("y.test")], "y.test": [cname("x.test")]}
    )
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("x.test")
    finally:
        await server.stop()
    assert caught.value.reply.code is ReplyCode.NS
    assert "CNAME" in caught.value.reply.text


@pytest_twisted.ensureDeferred
async def test_mx_naming_this_host_keeps_only_better_hosts() -> None:
    """When we are an MX of the domain, only more preferred hosts are tried."""
    zone = {
        "example.test": [
            mx(10, "primary.example.test"),
            mx(20, "hub.example.test"),
            mx(30, "other.example.test"),
        ]
    }
    resolver, server = await _resolver_for(zone, local_names=["HUB.example.test"])
    try:
        hosts = await resolver.mail_hosts("example.test")
    finally:
        await server.stop()
    assert _names(hosts) == ["primary.example.test"]


@pytest_twisted.ensureDeferred
async def test_mail_that_loops_back_to_myself_bounces() -> None:
    """When we are the best MX of a domain that is not ours, the mail bounces with 5.4.6."""
    resolver, server = await _resolver_for(
        {"example.test": [mx(10, "hub.example.test")]}, local_names=["hub.example.test"]
    )
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.mail_hosts("example.test")
    finally:
        await server.stop()
    assert caught.value.reply.effective_enhanced == "5.4.6"
    assert caught.value.permanent


@pytest_twisted.ensureDeferred
async def test_addresses_of_a_host() -> None:
    """A host's addresses are its A records then its AAAA records; none for NXDOMAIN."""
    zone = {
        "dual.test": [aaaa("::1"), a("127.0.0.1"), a("127.0.0.2")],
        "v6only.test": [aaaa("::1")],
        "noaddr.test": [mx(10, "x.test")],
    }
    resolver, server = await _resolver_for(zone)
    try:
        dual = await resolver.addresses("dual.test")
        v6 = await resolver.addresses("v6only.test")
        none = await resolver.addresses("noaddr.test")
        missing = await resolver.addresses("missing.test")
        literal = await resolver.addresses("127.0.0.9")
    finally:
        await server.stop()
    assert dual == ["127.0.0.1", "127.0.0.2", "::1"]
    assert v6 == ["::1"]
    assert none == []
    assert missing == []
    assert literal == ["127.0.0.9"]


@pytest_twisted.ensureDeferred
async def test_address_lookup_failing_temporarily_is_an_error() -> None:
    """If both address lookups fail temporarily, the caller learns it (NS), not 'no address'."""
    resolver, server = await _resolver_for({}, servfail=["sick.test"])
    try:
        with pytest.raises(DnsError) as caught:
            await resolver.addresses("sick.test")
    finally:
        await server.stop()
    assert caught.value.reply.code is ReplyCode.NS

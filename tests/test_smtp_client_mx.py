"""The SMTP channel finding its servers through DNS: a test DNS server and SMTP servers on loopback.

Only 127.0.0.1 and ::1 are ours, so "two MX hosts" are one port number on the two
loopback addresses: the channel is built with ``port=`` that number (it is 25 in
production), and an MX host whose address has no listener there refuses the connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.names import dns
from zope.interface.verify import verifyObject

from relay.channels.smtp import SmtpChannel, build_smtp_channel
from relay.config import Channel, Config, Route, Smarthost, TlsPolicy, default_config
from relay.dns.mx import make_resolver
from relay.interfaces import IChannel, SequencingMode
from relay.reply import Action, ReplyCode

from support.dnsserver import _Record, a, aaaa, cname, mx, start_dns_server
from support.smtp_harness import Outcome, deliver, make_message
from support.smtpserver import Script, ScriptedSmtpFactory
from support.tlsfiles import TlsFiles, make_tls_files

R: Any = reactor
RCPT = "user@example.test"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


class Loopback:
    """SMTP servers on one port number, on 127.0.0.1 and/or ::1."""

    def __init__(self) -> None:
        self.port = 0
        self.listeners: list[Any] = []
        self.factories: dict[str, ScriptedSmtpFactory] = {}

    def serve(self, interface: str, script: Script | None = None) -> ScriptedSmtpFactory:
        factory = ScriptedSmtpFactory(script or Script())
        listener = R.listenTCP(self.port, factory, interface=interface)
        self.port = listener.getHost().port
        self.listeners.append(listener)
        self.factories[interface] = factory
        return factory


@contextlib.asynccontextmanager
async def world(
    zone: Mapping[str, Iterable[_Record]],
    servers: Mapping[str, Script | None],
    *,
    rng_seed: int = 1,
    routes: Callable[[int], tuple[Route, ...]] = lambda port: (),
    free_port_on: str = "127.0.0.1",
    **channel_options: Any,
) -> AsyncIterator[tuple[SmtpChannel, Loopback, Any]]:
    """A DNS server with ``zone``, SMTP servers per interface, and a channel using both."""
    dns_server = start_dns_server(R, zone)
    loop = Loopback()
    try:
        for interface, script in servers.items():
            loop.serve(interface, script)
        if not servers:  # no listener: pick a port number nobody listens on
            probe = R.listenTCP(0, ScriptedSmtpFactory(Script()), interface=free_port_on)
            loop.port = probe.getHost().port
            await probe.stopListening()
        base = default_config(Path("/nonexistent"))
        config: Config = dataclasses.replace(base, routes=routes(loop.port))
        resolver = make_resolver(R, [dns_server.address], timeout=(0.5,))
        channel = build_smtp_channel(
            config, R, resolver, random.Random(rng_seed), port=loop.port, **channel_options
        )
        yield channel, loop, dns_server
        await channel.close_idle()
    finally:
        for listener in loop.listeners:
            await listener.stopListening()
        await dns_server.stop()


def _delivered(factory: ScriptedSmtpFactory) -> list[list[str]]:
    return [t.accepted for s in factory.sessions for t in s.transactions if t.text is not None]


async def _send(channel: SmtpChannel, host: str = "example.test") -> Outcome:
    return await deliver(channel, host, make_message([RCPT]))


@pytest_twisted.ensureDeferred
async def test_build_smtp_channel_makes_an_address_then_text_channel() -> None:
    """build_smtp_channel gives an IChannel named smtp in address-then-text mode."""
    async with world({}, {}) as (channel, _, _):
        assert verifyObject(IChannel, channel)
        assert channel.name == "smtp"
        assert channel.mode is SequencingMode.ADDRESS_THEN_TEXT


@pytest_twisted.ensureDeferred
async def test_second_mx_is_used_when_the_first_refuses() -> None:
    """MX 10 refuses the connection (nothing on ::1), MX 20 takes the mail."""
    zone = {
        "example.test": [mx(20, "mx2.example.test"), mx(10, "mx1.example.test")],
        "mx1.example.test": [aaaa("::1")],
        "mx2.example.test": [a("127.0.0.1")],
    }
    async with world(zone, {"127.0.0.1": None}) as (channel, loop, dns_server):
        outcome = await _send(channel)
    assert outcome.actions() == [Action.COMMIT]
    assert _delivered(loop.factories["127.0.0.1"]) == [[RCPT]]
    asked = [name for name, _ in dns_server.queries]
    assert asked.index("mx1.example.test") < asked.index("mx2.example.test")


@pytest_twisted.ensureDeferred
async def test_each_address_of_a_host_is_tried_in_turn() -> None:
    """A host's A address refuses, its AAAA address answers: the mail goes to the second."""
    zone = {
        "example.test": [mx(10, "mx.example.test")],
        "mx.example.test": [a("127.0.0.1"), aaaa("::1")],
    }
    async with world(zone, {"::1": None}) as (channel, loop, _):
        outcome = await _send(channel)
    assert outcome.actions() == [Action.COMMIT]
    assert _delivered(loop.factories["::1"]) == [[RCPT]]


@pytest_twisted.ensureDeferred
async def test_a_4xx_greeting_moves_on_to_the_next_mx() -> None:
    """MX 10 greets with 421: the channel goes on to MX 20."""
    zone = {
        "example.test": [mx(10, "busy.example.test"), mx(20, "ok.example.test")],
        "busy.example.test": [aaaa("::1")],
        "ok.example.test": [a("127.0.0.1")],
    }
    servers = {"::1": Script(greeting="421 4.3.2 too busy"), "127.0.0.1": None}
    async with world(zone, servers) as (channel, loop, _):
        outcome = await _send(channel)
    assert outcome.actions() == [Action.COMMIT]
    assert _delivered(loop.factories["127.0.0.1"]) == [[RCPT]]
    assert len(loop.factories["::1"].sessions) == 1


@pytest_twisted.ensureDeferred
async def test_all_mx_hosts_failing_defers_with_the_reason() -> None:
    """No MX host answers: SessionFailed with DHST naming the last one tried; host dead."""
    zone = {
        "example.test": [mx(10, "mx1.example.test"), mx(20, "mx2.example.test")],
        "mx1.example.test": [aaaa("::1")],
        "mx2.example.test": [a("127.0.0.1")],
    }
    async with world(zone, {}) as (channel, loop, _):
        outcome = await _send(channel)
    assert outcome.session_failed
    reply = outcome.replies[0]
    assert reply.code is ReplyCode.DHST
    assert reply.text == f"connect to mx2.example.test[127.0.0.1]:{loop.port}: Connection refused"
    assert outcome.actions() == [Action.HOST_DEAD]


@pytest_twisted.ensureDeferred
async def test_implicit_mx_delivers_to_the_domain_itself() -> None:
    """A domain without MX records but with an address gets the mail directly."""
    async with world({"example.test": [a("127.0.0.1")]}, {"127.0.0.1": None}) as (
        channel,
        loop,
        _,
    ):
        outcome = await _send(channel)
    assert outcome.actions() == [Action.COMMIT]
    assert _delivered(loop.factories["127.0.0.1"]) == [[RCPT]]


@pytest_twisted.ensureDeferred
async def test_cname_domain_is_followed_to_its_mx() -> None:
    """mail for a CNAME goes to the MX of the name it points to."""
    zone = {
        "example.test": [cname("real.test")],
        "real.test": [mx(10, "mx.real.test")],
        "mx.real.test": [a("127.0.0.1")],
    }
    async with world(zone, {"127.0.0.1": None}) as (channel, loop, _):
        outcome = await _send(channel)
    assert outcome.actions() == [Action.COMMIT]
    assert _delivered(loop.factories["127.0.0.1"]) == [[RCPT]]


@pytest_twisted.ensureDeferred
async def test_null_mx_bounces() -> None:
    """A null MX: the session fails permanently with 5.1.10; the deliverer bounces."""
    async with world({"example.test": [mx(0, ".")]}, {}) as (channel, _, _):
        outcome = await _send(channel)
    assert outcome.replies[0].effective_enhanced == "5.1.10"
    assert outcome.actions() == [Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_nxdomain_bounces() -> None:
    """A domain that does not exist: permanent, 5.1.2."""
    async with world({"other.test": [a("127.0.0.1")]}, {}) as (channel, _, _):
        outcome = await _send(channel)
    assert outcome.replies[0].effective_enhanced == "5.1.2"
    assert outcome.actions() == [Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_servfail_defers() -> None:
    """SERVFAIL for the MX lookup: NS, temporary, destination marked dead."""
    dns_server = start_dns_server(R, {}, servfail=["example.test"])
    try:
        config = default_config(Path("/nonexistent"))
        channel = build_smtp_channel(config, R, make_resolver(R, [dns_server.address], (0.5,)))
        outcome = await _send(channel)
    finally:
        await dns_server.stop()
    assert outcome.replies[0].code is ReplyCode.NS
    assert outcome.actions() == [Action.HOST_DEAD]


@pytest_twisted.ensureDeferred
async def test_mx_hosts_without_addresses_bounce() -> None:
    """MX hosts that have no address at all: nothing to try, permanent 5.4.4."""
    zone = {"example.test": [mx(10, "ghost.example.test")], "ghost.example.test": [mx(1, "x.test")]}
    async with world(zone, {}) as (channel, _, _):
        outcome = await _send(channel)
    assert outcome.replies[0].effective_enhanced == "5.4.4"
    assert outcome.actions() == [Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_equal_preference_hosts_are_chosen_by_the_seeded_rng() -> None:
    """Two MX hosts of equal preference: the seed decides which gets the mail, both do."""
    zone = {
        "example.test": [mx(10, "v4.example.test"), mx(10, "v6.example.test")],
        "v4.example.test": [a("127.0.0.1")],
        "v6.example.test": [aaaa("::1")],
    }
    winners: dict[int, str] = {}
    for seed in range(8):
        async with world(zone, {"127.0.0.1": None, "::1": None}, rng_seed=seed) as (
            channel,
            loop,
            _,
        ):
            outcome = await _send(channel)
            assert outcome.actions() == [Action.COMMIT]
            [winner] = [i for i, f in loop.factories.items() if _delivered(f)]
            winners[seed] = winner
    assert set(winners.values()) == {"127.0.0.1", "::1"}
    async with world(zone, {"127.0.0.1": None, "::1": None}, rng_seed=3) as (channel, loop, _):
        await _send(channel)
        assert _delivered(loop.factories[winners[3]]) == [[RCPT]]  # same seed, same choice


@pytest_twisted.ensureDeferred
async def test_smarthost_name_is_looked_up_by_mx() -> None:
    """A smarthost written without brackets gets an MX lookup of its own name (Postfix)."""
    zone = {"relay.partner.test": [mx(10, "in.partner.test")], "in.partner.test": [a("127.0.0.1")]}
    async with world(zone, {"127.0.0.1": None}) as (channel, loop, dns_server):
        outcome = await _send(channel, f"relay.partner.test:{loop.port}")
    assert outcome.actions() == [Action.COMMIT]
    assert ("relay.partner.test", dns.MX) in dns_server.queries


@pytest_twisted.ensureDeferred
async def test_bracketed_smarthost_skips_the_mx_lookup() -> None:
    """[name]:port connects to the name's address; no MX query is made."""
    zone = {"mail.partner.test": [a("127.0.0.1"), mx(10, "elsewhere.test")]}
    async with world(zone, {"127.0.0.1": None}) as (channel, loop, dns_server):
        outcome = await _send(channel, f"[mail.partner.test]:{loop.port}")
    assert outcome.actions() == [Action.COMMIT]
    assert all(rtype != dns.MX for _, rtype in dns_server.queries)


def _tls_routes(name: str) -> Callable[[int], tuple[Route, ...]]:
    def routes(port: int) -> tuple[Route, ...]:
        smarthost = Smarthost(name, port, mx_lookup=False)
        return (Route("partner.test", Channel.SMTP, smarthost, tls=TlsPolicy.REQUIRED),)

    return routes


@pytest_twisted.ensureDeferred
async def test_required_tls_verifies_the_smarthost_name(tls_files: TlsFiles) -> None:
    """tls = required to [mail.partner.test]: a certificate naming it, from the CA, passes."""
    zone = {"mail.partner.test": [a("127.0.0.1")]}
    servers = {"127.0.0.1": Script(tls=tls_files.server_context())}
    routes = _tls_routes("mail.partner.test")
    async with world(zone, servers, routes=routes, ca_file=tls_files.ca_file) as (
        channel,
        loop,
        _,
    ):
        outcome = await _send(channel, f"[mail.partner.test]:{loop.port}")
    assert outcome.actions() == [Action.COMMIT]
    assert loop.factories["127.0.0.1"].sessions[0].tls


@pytest_twisted.ensureDeferred
async def test_required_tls_refuses_a_certificate_for_another_name(tls_files: TlsFiles) -> None:
    """tls = required to [wrong.partner.test]: the certificate does not name it: deferred."""
    zone = {"wrong.partner.test": [a("127.0.0.1")]}
    servers = {"127.0.0.1": Script(tls=tls_files.server_context())}
    routes = _tls_routes("wrong.partner.test")
    async with world(zone, servers, routes=routes, ca_file=tls_files.ca_file) as (
        channel,
        loop,
        _,
    ):
        outcome = await _send(channel, f"[wrong.partner.test]:{loop.port}")
    assert outcome.session_failed
    assert outcome.replies[0].effective_enhanced == "4.7.5"
    assert outcome.actions() == [Action.HOST_DEAD]
    assert _delivered(loop.factories["127.0.0.1"]) == []

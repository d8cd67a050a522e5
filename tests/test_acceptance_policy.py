"""The gateway's acceptance rules: local users, relay_domains, relaying and routing tricks.

Each rule is pinned twice: on :class:`RelayPolicy` itself, and through the whole session
(engine + adapter, no sockets) with the client's bytes split at every position.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relay.address import Address, parse_forward_path
from relay.config import Config, parse_config
from relay.gateway.protocol import GatewayFactory, SessionLimiter, SessionTimeouts
from relay.gateway.service import settings_from_config
from relay.interfaces import ILocalRecipients
from relay.policy.acceptance import RelayPolicy
from relay.policy.routing import Router
from relay.queue.ready import QueueReady
from relay.sansio.smtp.wire import ReplyParser

CONFIG_TOML = """
[relay]
hostname = "mx.example.test"
local_domains = ["example.test"]
[smtp]
trusted_networks = ["10.0.0.0/8"]
relay_domains = ["partner.test", "*.sub.test", "by-mx.test"]
[[route]]
domain = "partner.test"
smarthost = "127.0.0.1:2526"
[[route]]
domain = "*.sub.test"
[[route]]
domain = "mailboxes.test"
channel = "local"
[[route]]
domain = "outbound.test"
smarthost = "127.0.0.1:2527"
"""

TRUSTED = "10.1.2.3"
UNTRUSTED = "192.0.2.7"


@implementer(ILocalRecipients)
class LocalUsers:
    """Users by exact local part (a real implementation of the interface)."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def exists(self, address: Address) -> bool:
        """Whether the whole local part names a user."""
        return address.local_part in self.names


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return parse_config(CONFIG_TOML, Path(tmp_path_factory.mktemp("cfg")))


@pytest.fixture(scope="module")
def policy(config: Config) -> RelayPolicy:
    return RelayPolicy(config, LocalUsers("alice", "user%evil.test", "postmaster"))


# (recipient path, client may relay?, expected (code, enhanced))
RULES = [
    # rule 1: local recipients must exist
    ("<alice@example.test>", False, (250, "2.1.5")),
    ("<nobody@example.test>", False, (550, "5.1.1")),
    ("<nobody@example.test>", True, (550, "5.1.1")),  # trusted clients too
    ("<alice@[127.0.0.1]>", False, (250, "2.1.5")),  # a loopback literal is local
    ("<nobody@[127.0.0.1]>", False, (550, "5.1.1")),
    ("<alice@mailboxes.test>", False, (250, "2.1.5")),  # a local-channel route
    ("<bob@mailboxes.test>", False, (550, "5.1.1")),
    # rule 1, tricks: the whole local part is the user name
    ("<alice%evil.test@example.test>", False, (550, "5.1.1")),
    ("<alice%evil.test@example.test>", True, (550, "5.1.1")),
    ("<user%evil.test@example.test>", False, (250, "2.1.5")),  # really a local user
    ("<evil.test!alice@example.test>", False, (550, "5.1.1")),
    ('<"alice@evil.test"@example.test>', False, (550, "5.1.1")),
    # rule 3: relay_domains are accepted from anyone, routed or not
    ("<bob@partner.test>", False, (250, "2.1.5")),
    ("<bob@PARTNER.test>", False, (250, "2.1.5")),
    ("<bob@x.sub.test>", False, (250, "2.1.5")),
    ("<bob@sub.test>", False, (554, "5.7.1")),  # "*.sub.test" is not sub.test itself
    ("<bob@by-mx.test>", False, (250, "2.1.5")),
    # rule 4: a route alone does not open a domain to everyone
    ("<bob@outbound.test>", False, (554, "5.7.1")),
    ("<bob@outbound.test>", True, (250, "2.1.5")),
    # rule 3, tricks: no onward relaying through a relay domain for untrusted clients
    ("<bob%evil.test@partner.test>", False, (554, "5.7.1")),
    ("<evil.test!bob@partner.test>", False, (554, "5.7.1")),
    ('<"bob@evil.test"@partner.test>', False, (554, "5.7.1")),
    ("<bob%evil.test@partner.test>", True, (250, "2.1.5")),
    ("<@example.test:bob@partner.test>", False, (250, "2.1.5")),  # inert source route
    # rule 2 / 4: everything else only for trusted or authenticated clients
    ("<bob@elsewhere.test>", False, (554, "5.7.1")),
    ("<bob@elsewhere.test>", True, (250, "2.1.5")),
    ("<@example.test:bob@evil.test>", False, (554, "5.7.1")),  # judged by its final domain
    ("<@example.test,@partner.test:bob@evil.test>", False, (554, "5.7.1")),
    ("<@evil.test:alice@example.test>", False, (250, "2.1.5")),
    # literals that name no host cannot be routed at all
    ("<bob@[0.0.0.0]>", True, (550, "5.1.2")),
]


@pytest.mark.parametrize(("path", "may_relay", "expected"), RULES)
def test_policy_rule(
    policy: RelayPolicy, path: str, may_relay: bool, expected: tuple[int, str]
) -> None:
    """Each recipient gets the reply its rule says (see the table above)."""
    reply = policy.check_recipient(parse_forward_path(path), may_relay=may_relay)
    assert (reply.code, reply.enhanced) == expected


@pytest.mark.parametrize(("path", "may_relay", "expected"), RULES)
def test_decision_carries_the_destination_of_accepted_recipients_only(
    policy: RelayPolicy, config: Config, path: str, may_relay: bool, expected: tuple[int, str]
) -> None:
    """An accepted recipient comes with the router's destination; a refused one with none."""
    address = parse_forward_path(path)
    decision = policy.decide_recipient(address, may_relay=may_relay)
    assert (decision.reply.code, decision.reply.enhanced) == expected
    if decision.reply.is_positive:
        assert decision.destination == Router(config).route(address)
    else:
        assert decision.destination is None


def test_relaying_needs_a_trusted_network_or_authentication(policy: RelayPolicy) -> None:
    """may_relay: trusted networks (also IPv4-mapped), or any authenticated client."""
    assert policy.may_relay(TRUSTED, authenticated=False)
    assert policy.may_relay("::ffff:10.9.9.9", authenticated=False)
    assert not policy.may_relay(UNTRUSTED, authenticated=False)
    assert policy.may_relay(UNTRUSTED, authenticated=True)
    assert not policy.may_relay("unix", authenticated=False)


def test_relay_denied_reply_text(policy: RelayPolicy) -> None:
    """The refusal says what it is, in Postfix's words."""
    reply = policy.check_recipient(parse_forward_path("<x@evil.test>"), may_relay=False)
    assert str(reply) == "554 5.7.1 Relay access denied"


# --------------------------------------------------------------------------- through a session


class _Queue:
    """Never reached in these tests (no DATA is sent)."""

    def store(self, envelope: object, text: bytes) -> object:
        raise AssertionError("not expected")


def _session_codes(
    config: Config, client: str, groups: list[bytes]
) -> list[tuple[int, str | None]]:
    factory = GatewayFactory(
        settings=settings_from_config(config, tls_active=False),
        policy=RelayPolicy(config, LocalUsers("alice", "user%evil.test")),
        queue=QueueReady.of(_Queue()),
        clock=Clock(),
        limiter=SessionLimiter(10, 10),
        timeouts=SessionTimeouts(),
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", client, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", client, 40000))
    protocol.makeConnection(transport)
    for group in groups:
        protocol.dataReceived(group)
    replies = ReplyParser().feed(transport.value())
    return [(r.code, r.enhanced) for r in replies]


@pytest.mark.parametrize(("path", "may_relay", "expected"), RULES)
def test_policy_rule_through_a_session_split_everywhere(
    config: Config, path: str, may_relay: bool, expected: tuple[int, str]
) -> None:
    """The same rule holds for a real session, whatever way TCP splits the RCPT line."""
    client = TRUSTED if may_relay else UNTRUSTED
    rcpt = f"RCPT TO:{path}\r\n".encode()
    head = [b"EHLO c.test\r\n", b"MAIL FROM:<s@c.test>\r\n"]
    for cut in range(len(rcpt) + 1):
        pieces = [rcpt[:cut], rcpt[cut:]]
        codes = _session_codes(config, client, head + [p for p in pieces if p])
        assert codes[-1] == expected, (cut, codes)


# The classic open-relay battery: every way a client may ask a relay to pass mail on to
# ``{T}``, through a local domain, the loopback literal or a source route.
OPEN_RELAY_BATTERY = [
    "<user@{T}>",
    "<user@{U}>",
    "<user@{T}.>",
    "<user%{T}@example.test>",
    "<user%{T}@[127.0.0.1]>",
    "<user%{T}.@example.test>",
    '<"user@{T}"@example.test>',
    '<"user%{T}"@example.test>',
    '<"user@{T}"@[127.0.0.1]>',
    "<{T}!user@example.test>",
    "<{T}!user@[127.0.0.1]>",
    "<{T}!user%example.test@example.test>",
    "<user%{T}%example.test@example.test>",
    "<@example.test:user@{T}>",
    "<@[127.0.0.1]:user@{T}>",
    "<@example.test,@[127.0.0.1]:user@{T}>",
    "<user%{T}@mx.example.test>",
    "<user%{T}@partner.test>",
    "<{T}!user@partner.test>",
    '<"user@{T}"@partner.test>',
    "<user%{T}@x.sub.test>",
    "<@partner.test:user@{T}>",
    "<user@{T}@example.test>",
    "<USER@{U}>",
]


def _battery_reply(config: Config, template: str, target: str) -> tuple[int, str | None]:
    path = template.replace("{T}", target).replace("{U}", target.upper())
    head = [b"EHLO c.test\r\n", b"MAIL FROM:<s@c.test>\r\n"]
    codes = _session_codes(config, UNTRUSTED, [*head, f"RCPT TO:{path}\r\n".encode()])
    assert codes[:3] == [(220, None), (250, None), (250, "2.1.0")], codes
    return codes[-1]


@pytest.mark.parametrize("template", OPEN_RELAY_BATTERY)
def test_open_relay_battery_from_an_untrusted_client(config: Config, template: str) -> None:
    """From an untrusted address, every variant is refused, for a routed domain exactly as
    for an unrouted one: 554 5.7.1 when the final domain is remote, 550 otherwise."""
    unrouted = _battery_reply(config, template, "victim.test")
    routed = _battery_reply(config, template, "outbound.test")
    assert routed == unrouted
    assert routed in ((554, "5.7.1"), (550, "5.1.1"), (501, "5.1.3"))
    if template.endswith(("@{T}>", "@{U}>")) and "[" not in template:  # no literal route
        assert routed == (554, "5.7.1")


def test_relay_domains_are_accepted_from_an_untrusted_client(config: Config) -> None:
    """relay_domains (exact, *.parent, routed or by MX) take mail from anyone; nothing else."""
    for path in ("<bob@partner.test>", "<bob@deep.x.sub.test>", "<bob@by-mx.test>"):
        assert _battery_reply(config, path, "") == (250, "2.1.5"), path
    for path in ("<bob@outbound.test>", "<bob@sub.test>", "<bob@partner.test.evil.test>"):
        assert _battery_reply(config, path, "") == (554, "5.7.1"), path

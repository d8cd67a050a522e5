"""The gateway's Twisted adapter: spool replies, timers, session limits, AUTH pacing.

No sockets: a StringTransport, a task.Clock, and a queue whose Deferreds the test fires,
so each test decides exactly when the spool answers.
"""

from __future__ import annotations

import base64
import errno
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relay.address import Address
from relay.config import Config, parse_config
from relay.envelope import BodyType, Envelope
from relay.errors import SpoolError
from relay.gateway.policy import RelayPolicy
from relay.gateway.protocol import GatewayFactory, SessionLimiter, SmtpServerProtocol, Timeouts
from relay.gateway.service import settings_from_config
from relay.interfaces import ILocalRecipients
from relay.sansio.smtp.wire import ReplyParser, SmtpReply, dot_stuff


@implementer(ILocalRecipients)
class LocalUsers:
    """Users by exact local part."""

    def exists(self, address: Address) -> bool:
        return address.local_part in {"alice", "bob"}


@dataclass
class ControlledQueue:
    """store() hands back a Deferred the test fires (an IQueue as far as the gateway goes)."""

    calls: list[tuple[Envelope, bytes, Deferred[str]]] = field(default_factory=list)

    def store(self, envelope: Envelope, text: bytes) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.calls.append((envelope, text, d))
        return d


@dataclass
class ControlledChecker:
    """check() hands back a Deferred the test fires (the password checker's contract)."""

    calls: list[tuple[str, str, Deferred[bool]]] = field(default_factory=list)

    def check(self, username: str, password: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.calls.append((username, password, d))
        return d


TOML = """
[relay]
hostname = "mx.example.test"
local_domains = ["example.test"]
[smtp]
trusted_networks = ["10.0.0.0/8"]
max_recipients = 5
max_errors = 3
max_sessions = 3
max_sessions_per_client = 2
idle_timeout = "60s"
session_timeout = "600s"
max_message_size = 2000
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    users = tmp_path / "users"
    users.write_text("")
    return parse_config(
        TOML + f'auth_users_file = "{users}"\nauth_requires_tls = false\n', tmp_path
    )


@dataclass
class Harness:
    factory: GatewayFactory
    queue: ControlledQueue
    checker: ControlledChecker
    clock: Clock

    def connect(self, host: str = "10.1.1.1") -> Session:
        address = (
            IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
        )
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return Session(protocol, transport)


@dataclass
class Session:
    protocol: SmtpServerProtocol
    transport: StringTransport
    _seen: int = 0

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def replies(self) -> list[SmtpReply]:
        return ReplyParser().feed(self.transport.value())

    def codes(self) -> list[tuple[int, str | None]]:
        return [(r.code, r.enhanced) for r in self.replies()]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost()


@pytest.fixture
def harness(config: Config) -> Harness:
    return make_harness(config)


def make_harness(config: Config, **timeouts: float) -> Harness:
    clock = Clock()
    queue = ControlledQueue()
    checker = ControlledChecker()
    factory = GatewayFactory(
        settings=settings_from_config(config, tls_active=False),
        policy=RelayPolicy(config, LocalUsers()),
        queue=queue,  # type: ignore[arg-type]
        clock=clock,
        limiter=SessionLimiter(config.smtp.max_sessions, config.smtp.max_sessions_per_client),
        timeouts=Timeouts(
            idle=config.smtp.idle_timeout, session=config.smtp.session_timeout, **timeouts
        ),
        checker=checker,  # type: ignore[arg-type]
    )
    return Harness(factory, queue, checker, clock)


TEXT = b"Subject: hello\r\n\r\n.dot\r\nbody\r\n"
TRANSACTION = b"MAIL FROM:<s@c.test> BODY=8BITMIME\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"


def _deliver(session: Session, text: bytes = TEXT) -> None:
    session.send(b"EHLO client.test\r\n")
    session.send(TRANSACTION)
    session.send(dot_stuff(text))


# --------------------------------------------------------------------------- the spool


def test_250_only_after_the_store_fires(harness: Harness) -> None:
    """No reply to the end of data until the spool's Deferred fires; then 250 with the id."""
    session = harness.connect()
    _deliver(session)
    assert len(harness.queue.calls) == 1
    assert session.codes()[-1] == (354, None)
    harness.queue.calls[0][2].callback("0123456789ABCD")
    last = session.replies()[-1]
    assert (last.code, last.enhanced, last.text) == (250, "2.0.0", "Ok: queued as 0123456789ABCD")


def test_stored_text_is_received_header_plus_the_exact_text(harness: Harness) -> None:
    """The spool gets the text unstuffed and unchanged after one prepended Received:."""
    harness.clock.advance(1_700_000_000)
    session = harness.connect()
    _deliver(session)
    envelope, text, _ = harness.queue.calls[0]
    header, _, rest = text.partition(b"\r\nSubject:")
    assert b"Subject:" + rest == TEXT
    assert header.decode() == (
        "Received: from client.test (unknown [10.1.1.1])\r\n"
        "\tby mx.example.test (relay) with ESMTP\r\n"
        "\tfor <alice@example.test>; Tue, 14 Nov 2023 22:13:20 +0000"
    )
    assert envelope.return_path == Address("s", "c.test")
    assert [r.address for r in envelope.recipients] == [Address("alice", "example.test")]
    assert envelope.body_type is BodyType.EIGHT_BIT_MIME
    assert envelope.arrival == 1_700_000_000
    submitter = envelope.submitter
    assert (submitter.protocol, submitter.client_address, submitter.helo) == (
        "ESMTP",
        "10.1.1.1",
        "client.test",
    )
    assert submitter.auth_user is None and submitter.tls is None


def test_duplicate_recipients_are_stored_once(harness: Harness) -> None:
    """RCPT TO the same address twice is answered twice but stored once."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(
        b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    session.send(dot_stuff(TEXT))
    envelope, text, _ = harness.queue.calls[0]
    assert [str(r.address) for r in envelope.recipients] == [
        "alice@example.test",
        "bob@example.test",
    ]
    assert b"\tfor <" not in text  # two recipients: no "for" clause


def _disk_full() -> SpoolError:
    error = SpoolError("spool write failed: No space left on device")
    error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    return error


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (SpoolError("spool write failed: Input/output error"), (451, "4.3.0")),
        (_disk_full(), (452, "4.3.1")),
        (RuntimeError("a bug"), (451, "4.3.0")),
    ],
)
def test_store_failure_is_a_temporary_error(
    harness: Harness, failure: Exception, expected: tuple[int, str]
) -> None:
    """A failed store answers 451 4.3.0 (452 4.3.1 on a full disk), and the session goes on."""
    session = harness.connect()
    _deliver(session)
    harness.queue.calls[0][2].errback(failure)
    assert session.codes()[-1] == expected
    session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (250, "2.0.0")


def test_pipelined_commands_wait_for_the_store(harness: Harness) -> None:
    """Commands pipelined after the end of data are answered after its 250, in order."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(TRANSACTION)
    session.send(
        dot_stuff(TEXT) + b"MAIL FROM:<t@c.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert session.codes()[-1] == (354, None)
    harness.queue.calls[0][2].callback("A")
    assert [c for c, _ in session.codes()[-4:]] == [250, 250, 250, 354]
    session.send(dot_stuff(b"second\r\n") + b"QUIT\r\n")
    harness.queue.calls[1][2].callback("B")
    assert [c for c, _ in session.codes()[-2:]] == [250, 221]
    assert session.closed


def test_reading_pauses_while_the_spool_is_slow(harness: Harness) -> None:
    """A client pipelining into a pending store makes the transport stop reading."""
    session = harness.connect()
    _deliver(session)
    for _ in range(80):
        session.send(b"NOOP " + b"x" * 4000 + b"\r\n")
    assert session.transport.producerState == "paused"
    harness.queue.calls[0][2].callback("A")
    assert session.transport.producerState == "producing"


def test_no_queue_yet_refuses_with_421(config: Config) -> None:
    """Before the spool is open, connections get 421 4.3.2."""
    harness = make_harness(config)
    harness.factory.queue = None
    session = harness.connect()
    assert session.codes() == [(421, "4.3.2")]
    assert session.closed
    assert harness.factory.limiter.total == 0


# --------------------------------------------------------------------------- limits and timers


def test_session_limits_refuse_at_connect(harness: Harness) -> None:
    """Past max_sessions_per_client, then max_sessions, connections get 421 4.7.0."""
    a1, a2 = harness.connect("10.1.1.1"), harness.connect("10.1.1.1")
    a3 = harness.connect("10.1.1.1")
    assert a3.codes() == [(421, "4.7.0")] and a3.closed
    b1 = harness.connect("10.2.2.2")
    b2 = harness.connect("10.3.3.3")
    assert b2.codes() == [(421, "4.7.0")]
    for ok in (a1, a2, b1):
        assert ok.codes() == [(220, None)]
    a1.lose()
    a3.lose()
    assert harness.connect("10.4.4.4").codes() == [(220, None)]
    assert harness.factory.limiter.per_client["10.1.1.1"] == 1


def test_idle_timeout_is_421(harness: Harness) -> None:
    """No input for idle_timeout: 421 4.4.2 and close; input restarts the timer."""
    session = harness.connect()
    harness.clock.advance(59)
    session.send(b"NOOP\r\n")
    harness.clock.advance(59)
    assert not session.closed
    harness.clock.advance(2)
    assert session.codes()[-1] == (421, "4.4.2")
    assert session.closed


def test_a_slow_spool_is_not_an_idle_client(harness: Harness) -> None:
    """While the store is pending the idle timer does not fire on the client."""
    session = harness.connect()
    _deliver(session)
    harness.clock.advance(120)
    assert not session.closed
    harness.queue.calls[0][2].callback("A")
    assert session.codes()[-1] == (250, "2.0.0")


def test_session_timeout_is_421_even_for_a_busy_client(harness: Harness) -> None:
    """A session longer than session_timeout ends with 421 4.4.2, however chatty."""
    session = harness.connect()
    for _ in range(20):
        harness.clock.advance(30)
        session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (421, "4.4.2")
    assert session.closed


def test_greet_delay_catches_a_client_that_talks_first(config: Config) -> None:
    """With a greeting delay, untrusted input before the greeting gets 554 5.5.0 and close."""
    harness = make_harness(config, greet_delay=2.0)
    early = harness.connect("192.0.2.1")
    harness.clock.advance(1)
    early.send(b"EHLO bot.test\r\n")
    assert early.codes() == [(554, "5.5.0")] and early.closed
    patient = harness.connect("192.0.2.2")
    assert patient.codes() == []
    harness.clock.advance(2)
    assert patient.codes() == [(220, None)]
    trusted = harness.connect("10.9.9.9")
    assert trusted.codes() == [(220, None)]  # trusted networks are greeted at once


def test_too_many_errors_closes(harness: Harness) -> None:
    """max_errors bad commands: 421 4.7.0 and close."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"XX\r\n")
    session.send(b"XX\r\n")
    session.send(b"XX\r\n")
    assert session.codes()[-2:] == [(500, "5.5.2"), (421, "4.7.0")]
    assert session.closed


def test_recipient_limit_through_the_adapter(harness: Harness) -> None:
    """The 6th recipient (max_recipients = 5) gets 452 4.5.3."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test>\r\n" + b"RCPT TO:<alice@example.test>\r\n" * 6)
    assert session.codes()[-1] == (452, "4.5.3")


def test_oversized_message_is_552_and_never_stored(harness: Harness) -> None:
    """SIZE over the limit is 552 5.3.4 at MAIL; an over-limit text is 552 after its end."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test> SIZE=2001\r\n")
    assert session.codes()[-1] == (552, "5.3.4")
    session.send(TRANSACTION)
    session.send(b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n")
    session.send(b"w" * 900 + b"\r\n.\r\n")
    assert session.codes()[-1] == (552, "5.3.4")
    assert harness.queue.calls == []


# --------------------------------------------------------------------------- AUTH


def _auth_line(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


def test_auth_success_lets_an_untrusted_client_relay(harness: Harness) -> None:
    """After 235 the client may relay; the Submitter and Received: name the user."""
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<x@far.test>\r\nRSET\r\n")
    assert session.codes()[-2] == (554, "5.7.1")
    session.send(_auth_line("carol", "pw"))
    assert harness.checker.calls[0][:2] == ("carol", "pw")
    harness.checker.calls[0][2].callback(True)
    assert session.codes()[-1] == (235, "2.7.0")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\n")
    assert session.codes()[-2] == (250, "2.1.5")
    session.send(dot_stuff(TEXT))
    envelope, text, _ = harness.queue.calls[0]
    assert envelope.submitter.auth_user == "carol"
    assert envelope.submitter.protocol == "ESMTPA"
    assert b"(authenticated as carol)" in text


def test_failed_auth_is_delayed_and_counted(harness: Harness) -> None:
    """A wrong password gets 535 5.7.8 only after the delay; max_errors failures close."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    for attempt in range(3):
        before = len(session.codes())
        session.send(_auth_line("carol", f"wrong{attempt}"))
        harness.checker.calls[attempt][2].callback(False)
        harness.clock.advance(0.99)
        assert len(session.codes()) == before
        harness.clock.advance(0.02)
        assert session.codes()[before] == (535, "5.7.8")
    assert session.codes()[-4:] == [(535, "5.7.8")] * 3 + [(421, "4.7.0")]
    assert session.closed


def test_session_ending_during_a_store_keeps_the_store(harness: Harness) -> None:
    """A client gone while the spool writes: the store completes (a duplicate at worst)."""
    session = harness.connect()
    _deliver(session)
    session.lose()
    assert harness.factory.limiter.total == 0
    harness.queue.calls[0][2].callback("A")
    assert harness.factory.accepted == 1


def test_ipv6_client_in_received(harness: Harness) -> None:
    """An IPv6 client appears as an IPv6 address literal in Received:."""
    session = harness.connect("2001:db8::5")
    _deliver(session)
    _, text, _ = harness.queue.calls[0]
    assert text.startswith(b"Received: from client.test (unknown [IPv6:2001:db8::5])\r\n")


def test_a_failing_recipient_lookup_is_451(harness: Harness) -> None:
    """If the local-users lookup raises, RCPT gets 451 4.3.0 and the session goes on."""

    class Broken:
        def exists(self, address: Address) -> bool:
            raise OSError("aliases file vanished")

    harness.factory.policy = RelayPolicy(harness.factory.policy._config, Broken())  # type: ignore[arg-type]
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert session.codes()[-1] == (451, "4.3.0")
    session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (250, "2.0.0")


def test_store_finishing_after_a_session_timeout_writes_nothing(harness: Harness) -> None:
    """Session timeout during a store: 421 4.4.2; the late 250 is not written, no error."""
    session = harness.connect()
    _deliver(session)
    harness.clock.advance(601)
    assert session.codes()[-1] == (421, "4.4.2")
    written = session.transport.value()
    harness.queue.calls[0][2].callback("LATE")
    assert session.transport.value() == written
    assert harness.factory.accepted == 1

"""The gateway's Twisted adapter: spool replies, timers, session limits, AUTH pacing.

No sockets: a StringTransport, a task.Clock, and a queue whose Deferreds the test fires,
so each test decides exactly when the spool answers.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import socket
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from zope.interface import implementer

from relay.address import Address
from relay.config import Config, parse_config
from relay.envelope import BodyType, Destination, Envelope, Recipient, Submitter
from relay.errors import SpoolError
from relay.gateway.auth import AuthUnavailable
from relay.gateway.limits import AuthThrottle, LocalAuthThrottle, TextBudget
from relay.gateway.protocol import (
    GatewayFactory,
    SessionLimiter,
    SessionTimeouts,
    SmtpServerProtocol,
)
from relay.gateway.service import settings_from_config
from relay.handoff.codec import HandoffError
from relay.interfaces import AuthVerdict, IAuthThrottle, ILocalRecipients
from relay.policy.acceptance import RelayPolicy
from relay.queue.intake import log_stored
from relay.queue.ready import QueueReady
from relay.sansio.smtp.wire import ReplyParser, SmtpReply, dot_stuff

from support.reactor_helpers import logged_events


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

    def connect(self, host: str = "10.1.1.1", transport: StringTransport | None = None) -> Session:
        address = (
            IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
        )
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address) if transport is None else transport
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


def make_harness(
    config: Config,
    *,
    text_budget: TextBudget | None = None,
    throttle: Callable[[Clock], AuthThrottle] | None = None,
    auth: IAuthThrottle | None = None,
    **timeouts: float,
) -> Harness:
    clock = Clock()
    queue = ControlledQueue()
    checker = ControlledChecker()
    factory = GatewayFactory(
        settings=settings_from_config(config, tls_active=False),
        policy=RelayPolicy(config, LocalUsers()),
        queue=QueueReady.of(queue),
        clock=clock,
        limiter=SessionLimiter(config.smtp.max_sessions, config.smtp.max_sessions_per_client),
        timeouts=SessionTimeouts(
            idle=config.smtp.idle_timeout, session=config.smtp.session_timeout, **timeouts
        ),
        checker=checker,  # type: ignore[arg-type]
        text_budget=text_budget,
        auth_throttle=auth if throttle is None else LocalAuthThrottle(throttle(clock)),
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


# ---------------------------------------------------------------- a client that does not read


class SlowReaderTransport(StringTransport):
    """A StringTransport whose client reads only when told to.

    It pauses its registered producer while more than ``bufferSize`` bytes of output
    are unread and resumes it when they have all been read, as Twisted's TCP transport
    does with its send buffer.
    """

    bufferSize = 65536

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.unread = 0
        self.most_unread = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        self.most_unread = max(self.most_unread, self.unread)
        if self.producer is not None and self.unread > self.bufferSize and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def client_reads(self) -> None:
        """The client reads everything written so far."""
        self.unread = 0
        if self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()


def _pipeline_while_read(session: Session, commands: int, chunk: int = 8192) -> int:
    """Send up to ``commands`` VRFYs in reads of ``chunk`` bytes while the transport reads."""
    data = b"VRFY a\r\n" * commands
    sent = 0
    while sent < len(data) and session.transport.producerState == "producing":
        session.send(data[sent : sent + chunk])
        sent += chunk
    return min(sent, len(data)) // len(b"VRFY a\r\n")


def test_replies_stop_while_the_client_does_not_read_them(harness: Harness) -> None:
    """Past 64 KiB of unread output no more replies are made and reading stops; both resume."""
    transport = SlowReaderTransport()
    session = harness.connect("192.0.2.7", transport)
    assert transport.producer is session.protocol and transport.streaming
    sent = _pipeline_while_read(session, 200_000)
    assert sent < 200_000  # the transport stopped reading: the rest stays with the client
    assert transport.producerState == "paused"
    assert transport.most_unread < transport.bufferSize + 200  # one reply past the bound
    assert session.protocol.engine.buffered < 256 * 1024 + 8192
    answered = len(session.replies())
    transport.client_reads()
    assert len(session.replies()) > answered  # what was held is answered now
    sent += _pipeline_while_read(session, 200_000 - sent)
    while transport.producer_paused:
        transport.client_reads()
    assert transport.most_unread < transport.bufferSize + 200
    replies = session.replies()
    assert len(replies) == 1 + sent and replies[-1].code == 252
    assert not session.closed


def test_a_client_that_never_reads_is_dropped_after_the_idle_timeout(harness: Harness) -> None:
    """A session whose output stays over the bound for idle_timeout is aborted, with no 421."""
    transport = SlowReaderTransport()
    session = harness.connect("192.0.2.7", transport)
    _pipeline_while_read(session, 200_000)
    assert transport.producer_paused
    written = len(transport.value())
    harness.clock.advance(59)
    assert not session.closed
    harness.clock.advance(2)
    assert session.closed and transport.disconnected  # aborted: nothing left to flush
    assert len(transport.value()) == written  # no 421 queued behind what it did not read
    assert harness.factory.limiter.total == 0


def test_a_paused_session_still_answers_its_store(harness: Harness) -> None:
    """A store that completes while output is paused is answered; later commands wait."""
    transport = SlowReaderTransport()
    session = harness.connect("192.0.2.7", transport)
    _deliver(session)
    session.protocol.pauseProducing()  # as the transport would with a full buffer
    harness.queue.calls[0][2].callback("0123456789ABCD")
    assert session.codes()[-1] == (250, "2.0.0")  # the store's answer is written anyway
    session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (250, "2.0.0") and len(session.codes()) == 6
    session.protocol.resumeProducing()
    assert session.codes()[-1] == (250, "2.0.0") and len(session.codes()) == 7


# --------------------------------------------------------------------------- limits and timers


def test_session_limits_refuse_at_connect(harness: Harness) -> None:
    """Past max_sessions_per_client, then max_sessions, connections get 421 4.7.0."""
    a1, a2 = harness.connect("192.0.2.1"), harness.connect("192.0.2.1")
    a3 = harness.connect("192.0.2.1")
    assert a3.codes() == [(421, "4.7.0")] and a3.closed
    b1 = harness.connect("192.0.2.2")
    b2 = harness.connect("192.0.2.3")
    assert b2.codes() == [(421, "4.7.0")]
    for ok in (a1, a2, b1):
        assert ok.codes() == [(220, None)]
    a1.lose()
    a3.lose()
    assert harness.connect("192.0.2.4").codes() == [(220, None)]
    assert harness.factory.limiter.per_client["192.0.2.1"] == 1


def test_trusted_clients_are_not_held_to_the_per_client_limit(harness: Harness) -> None:
    """A client in trusted_networks may open up to max_sessions, past its per-client limit."""
    sessions = [harness.connect("10.1.1.1") for _ in range(3)]  # per client 2, max 3
    assert [s.codes() for s in sessions] == [[(220, None)]] * 3
    assert harness.factory.limiter.per_client["10.1.1.1"] == 3
    assert harness.connect("10.1.1.1").codes() == [(421, "4.7.0")]  # max_sessions holds


def test_a_session_is_released_when_it_ends_not_when_the_close_arrives(harness: Harness) -> None:
    """After QUIT's 221 the slot is free at once: a reconnect before the FIN is admitted."""
    first, second = harness.connect("192.0.2.1"), harness.connect("192.0.2.1")
    first.send(b"QUIT\r\n")
    assert first.codes()[-1] == (221, "2.0.0") and first.closed
    assert first.transport.producer is None  # else a TLS transport would never close
    third = harness.connect("192.0.2.1")  # first's connectionLost has not come yet
    assert third.codes() == [(220, None)]
    first.lose()  # ...and when it comes, nothing is released twice
    assert harness.factory.limiter.per_client["192.0.2.1"] == 2
    assert harness.factory.limiter.total == 2
    second.lose()
    third.lose()
    assert harness.factory.limiter.total == 0 and not harness.factory.limiter.per_client


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


def test_a_session_keeps_one_timer_for_both_limits(harness: Harness) -> None:
    """Idle and session limits share one lazy timer: one heap entry per session, not two."""
    session = harness.connect()
    assert len(harness.clock.getDelayedCalls()) == 1
    session.send(b"EHLO client.test\r\n")
    session.send(b"NOOP\r\n")
    assert len(harness.clock.getDelayedCalls()) == 1


def test_the_session_deadline_holds_when_it_comes_before_the_idle_limit(config: Config) -> None:
    """A session limit shorter than the idle limit still ends the session on time."""
    smtp = dataclasses.replace(config.smtp, session_timeout=10.0)
    harness = make_harness(dataclasses.replace(config, smtp=smtp))
    session = harness.connect()
    harness.clock.advance(9.9)
    assert not session.closed
    harness.clock.advance(0.2)
    assert session.codes()[-1] == (421, "4.4.2") and session.closed


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


# --------------------------------------------------------------------------- routing at store


ROUTES = """
[[route]]
domain = "partner.test"
smarthost = "127.0.0.1:2526"
[[route]]
domain = "*.sub.test"
[[route]]
domain = "mailboxes.test"
channel = "local"
"""


def test_recipients_are_stored_with_their_destinations(tmp_path: Path) -> None:
    """Each accepted recipient is stored routed: local, a route's smarthost or domain, MX."""
    config = parse_config(
        TOML.replace("max_recipients = 5", "max_recipients = 10") + ROUTES, tmp_path
    )
    harness = make_harness(config)
    session = harness.connect("10.1.1.1")  # trusted: may relay
    session.send(b"EHLO c.test\r\n")
    session.send(
        b"MAIL FROM:<s@c.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\n"
        b"RCPT TO:<bob@mailboxes.test>\r\n"
        b"RCPT TO:<p@partner.test>\r\n"
        b"RCPT TO:<q@x.sub.test>\r\n"
        b"RCPT TO:<r@far.test>\r\n"
        b"RCPT TO:<r@far.test>\r\n"
        b"DATA\r\n"
    )
    session.send(dot_stuff(TEXT))
    envelope, _, _ = harness.queue.calls[0]
    assert [(str(r.address), r.destination) for r in envelope.recipients] == [
        ("alice@example.test", Destination("local", "")),
        ("bob@mailboxes.test", Destination("local", "")),
        ("p@partner.test", Destination("smtp", "[127.0.0.1]:2526")),
        ("q@x.sub.test", Destination("smtp", "x.sub.test")),
        ("r@far.test", Destination("smtp", "far.test")),
    ]


# --------------------------------------------------------------------------- timeouts vs store


def test_session_timeout_during_a_store_waits_for_the_stores_reply(harness: Harness) -> None:
    """A session timeout while the spool writes: first the store's 250, then 421 and close."""
    session = harness.connect()
    _deliver(session)
    session.send(b"MAIL FROM:<t@c.test>\r\n")  # pipelined behind the end of data
    harness.clock.advance(601)
    assert session.codes()[-1] == (354, None)
    assert not session.closed
    harness.clock.advance(3600)  # the idle timer does not end it either
    assert not session.closed
    harness.queue.calls[0][2].callback("LATE")
    assert session.codes()[-2:] == [(250, "2.0.0"), (421, "4.4.2")]
    assert session.replies()[-2].text == "Ok: queued as LATE"
    assert session.closed
    assert harness.factory.accepted == 1
    assert len(harness.queue.calls) == 1  # the pipelined MAIL was not executed


def test_session_timeout_during_a_failing_store_sends_its_451_first(harness: Harness) -> None:
    """A store that fails after the session timeout: 451 4.3.0, then 421 4.4.2."""
    session = harness.connect()
    _deliver(session)
    harness.clock.advance(601)
    harness.queue.calls[0][2].errback(SpoolError("spool write failed"))
    assert session.codes()[-2:] == [(451, "4.3.0"), (421, "4.4.2")]
    assert session.closed


def test_session_timeout_without_a_store_is_immediate(harness: Harness) -> None:
    """A session waiting on a password check is still ended by the session timeout."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(_auth_line("carol", "pw"))
    harness.clock.advance(601)
    assert session.codes()[-1] == (421, "4.4.2") and session.closed
    harness.checker.calls[0][2].callback(True)
    assert session.codes()[-1] == (421, "4.4.2")


def test_client_gone_during_a_deferred_shutdown_writes_nothing(harness: Harness) -> None:
    """If the client leaves while its shutdown waits for the store, nothing more is written."""
    session = harness.connect()
    _deliver(session)
    harness.clock.advance(601)
    session.lose()
    written = session.transport.value()
    harness.queue.calls[0][2].callback("A")
    assert session.transport.value() == written
    assert harness.factory.accepted == 1


# --------------------------------------------------------------------------- memory for text


def _start_data(session: Session, helo: bytes = b"c.test") -> None:
    session.send(b"EHLO " + helo + b"\r\n")
    session.send(TRANSACTION)


def _big_messages(tmp_path: Path) -> Config:
    """The test configuration with room for 100 kB messages."""
    toml = TOML.replace("max_message_size = 2000", "max_message_size = 100000")
    return parse_config(toml, tmp_path)


def test_text_over_the_gateway_budget_is_452_and_never_buffered(tmp_path: Path) -> None:
    """A session whose text would pass the shared budget reads on, holds nothing, gets 452."""
    budget = TextBudget(6000)
    harness = make_harness(_big_messages(tmp_path), text_budget=budget)
    first, second = harness.connect("10.1.1.1"), harness.connect("10.2.2.2")
    _start_data(first)
    _start_data(second)
    first.send(b"a" * 900 + b"\r\n")
    held_by_first = budget.used
    assert 900 < held_by_first < 1200  # the text and its Received: header
    for _ in range(10):  # 5 KiB more would fit alone, but not beside the first session
        second.send(b"b" * 500 + b"\r\n")
        assert budget.used <= budget.limit
    assert budget.used == held_by_first  # the second session holds nothing now
    second.send(b".\r\n")
    assert second.replies()[-1] == SmtpReply(452, "4.3.1", ("Insufficient system storage",))
    assert len(harness.queue.calls) == 0 and budget.refused == 1
    second.send(b"NOOP\r\n")
    assert second.codes()[-1] == (250, "2.0.0")  # the session goes on
    first.send(b".\r\n")
    _, text, d = harness.queue.calls[0]
    assert text.startswith(b"Received: ") and text.endswith(b"\r\n" + b"a" * 900 + b"\r\n")
    assert budget.used == len(text)  # held while the spool writes
    d.callback("A")
    assert budget.used == 0
    second.send(TRANSACTION)
    second.send(dot_stuff((b"b" * 500 + b"\r\n") * 5))
    assert len(harness.queue.calls) == 2  # with room again, the next message is taken


def test_budget_counts_bdat_chunks(tmp_path: Path) -> None:
    """BDAT text counts too: over the budget, the LAST chunk gets 452 4.3.1, nothing stored."""
    budget = TextBudget(1000)
    harness = make_harness(_big_messages(tmp_path), text_budget=budget)
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\n")
    session.send(b"BDAT 600\r\n" + b"x" * 600)
    assert session.codes()[-1] == (250, "2.0.0")
    session.send(b"BDAT 600 LAST\r\n" + b"y" * 600)
    assert session.codes()[-1] == (452, "4.3.1")
    assert harness.queue.calls == [] and budget.used == 0


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(lambda s: s.send(b"bare\nLF\r\n.\r\n"), id="bare-LF"),
        pytest.param(lambda s: s.send((b"z" * 990 + b"\r\n") * 3 + b".\r\n"), id="552"),
        pytest.param(lambda s: s.lose(), id="client-gone"),
        pytest.param(lambda s: s.protocol._timeout("idle"), id="timeout"),
    ],
)
def test_budget_is_given_back_when_the_text_is_refused_or_dropped(
    harness: Harness, ending: Callable[[Session], None]
) -> None:
    """Text the engine refuses, or a session ending in DATA, gives its bytes back."""
    session = harness.connect()
    _start_data(session)
    session.send(b"some text\r\n")
    assert harness.factory.text_budget.used > 0
    ending(session)
    assert harness.factory.text_budget.used == 0
    assert harness.queue.calls == []


def test_budget_is_given_back_after_rset_in_bdat(harness: Harness) -> None:
    """RSET between BDAT chunks drops the text and its reservation."""
    session = harness.connect()
    session.send(b"EHLO c.test\r\n")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\n")
    session.send(b"BDAT 10\r\n0123456789")
    assert harness.factory.text_budget.used > 10
    session.send(b"RSET\r\n")
    assert session.codes()[-1] == (250, "2.0.0")
    assert harness.factory.text_budget.used == 0


def test_budget_is_given_back_when_the_store_fails(harness: Harness) -> None:
    """A failed store gives the text's bytes back, like a successful one."""
    session = harness.connect()
    _deliver(session)
    assert harness.factory.text_budget.used == len(harness.queue.calls[0][1])
    harness.queue.calls[0][2].errback(SpoolError("spool write failed"))
    assert harness.factory.text_budget.used == 0


def test_empty_message_is_stored_as_its_header(harness: Harness) -> None:
    """DATA with no text at all stores the Received: header alone."""
    session = harness.connect()
    _start_data(session)
    session.send(b".\r\n")
    _, text, d = harness.queue.calls[0]
    assert text.startswith(b"Received: from c.test") and text.endswith(b"\r\n")
    assert text.count(b"\r\n") == 3
    d.callback("E")
    assert session.codes()[-1] == (250, "2.0.0")


def test_big_text_is_not_copied_again_for_the_store(tmp_path: Path) -> None:
    """An 8 MiB message peaks well under twice its size in memory (no second full copy)."""
    config = parse_config(
        TOML.replace("max_message_size = 2000", "max_message_size = 20000000"), tmp_path
    )
    harness = make_harness(config)
    session = harness.connect()
    _start_data(session)
    line = b"x" * 510 + b"\r\n"
    block = line * 128  # 64 KiB, as a socket read might bring
    size = 8 * 1024 * 1024
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(size // len(block)):
            session.send(block)
        session.send(b".\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _, text, _ = harness.queue.calls[0]
    assert len(text) > size
    assert peak - before < 1.5 * size


# --------------------------------------------------------------------------- AUTH across sessions


def _fail_auth(harness: Harness, session: Session, index: int) -> None:
    session.send(_auth_line("carol", f"guess{index}"))
    harness.checker.calls[index][2].callback(False)
    harness.clock.advance(1.01)
    assert session.codes()[-1] == (535, "5.7.8")


def test_auth_failures_count_across_sessions(config: Config) -> None:
    """A client that reconnects to guess again gets 454 4.7.0 past the limit, unchecked."""
    harness = make_harness(config, throttle=lambda c: AuthThrottle(c, max_failures=3, window=60))
    for attempt in range(3):
        session = harness.connect("192.0.2.9")
        session.send(b"EHLO c.test\r\n")
        _fail_auth(harness, session, attempt)
        session.lose()
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    session.send(_auth_line("carol", "right"))
    assert len(harness.checker.calls) == 3  # no password check at all
    assert session.codes()[-1] == (250, None)  # still the EHLO reply: refused after a delay
    harness.clock.advance(1.01)
    assert session.replies()[-1] == SmtpReply(
        454, "4.7.0", ("Too many failed authentications, try again later",)
    )
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert session.codes()[-1] == (250, "2.1.5")  # mail to local users still flows
    other = harness.connect("192.0.2.10")
    other.send(b"EHLO c.test\r\n")
    other.send(_auth_line("carol", "right"))
    assert len(harness.checker.calls) == 4  # another address is not affected


def test_auth_failures_age_out(config: Config) -> None:
    """Failures older than the window no longer count: the client may try again."""
    harness = make_harness(config, throttle=lambda c: AuthThrottle(c, max_failures=2, window=30))
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    _fail_auth(harness, session, 0)
    _fail_auth(harness, session, 1)
    session.send(_auth_line("carol", "again"))
    harness.clock.advance(1.01)
    assert session.codes()[-1] == (454, "4.7.0")
    harness.clock.advance(30)
    session.send(_auth_line("carol", "right"))
    assert len(harness.checker.calls) == 3
    harness.checker.calls[2][2].callback(True)
    assert session.codes()[-1] == (235, "2.7.0")


def test_unreadable_users_file_is_454_not_535(harness: Harness) -> None:
    """A users file that cannot be checked answers 454 4.7.0 at once, and counts no failure."""
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    session.send(_auth_line("carol", "pw"))
    harness.checker.calls[0][2].errback(AuthUnavailable("users: Permission denied"))
    assert session.replies()[-1] == SmtpReply(454, "4.7.0", ("Temporary authentication failure",))
    assert harness.factory.auth_throttle.throttle.failures("192.0.2.9") == 0
    assert session.protocol.engine.authenticated_user is None
    session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (250, "2.0.0")


def test_a_failing_password_check_is_454(harness: Harness) -> None:
    """Any other error from the checker is a temporary failure too (and logged)."""
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    session.send(_auth_line("carol", "pw"))
    harness.checker.calls[0][2].errback(RuntimeError("a bug"))
    assert session.codes()[-1] == (454, "4.7.0")
    session.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<x@far.test>\r\n")
    assert session.codes()[-1] == (554, "5.7.1")  # not authenticated


@pytest_twisted.ensureDeferred
async def test_replies_are_not_held_back_by_nagle(harness: Harness) -> None:
    """A real TCP session has TCP_NODELAY set, so small replies leave at once."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    made: list[SmtpServerProtocol] = []
    build = harness.factory.buildProtocol

    def remember(address: Any) -> Any:
        protocol = build(address)
        made.append(protocol)
        return protocol

    harness.factory.buildProtocol = remember  # type: ignore[method-assign]
    port = reactor.listenTCP(0, harness.factory, interface="127.0.0.1")
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Protocol())
        for _ in range(100):
            if made and made[0].transport is not None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        handle = made[0].transport.getHandle()  # type: ignore[union-attr]
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client.transport.loseConnection()
    finally:
        await port.stopListening()


# ---------------------------------------------------------------- AUTH in parallel, authzid, logs


def test_auth_attempts_in_parallel_count_when_they_start(tmp_path: Path) -> None:
    """Twelve sessions sending AUTH at once: only max_failures passwords are checked."""
    users = tmp_path / "users"
    users.write_text("")
    roomy = TOML.replace("max_sessions = 3", "max_sessions = 20").replace(
        "max_sessions_per_client = 2", "max_sessions_per_client = 20"
    )
    config = parse_config(
        roomy + f'auth_users_file = "{users}"\nauth_requires_tls = false\n', tmp_path
    )
    harness = make_harness(config, throttle=lambda c: AuthThrottle(c, max_failures=5, window=60))
    sessions = [make_session(harness) for _ in range(12)]
    for session in sessions:
        session.send(b"EHLO c.test\r\n")
        session.send(_auth_line("carol", "guess"))
    assert len(harness.checker.calls) == 5
    harness.clock.advance(1.01)
    assert [s.codes()[-1] for s in sessions[5:]] == [(454, "4.7.0")] * 7
    for _, _, checked in harness.checker.calls:
        checked.callback(False)
    harness.clock.advance(1.01)
    assert [s.codes()[-1] for s in sessions[:5]] == [(535, "5.7.8")] * 5
    assert harness.factory.auth_throttle.throttle.failures("192.0.2.9") == 5
    assert harness.factory.auth_throttle.throttle.pending("192.0.2.9") == 0


def test_a_successful_attempt_no_longer_counts_once_it_succeeds(config: Config) -> None:
    """An attempt in progress counts against the limit; once it succeeds it counts no more."""
    harness = make_harness(config, throttle=lambda c: AuthThrottle(c, max_failures=1, window=60))
    first, second = make_session(harness), make_session(harness)
    for session in (first, second):
        session.send(b"EHLO c.test\r\n")
    first.send(_auth_line("carol", "right"))
    second.send(_auth_line("carol", "right"))
    assert len(harness.checker.calls) == 1  # the second waits on the first's check
    harness.checker.calls[0][2].callback(True)
    assert first.codes()[-1] == (235, "2.7.0")
    harness.clock.advance(1.01)
    assert second.codes()[-1] == (454, "4.7.0")
    second.send(_auth_line("carol", "right"))
    assert len(harness.checker.calls) == 2  # the success did not count as a failure
    harness.checker.calls[1][2].errback(AuthUnavailable("users: gone"))
    assert harness.factory.auth_throttle.throttle.pending("192.0.2.9") == 0


@implementer(IAuthThrottle)
class ControlledThrottle:
    """begin() hands back a Deferred the test fires, as a worker's link to the spool does."""

    def __init__(self) -> None:
        self.asked: list[Deferred[AuthVerdict]] = []
        self.ended: list[tuple[str, bool]] = []

    def begin(self, client: str) -> Deferred[AuthVerdict]:
        d: Deferred[AuthVerdict] = Deferred()
        self.asked.append(d)
        return d

    def end(self, client: str, failed: bool) -> None:
        self.ended.append((client, failed))


def _asking(config: Config) -> tuple[ControlledThrottle, Harness, Session]:
    """A session whose AUTH waits for the verdict of a throttle the test controls."""
    throttle = ControlledThrottle()
    harness = make_harness(config, auth=throttle)
    session = make_session(harness)
    session.send(b"EHLO c.test\r\n")
    session.send(_auth_line("carol", "guess"))
    return throttle, harness, session


def test_auth_without_a_verdict_is_454_and_checks_nothing(config: Config) -> None:
    """The question fails (a worker's link went): 454 4.7.0 at once, no password checked."""
    throttle, harness, session = _asking(config)
    assert session.codes()[-1] == (250, None)  # waiting for the verdict
    throttle.asked[0].errback(HandoffError("the link to the spool's process went away"))
    assert session.replies()[-1] == SmtpReply(454, "4.7.0", ("Temporary authentication failure",))
    assert harness.checker.calls == [] and throttle.ended == []
    session.send(b"NOOP\r\n")
    assert session.codes()[-1] == (250, "2.0.0")


def test_a_verdict_for_a_session_gone_meanwhile_checks_nothing(config: Config) -> None:
    """The client left while the session asked: the allowed attempt ends, unchecked, unfailed."""
    throttle, harness, session = _asking(config)
    session.lose()
    throttle.asked[0].callback(AuthVerdict(True, 0, 1, 60.0))
    assert harness.checker.calls == [] and throttle.ended == [("192.0.2.9", False)]


def test_a_remote_verdict_logs_the_relay_wide_counts(config: Config) -> None:
    """A refusal's log line names the counts the verdict brought (the spool's process's)."""
    throttle, harness, session = _asking(config)
    with logged_events() as events:
        throttle.asked[0].callback(AuthVerdict(False, 4, 1, 900.0))
    harness.clock.advance(1.01)
    assert session.codes()[-1] == (454, "4.7.0") and harness.checker.calls == []
    assert [formatEvent(e) for e in events] == [
        "smtp: 192.0.2.9 refused AUTH PLAIN for carol: 4 failures in 900s, 1 in progress"
    ]


def make_session(harness: Harness) -> Session:
    """A new session from the untrusted test client 192.0.2.9."""
    return harness.connect("192.0.2.9")


def _plain(authzid: str, user: str, password: str) -> bytes:
    token = f"{authzid}\0{user}\0{password}".encode()
    return b"AUTH PLAIN " + base64.b64encode(token) + b"\r\n"


def test_auth_plain_as_another_identity_is_535(harness: Harness) -> None:
    """AUTH PLAIN admin\\0bob\\0secret is refused (RFC 4616): bob may not act as admin."""
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    session.send(_plain("admin", "bob", "secret"))
    assert harness.checker.calls == []  # refused before any password check
    harness.clock.advance(1.01)
    assert session.codes()[-1] == (535, "5.7.8")
    assert session.protocol.engine.authenticated_user is None
    assert harness.factory.auth_throttle.throttle.failures("192.0.2.9") == 1
    session.send(_plain("bob", "bob", "secret"))  # authzid = the user: allowed
    harness.checker.calls[0][2].callback(True)
    assert session.codes()[-1] == (235, "2.7.0")
    assert session.protocol.engine.authenticated_user == "bob"


def _formatted(events: list[Any]) -> list[str]:
    return [
        formatEvent(event) for event in events if event.get("log_namespace", "").startswith("relay")
    ]


@pytest.mark.parametrize("ok", [True, False])
def test_auth_user_names_are_escaped_in_the_log(harness: Harness, ok: bool) -> None:
    """A user name holding CR LF cannot forge a log line: it is logged escaped."""
    session = harness.connect("192.0.2.9")
    session.send(b"EHLO c.test\r\n")
    with logged_events() as events:
        session.send(_plain("", "bob\r\nsmtp: 192.0.2.9 authenticated as root", "pw"))
        harness.checker.calls[0][2].callback(ok)
        harness.clock.advance(1.01)
        session = harness.connect("192.0.2.9")
        session.send(b"EHLO c.test\r\n")
        session.send(_plain("x\u2028y", "bob", "pw"))
        harness.clock.advance(1.01)
    lines = _formatted(events)
    assert len(lines) == 2
    assert all(line.isprintable() for line in lines), lines
    assert "bob\\r\\nsmtp: 192.0.2.9 authenticated as root" in lines[0]
    assert "act as x\\u2028y" in lines[1]


def test_the_stored_line_escapes_the_clients_words() -> None:
    """log_stored writes the sender and HELO escaped (an SMTPUTF8 address may hold U+2028)."""
    envelope = Envelope(
        return_path=Address("a\u2028forged", "c.test"),
        recipients=(Recipient(Address("alice", "example.test"), Destination("local", "")),),
        arrival=0.0,
        submitter=Submitter("ESMTP", "192.0.2.9", None, "h\x1bost", None, None),
    )
    with logged_events() as events:
        log_stored("0123456789ABCD", envelope, 10)
    (line,) = _formatted(events)
    assert line.isprintable()
    assert "from=<a\\u2028forged@c.test>" in line and "helo=h\\x1bost" in line

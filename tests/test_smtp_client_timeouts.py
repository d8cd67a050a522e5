"""SMTP client timers and flow control, on an injected clock (task.Clock / MemoryReactorClock).

No sockets: the protocol talks to a StringTransport, the channel to a MemoryReactorClock,
and time moves only when the test says so.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.address import Address
from relay.channels.smtp import ReplyTimeouts, SmtpChannel
from relay.channels.smtp.connect import Target, parse_destination
from relay.channels.smtp.protocol import SmtpClientProtocol
from relay.channels.smtp.session import SmtpSession
from relay.dns.mx import MxResolver
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.errors import SessionFailed
from relay.interfaces import IChannel, IChannelSession
from relay.reply import Reply, ReplyCode
from relay.sansio.smtp.client import Data, Ehlo, MailFrom, RcptTo

from support.fakes import BytesMessage

T = TypeVar("T")

ALICE = Recipient(Address("alice", "example.test"))
BOB = Recipient(Address("bob", "example.test"))
SENDER = Address("sender", "origin.test")
EHLO = b"250-server.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that must have fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def pending(d: Deferred[Any]) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


class Harness:
    """A channel on a MemoryReactorClock and one session over a StringTransport."""

    def __init__(self, timeouts: ReplyTimeouts | None = None, ehlo: bytes = EHLO) -> None:
        self.reactor = MemoryReactorClock()
        self.channel = SmtpChannel(
            self.reactor, MxResolver(None), "client.test", timeouts=timeouts or ReplyTimeouts()
        )
        self.proto = SmtpClientProtocol(
            self.reactor, self.channel.timeouts, "mx.test[127.0.0.1]:25"
        )
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.feed(b"220 server.test ESMTP\r\n")
        self.proto.command(Ehlo("client.test"))
        self.feed(ehlo)
        self.transport.clear()
        self.session = SmtpSession(self.channel, Destination("smtp", "example.test"), self.proto)

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def sent(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def message(self, text: bytes = b"Subject: x\r\n\r\nbody\r\n") -> BytesMessage:
        envelope = Envelope(SENDER, (ALICE, BOB), 0.0, Submitter("ESMTP"))
        return BytesMessage("q1", envelope, text)

    def begin(self) -> tuple[Deferred[Reply], Deferred[Reply]]:
        message = self.message()
        result(self.session.begin_message("m", SENDER, message))
        a = self.session.add_recipient(ALICE)
        b = self.session.add_recipient(BOB)
        result(self.session.end_recipients())
        return a, b


def test_session_provides_the_interface() -> None:
    """The channel and its session are IChannel / IChannelSession."""
    h = Harness()
    assert verifyObject(IChannel, h.channel)
    assert verifyObject(IChannelSession, h.session)


def test_pipelined_commands_go_out_before_any_reply() -> None:
    """With PIPELINING, MAIL, both RCPTs and DATA are written before the first reply."""
    h = Harness()
    a, b = h.begin()
    assert h.sent() == (
        b"MAIL FROM:<sender@origin.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    h.feed(b"250 ok\r\n250 2.1.5 ok\r\n450 4.2.0 try later\r\n354 go\r\n")
    assert result(a).code is ReplyCode.AOK
    assert result(b) == Reply(ReplyCode.LOCK, "try later", 450, "4.2.0")
    result(h.session.begin_text())
    result(h.session.write_text(b".x\r\n"))
    final = h.session.end_text()
    assert h.sent() == b"..x\r\n.\r\n"
    h.feed(b"250 2.0.0 queued as X\r\n")
    assert result(final) == Reply(ReplyCode.OK, "queued as X", 250, "2.0.0")


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    """Without PIPELINING the session sends MAIL, then each RCPT, then DATA, one at a time."""
    h = Harness(ehlo=b"250-server.test\r\n250 8BITMIME\r\n")
    a, b = h.begin()
    assert h.sent() == b"MAIL FROM:<sender@origin.test>\r\n"
    h.feed(b"250 ok\r\n")
    assert h.sent() == b"RCPT TO:<alice@example.test>\r\n"
    h.feed(b"550 5.1.1 no\r\n")
    assert h.sent() == b"RCPT TO:<bob@example.test>\r\n"
    h.feed(b"250 ok\r\n")
    assert result(a).code is ReplyCode.USER
    assert result(b).code is ReplyCode.AOK
    text = h.session.begin_text()
    assert h.sent() == b"DATA\r\n"
    assert pending(text)
    h.feed(b"354 go\r\n")
    result(text)


@pytest.mark.parametrize(
    ("field", "seconds", "phase"),
    [("mail", 300.0, "MAIL FROM"), ("rcpt", 300.0, "RCPT TO")],
)
def test_envelope_reply_timeouts(field: str, seconds: float, phase: str) -> None:
    """No reply to MAIL (5 min) or RCPT (5 min): every recipient gets TIME, host marked dead."""
    h = Harness()
    a, b = h.begin()
    if field == "rcpt":
        h.reactor.advance(100)
        h.feed(b"250 ok\r\n")  # MAIL answered at t=100: the RCPT's 5 minutes start now
        h.reactor.advance(seconds - 1)
    else:
        h.reactor.advance(seconds - 1)
    assert pending(a)
    h.reactor.advance(1)
    for d in (a, b):
        reply = result(d)
        assert reply.code is ReplyCode.TIME
        assert f"while sending {phase}" in reply.text
        assert reply.code.is_temporary
    assert h.transport.disconnecting


def test_data_reply_timeout_is_two_minutes() -> None:
    """No 354 within 2 minutes: the final reply for the accepted recipients is TIME."""
    h = Harness()
    a, _ = h.begin()
    h.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    assert result(a).code is ReplyCode.AOK
    text = h.session.begin_text()
    h.reactor.advance(119)
    assert pending(text)
    h.reactor.advance(1)
    result(text)
    reply = result(h.session.end_text())
    assert reply.code is ReplyCode.TIME and "DATA" in reply.text


def _in_text(h: Harness) -> None:
    h.begin()
    h.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    result(h.session.begin_text())
    h.sent()


def test_text_waits_while_the_transport_is_full_and_times_out_after_3_minutes() -> None:
    """A paused transport holds write_text back; undrained for 3 minutes, the text fails TIME."""
    h = Harness()
    _in_text(h)
    assert h.transport.producer is h.proto  # registered for flow control
    h.proto.pauseProducing()
    first = h.session.write_text(b"line one\r\n")
    assert h.sent() == b"line one\r\n"  # written at once; only the caller waits
    assert pending(first)
    h.proto.resumeProducing()
    result(first)
    h.proto.pauseProducing()
    second = h.session.write_text(b"line two\r\n")
    h.reactor.advance(179)
    assert pending(second)
    h.reactor.advance(1)
    result(second)  # fires (the deliverer goes on); the failure is in the final reply
    reply = result(h.session.end_text())
    assert reply.code is ReplyCode.TIME and "message body" in reply.text
    assert h.transport.disconnecting


def test_a_small_text_leaves_with_its_final_dot() -> None:
    """Text that fits the hold goes out with the dot, in one write, when the text ends."""
    h = Harness()
    _in_text(h)
    result(h.session.write_text(b"Subject: x\r\n\r\nbody\r\n"))
    assert h.sent() == b""  # held: the dot comes next in this turn
    h.session.end_text()
    assert h.sent() == b"Subject: x\r\n\r\nbody\r\n.\r\n"


def test_held_text_is_written_by_the_end_of_the_turn() -> None:
    """If the end does not come in the same turn, the held text does not wait for it."""
    h = Harness()
    _in_text(h)
    result(h.session.write_text(b"body\r\n"))
    h.reactor.advance(0)
    assert h.sent() == b"body\r\n"


def test_final_reply_timeout_is_ten_minutes() -> None:
    """No reply to the final dot within 10 minutes: TIME, saying the message may be duplicated."""
    h = Harness()
    _in_text(h)
    result(h.session.write_text(b"body\r\n"))
    final = h.session.end_text()
    h.reactor.advance(599)
    assert pending(final)
    h.reactor.advance(1)
    reply = result(final)
    assert reply.code is ReplyCode.TIME
    assert "more than once" in reply.text


def test_timeouts_are_configurable() -> None:
    """ReplyTimeouts given to the channel replace the RFC defaults."""
    h = Harness(ReplyTimeouts(mail=5.0, rcpt=5.0))
    a, _ = h.begin()
    h.reactor.advance(5)
    assert result(a).code is ReplyCode.TIME


def test_421_mid_transaction_defers_everything_not_final() -> None:
    """A 421 to the second RCPT: first AOK stays, second gets 421 (DHST), DATA never answered."""
    h = Harness()
    a, b = h.begin()
    h.feed(b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
    assert result(a).code is ReplyCode.AOK
    reply_b = result(b)
    assert reply_b.smtp_code == 421 and reply_b.code.is_temporary
    result(h.session.begin_text())
    final = result(h.session.end_text())
    assert final.smtp_code == 421 and final.code.is_temporary
    assert "shutting down" in final.text


def test_a_dropped_connection_is_net_for_every_recipient() -> None:
    """The peer closing after MAIL: each recipient gets NET naming the phase."""
    h = Harness()
    a, b = h.begin()
    h.feed(b"250 ok\r\n")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    for d in (a, b):
        reply = result(d)
        assert reply.code is ReplyCode.NET
        assert reply.text == "lost connection with mx.test[127.0.0.1]:25 while sending RCPT TO"


def test_connect_timeout() -> None:
    """A connection attempt that never completes fails the session with TIME after 30 s."""
    reactor = MemoryReactorClock()
    channel = SmtpChannel(reactor, MxResolver(None), "client.test")
    opened = channel.open_session(Destination("smtp", "[127.0.0.1]:2525"))
    assert reactor.tcpClients[0][:2] == ("127.0.0.1", 2525)
    reactor.advance(29)
    assert pending(opened)
    reactor.advance(1)
    with pytest.raises(SessionFailed) as caught:
        result(opened)
    assert caught.value.reply == Reply(
        ReplyCode.TIME, "connect to [127.0.0.1]:2525: Connection timed out"
    )


def test_greeting_timeout_is_five_minutes() -> None:
    """A server that accepts the connection but never greets: TIME after 5 minutes."""
    reactor = MemoryReactorClock()
    channel = SmtpChannel(reactor, MxResolver(None), "client.test")
    opened = channel.open_session(Destination("smtp", "[127.0.0.1]:2525"))
    factory = reactor.tcpClients[0][2]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    reactor.advance(299)
    assert pending(opened)
    reactor.advance(1)
    with pytest.raises(SessionFailed) as caught:
        result(opened)
    assert caught.value.reply.code is ReplyCode.TIME
    assert "while receiving the initial server greeting" in caught.value.reply.text
    assert transport.disconnecting


def test_refused_connection_fails_the_session_with_dhst() -> None:
    """A refused connection to the only address: SessionFailed with DHST and the reason."""
    reactor = MemoryReactorClock()
    channel = SmtpChannel(reactor, MxResolver(None), "client.test")
    opened = channel.open_session(Destination("smtp", "[127.0.0.1]:2525"))
    connector = reactor.connectors[0]
    reactor.tcpClients[0][2].clientConnectionFailed(
        connector, Failure(error.ConnectionRefusedError())
    )
    with pytest.raises(SessionFailed) as caught:
        result(opened)
    assert caught.value.reply == Reply(
        ReplyCode.DHST, "connect to [127.0.0.1]:2525: Connection refused"
    )


def test_an_idle_cached_connection_is_closed_after_the_idle_timeout() -> None:
    """A parked connection is QUIT after ReplyTimeouts.idle seconds without a new session."""
    h = Harness(ReplyTimeouts(idle=10.0))
    result(h.session.end_session())
    assert h.channel.idle_connections("example.test") == 1
    h.reactor.advance(9.9)
    assert h.sent() == b""
    h.reactor.advance(0.1)
    assert h.sent() == b"QUIT\r\n"
    assert h.channel.idle_connections() == 0


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("example.test", Target("example.test", 25, mx_lookup=True)),
        ("Example.TEST", Target("example.test", 25, mx_lookup=True)),
        ("[192.0.2.1]", Target("192.0.2.1", 25, mx_lookup=False)),
        ("[IPv6:2001:db8::1]", Target("2001:db8::1", 25, mx_lookup=False)),
        ("[mail.example.test]:587", Target("mail.example.test", 587, mx_lookup=False)),
        ("mail.example.test:587", Target("mail.example.test", 587, mx_lookup=True)),
        ("[2001:db8::1]:2526", Target("2001:db8::1", 2526, mx_lookup=False)),
    ],
)
def test_destination_keys_are_read_like_routing_writes_them(key: str, target: Target) -> None:
    """Every destination key form routing produces names the right host, port and lookup."""
    assert parse_destination(key) == target


@pytest.mark.parametrize("key", ["", "[192.0.2.1", "[]:25", "host:0", "host:99999", "[x]y"])
def test_bad_destination_keys_are_refused(key: str) -> None:
    """A malformed destination key is a ValueError (the channel turns it into a failure)."""
    with pytest.raises(ValueError):
        parse_destination(key)


class _NoDelayTransport(StringTransport):
    """A StringTransport that remembers the TCP_NODELAY setting it was given."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def test_commands_are_not_held_back_by_nagle() -> None:
    """The client sets TCP_NODELAY on its connection, so small commands leave at once."""
    reactor = MemoryReactorClock()
    channel = SmtpChannel(reactor, MxResolver(None), "client.test")
    channel.open_session(Destination("smtp", "[127.0.0.1]:2525"))
    proto = reactor.tcpClients[0][2].buildProtocol(None)
    transport = _NoDelayTransport()
    proto.makeConnection(transport)
    assert transport.no_delay


class CountingTransport(StringTransport):
    """Counts write() calls: one per send the protocol makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def _pipelining_protocol(ehlo: bytes = EHLO) -> tuple[SmtpClientProtocol, CountingTransport, Any]:
    reactor = MemoryReactorClock()
    proto = SmtpClientProtocol(reactor, ReplyTimeouts(), "mx.test[127.0.0.1]:25")
    transport = CountingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"220 server.test ESMTP\r\n")
    proto.command(Ehlo("client.test"))
    proto.dataReceived(ehlo)
    transport.clear()
    transport.writes = 0
    return proto, transport, reactor


def test_a_pipelined_group_leaves_in_one_write() -> None:
    """MAIL and the RCPTs wait for DATA, which ends the group: one write for all (RFC 2920)."""
    proto, transport, _ = _pipelining_protocol()
    proto.command(MailFrom(Address("a", "x.test")))
    proto.command(RcptTo(Address("b", "y.test")))
    proto.command(RcptTo(Address("c", "y.test")))
    assert transport.writes == 0
    proto.command(Data())
    assert transport.writes == 1
    assert transport.value() == (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    )


def test_a_held_command_goes_out_at_the_end_of_the_turn() -> None:
    """A MAIL on its own (its reply awaited first) is not kept past the reactor's turn."""
    proto, transport, reactor = _pipelining_protocol()
    proto.command(MailFrom(Address("a", "x.test")))
    assert transport.writes == 0
    reactor.advance(0)
    assert transport.value() == b"MAIL FROM:<a@x.test>\r\n" and transport.writes == 1


def test_without_pipelining_every_command_goes_at_once() -> None:
    """No PIPELINING: MAIL is written at once (nothing may follow it before its reply)."""
    proto, transport, _ = _pipelining_protocol(b"250-server.test\r\n250 8BITMIME\r\n")
    proto.command(MailFrom(Address("a", "x.test")))
    assert transport.value() == b"MAIL FROM:<a@x.test>\r\n"


def test_nothing_held_is_written_after_we_closed_the_connection() -> None:
    """quit() with MAIL unanswered closes at once: the held MAIL must not follow."""
    h = Harness()
    h.proto.command(MailFrom(SENDER))  # held until the end of the turn
    h.proto.quit()
    assert h.transport.disconnecting
    h.reactor.advance(0)
    assert h.transport.value() == b""


def test_nothing_held_is_written_after_a_421() -> None:
    """A 421 makes the connection unusable: held commands are dropped, not written."""
    h = Harness()
    h.proto.command(MailFrom(SENDER))
    h.feed(b"421 4.3.2 closing\r\n")
    h.reactor.advance(0)
    assert b"MAIL" not in h.transport.value()

"""SMTPUTF8 on the way out: needed by what a transaction holds, not by the client's word.

Against the scripted server (tests/smtpserver.py) with and without SMTPUTF8 in its EHLO
reply, and the header scanner (relay/channels/smtp/smtputf8.py) on its own, with
hypothesis over texts and read sizes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.channels.smtp import SmtpChannel, build_smtp_channel
from relay.channels.smtp.smtputf8 import HEADER_LIMIT, header_end, headers_need_smtputf8
from relay.config import parse_config
from relay.envelope import BodyType, Destination
from relay.errors import SpoolError
from relay.interfaces import IMessage, ITextReader
from relay.reply import Action, ReplyCode

from support.fakes import BytesMessage
from support.smtp_harness import Outcome, channel_for, deliver, make_message, serving
from support.smtpserver import Script, ScriptedSmtpFactory

WITH = Script()  # offers SMTPUTF8 (and PIPELINING, SIZE, 8BITMIME)
WITHOUT = Script(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
ASCII_TEXT = b"From: a@origin.test\r\nSubject: plain\r\n\r\nHello.\r\n"
UTF8_SUBJECT = "From: a@origin.test\r\nSubject: Grüße\r\n\r\nHello.\r\n".encode()


def _dest(port: int) -> str:
    return f"[127.0.0.1]:{port}"


async def _send(script: Script, message: BytesMessage) -> tuple[Outcome, ScriptedSmtpFactory]:
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), message)
    return outcome, factory


def _mail(factory: ScriptedSmtpFactory) -> str:
    [session] = factory.sessions
    [tx] = session.transactions
    assert tx.text is not None  # the text went through
    return tx.mail


@pytest_twisted.ensureDeferred
async def test_ascii_message_declared_smtputf8_is_sent_without_it() -> None:
    """All-ASCII addresses and headers, client said SMTPUTF8: sent, no SMTPUTF8, either server."""
    message = make_message(["a@dest.test"], ASCII_TEXT, smtputf8=True)
    for script in (WITHOUT, WITH):
        outcome, factory = await _send(script, message)
        assert outcome.actions() == [Action.COMMIT]
        size = f" SIZE={len(ASCII_TEXT)}" if script is WITH else ""
        assert _mail(factory) == f"FROM:<sender@origin.test>{size}"


@pytest_twisted.ensureDeferred
async def test_declared_utf8_body_with_ascii_headers_does_not_need_smtputf8() -> None:
    """UTF-8 only in the body is 8BITMIME's business: sent to a server without SMTPUTF8."""
    text = "Subject: plain\r\n\r\nGrüße aus Köln\r\n".encode()
    message = make_message(["a@dest.test"], text, smtputf8=True, body_type=BodyType.EIGHT_BIT_MIME)
    outcome, factory = await _send(WITHOUT, message)
    assert outcome.actions() == [Action.COMMIT]
    assert _mail(factory) == "FROM:<sender@origin.test> BODY=8BITMIME"


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [("sender@origin.test", "jörg@dest.test"), ("jörg@origin.test", "a@dest.test")],
    ids=["recipient", "return-path"],
)
@pytest_twisted.ensureDeferred
async def test_utf8_local_part_needs_smtputf8(sender: str, recipient: str) -> None:
    """A non-ASCII local part (recipient or return path): 5.6.7 unsent without it, SMTPUTF8 with."""
    message = make_message([recipient], ASCII_TEXT, sender=sender, smtputf8=True)
    refused, factory = await _send(WITHOUT, message)
    [reply] = refused.replies
    assert (reply.code, reply.smtp_code, reply.effective_enhanced) == (ReplyCode.NDEL, 553, "5.6.7")
    assert "needs SMTPUTF8" in reply.text and "does not offer it" in reply.text
    assert refused.actions() == [Action.BOUNCE]
    assert factory.sessions[0].transactions == []
    sent, factory = await _send(WITH, message)
    assert sent.actions() == [Action.COMMIT]
    assert _mail(factory) == f"FROM:<{sender}> SIZE={len(ASCII_TEXT)} SMTPUTF8"
    assert factory.sessions[0].transactions[0].rcpts == [recipient]


@pytest_twisted.ensureDeferred
async def test_utf8_header_needs_smtputf8() -> None:
    """Raw UTF-8 in the Subject of declared mail: 5.6.7 unsent without SMTPUTF8, sent with it."""
    message = make_message(
        ["a@dest.test"], UTF8_SUBJECT, smtputf8=True, body_type=BodyType.EIGHT_BIT_MIME
    )
    refused, factory = await _send(WITHOUT, message)
    assert refused.replies[0].effective_enhanced == "5.6.7"
    assert refused.actions() == [Action.BOUNCE]
    assert factory.sessions[0].transactions == []
    sent, factory = await _send(WITH, message)
    assert sent.actions() == [Action.COMMIT]
    assert _mail(factory).endswith(" BODY=8BITMIME SMTPUTF8")
    assert factory.sessions[0].transactions[0].text == UTF8_SUBJECT


@pytest_twisted.ensureDeferred
async def test_undeclared_8bit_headers_go_as_they_came() -> None:
    """Legacy 8-bit headers in mail not declared SMTPUTF8 are sent as is, without SMTPUTF8."""
    text = b"Subject: caf\xe9\r\n\r\nbody\r\n"  # Latin-1: not even UTF-8
    message = make_message(["a@dest.test"], text, body_type=BodyType.EIGHT_BIT_MIME)
    for script in (WITHOUT, WITH):
        outcome, factory = await _send(script, message)
        assert outcome.actions() == [Action.COMMIT]
        assert "SMTPUTF8" not in _mail(factory)


def _routed_channel(port: int, tmp_path: Path) -> SmtpChannel:
    config = parse_config(
        f'[relay]\nhostname = "relay.test"\n'
        f'[[route]]\ndomain = "dest.test"\nsmarthost = "[127.0.0.1]:{port}"\n',
        tmp_path,
    )
    return build_smtp_channel(config, reactor, resolver=object())


@pytest_twisted.ensureDeferred
async def test_utf8_recipient_of_another_destination_does_not_count(tmp_path: Path) -> None:
    """A UTF-8 recipient routed elsewhere does not make this destination's transaction need it."""
    message = make_message(["a@dest.test", "jörg@other.test"], ASCII_TEXT, smtputf8=True)
    async with serving(WITHOUT) as (port, factory):
        channel = _routed_channel(port, tmp_path)
        session = await channel.open_session(Destination("smtp", _dest(port)))
        await session.begin_message("m", message.envelope.return_path, message)
        reply = await session.add_recipient(message.envelope.recipients[0])
        await session.end_recipients()
        await session.begin_text()
        await session.write_text(ASCII_TEXT)
        final = await session.end_text()
        await session.end_session()
        await channel.close_idle()
    assert reply.code is ReplyCode.AOK and final.code is ReplyCode.OK
    assert "SMTPUTF8" not in _mail(factory)
    assert factory.sessions[0].transactions[0].rcpts == ["a@dest.test"]


@pytest_twisted.ensureDeferred
async def test_without_a_router_an_unrouted_utf8_recipient_counts() -> None:
    """A channel without routes cannot tell where an unrouted recipient goes: it counts."""
    message = make_message(["a@dest.test", "jörg@other.test"], ASCII_TEXT, smtputf8=True)
    refused, _ = await _send(WITHOUT, message)
    assert [r.effective_enhanced for r in refused.replies] == ["5.6.7", "5.6.7"]


@pytest_twisted.ensureDeferred
async def test_a_utf8_recipient_the_envelope_sends_elsewhere_waits() -> None:
    """A UTF-8 recipient queued for another destination but given here: AGN, no RCPT sent."""
    base = make_message(["a@dest.test", "jörg@dest.test"], ASCII_TEXT, smtputf8=True)
    a, jorg = base.envelope.recipients
    jorg = dataclasses.replace(jorg, destination=Destination("smtp", "elsewhere.test"))
    envelope = dataclasses.replace(base.envelope, recipients=(a, jorg))
    message = BytesMessage("q1", envelope, ASCII_TEXT)
    outcome, factory = await _send(WITH, message)
    assert outcome.replies[0].code is ReplyCode.AOK
    assert outcome.replies[1].code is ReplyCode.AGN and "needs SMTPUTF8" in outcome.replies[1].text
    assert outcome.actions() == [Action.COMMIT, Action.RETRY]
    assert "SMTPUTF8" not in _mail(factory)
    assert factory.sessions[0].transactions[0].rcpts == ["a@dest.test"]


@implementer(ITextReader)
class _BrokenReader:
    closed = False

    def read(self, max_bytes: int) -> Deferred[bytes]:
        return defer.fail(SpoolError("q1: text damaged on disk"))

    def close(self) -> None:
        self.closed = True


@implementer(IMessage)
class _UnreadableMessage(BytesMessage):
    def open_text(self) -> _BrokenReader:
        return _BrokenReader()


@pytest_twisted.ensureDeferred
async def test_unreadable_headers_defer_every_address_unsent() -> None:
    """Declared mail whose text cannot be read: FIO (temporary) for all, no MAIL sent."""
    plain = make_message(["a@dest.test", "b@dest.test"], ASCII_TEXT, smtputf8=True)
    message = _UnreadableMessage("q1", plain.envelope, ASCII_TEXT)
    outcome, factory = await _send(WITH, message)
    assert [r.code for r in outcome.replies] == [ReplyCode.FIO] * 2
    assert "text damaged on disk" in outcome.replies[0].text
    assert outcome.actions() == [Action.RETRY] * 2
    assert factory.sessions[0].transactions == []


# --- the header scanner -------------------------------------------------------------------


@implementer(ITextReader)
class _ShortReads:
    """Reads ``text`` in pieces no longer than the next of ``sizes`` (cycled)."""

    def __init__(self, text: bytes, sizes: list[int]) -> None:
        self.text, self.sizes = text, sizes
        self.position = 0
        self.reads = 0
        self.closed = False

    def read(self, max_bytes: int) -> Deferred[bytes]:
        assert not self.closed and max_bytes > 0
        size = min(max_bytes, self.sizes[self.reads % len(self.sizes)])
        self.reads += 1
        chunk = self.text[self.position : self.position + size]
        self.position += len(chunk)
        return defer.succeed(chunk)

    def close(self) -> None:
        self.closed = True


@implementer(IMessage)
class _ShortReadMessage(BytesMessage):
    sizes: list[int] = [7]
    last: _ShortReads | None = None

    def open_text(self) -> _ShortReads:
        self.last = _ShortReads(self.text, self.sizes)
        return self.last


def _message(text: bytes, sizes: list[int]) -> _ShortReadMessage:
    message = _ShortReadMessage("q1", make_message(["a@b.test"]).envelope, text)
    message.sizes = sizes
    return message


def _expected(text: bytes, limit: int) -> bool:
    """The specification: non-ASCII before the first empty line, within ``limit`` octets."""
    window = text[:limit]
    end = header_end(window)
    return not window[: len(window) if end is None else end].isascii()


@pytest_twisted.ensureDeferred
async def test_the_body_is_not_read() -> None:
    """The scan stops at the empty line: a non-ASCII body neither counts nor gets read."""
    text = b"Subject: x\r\n\r\n" + "ü".encode() * 50_000
    message = _message(text, [4096])
    assert not await headers_need_smtputf8(message)
    assert message.last is not None and message.last.closed
    assert message.last.position <= 4096


@pytest_twisted.ensureDeferred
async def test_the_scan_is_bounded() -> None:
    """A header section longer than the limit is judged by its first HEADER_LIMIT octets."""
    text = b"X-Long: " + b"a" * HEADER_LIMIT + "Subject: ü\r\n\r\n".encode()
    message = _message(text, [16384])
    assert not await headers_need_smtputf8(message)
    assert message.last is not None and message.last.position == HEADER_LIMIT
    assert message.last.closed


@pytest.mark.parametrize(
    ("text", "end"),
    [
        (b"\r\nbody", 0),
        (b"\nbody", 0),
        (b"A: 1\r\n\r\nbody", 6),
        (b"A: 1\n\nbody", 5),
        (b"A: 1\r\nB: 2\r\n", None),
        (b"", None),
    ],
)
def test_header_end(text: bytes, end: int | None) -> None:
    """header_end finds the octet after the last header line's end, CRLF or bare LF."""
    assert header_end(text) == end


_pieces = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b"Subject: x", b": ", b"a", "ü".encode(), b"\xff", b"\r\n\r\n"]
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(_pieces, max_size=30).map(b"".join),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    limit=st.integers(1, 80),
)
def test_header_scan_matches_its_specification(text: bytes, sizes: list[int], limit: int) -> None:
    """For any text, read sizes and limit: the answer is the spec's, never reading past limit."""
    message = _message(text, sizes)
    got: list[bool] = []
    defer.ensureDeferred(headers_need_smtputf8(message, limit)).addCallback(got.append)
    assert got == [_expected(text, limit)]
    assert message.last is not None and message.last.closed
    assert message.last.position <= limit

"""The SMTP channel against Postfix's real smtp-sink(1), with its failure-injection options.

smtp-sink is a second, independent SMTP implementation: ``-r CMD`` / ``-f CMD`` make a
command fail with 4xx / 5xx, ``-q CMD`` disconnects without a reply, ``-Q CMD`` says
421 and disconnects, ``-p`` / ``-8`` / ``-e`` turn off PIPELINING / 8BITMIME / ESMTP,
``-D FILE`` appends every received message to FILE (which shows the dot-stuffing came
out right).  smtp-sink has no option that rejects only some recipients; the scripted
server (test_smtp_client_scripted.py) covers that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from relay.channels.smtp import build_smtp_channel
from relay.config import parse_config
from relay.envelope import BodyType
from relay.reply import Action, ReplyCode

from smtp_harness import channel_for, deliver, make_message
from smtpsink import Sink, SinkPool

A, B, C = "a@dest.test", "b@dest.test", "c@dest.test"
StartSink = Callable[..., Sink]


@pytest.fixture
def start_sink() -> Iterator[StartSink]:
    """Start smtp-sink with the given options; every sink is stopped after the test."""
    pool = SinkPool()
    yield pool.start
    pool.stop()


@pytest_twisted.ensureDeferred
async def test_all_accepted_and_the_text_arrives_intact(start_sink: StartSink) -> None:
    """smtp-sink accepting everything: AOK each, final OK, dump holds envelope and text."""
    sink = start_sink()
    text = b"Subject: sink\r\n\r\n.one dot\r\n..two dots\r\n.\r\nend"
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B, C], text))
    assert [r.code for r in outcome.replies] == [ReplyCode.AOK] * 3
    assert outcome.final is not None and outcome.final.smtp_code == 250
    assert outcome.actions() == [Action.COMMIT] * 3
    dumped = sink.dumped()
    assert "X-Mail-Args: <sender@origin.test>" in dumped
    assert [line for line in dumped.splitlines() if line.startswith("X-Rcpt-Args")] == [
        f"X-Rcpt-Args: <{r}>" for r in (A, B, C)
    ]
    assert "\n.one dot\n..two dots\n.\nend\n" in dumped


@pytest_twisted.ensureDeferred
async def test_soft_rejected_rcpt_defers(start_sink: StartSink) -> None:
    """-r RCPT: every RCPT gets 450 4.3.0: all recipients deferred, no text sent."""
    sink = start_sink("-r", "RCPT")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert [(r.smtp_code, r.enhanced) for r in outcome.replies] == [(450, "4.3.0")] * 2
    assert all(r.text == "Error: command failed" for r in outcome.replies)
    assert outcome.final is None
    assert outcome.actions() == [Action.RETRY] * 2
    assert "X-Rcpt-Args" not in sink.dumped()


@pytest_twisted.ensureDeferred
async def test_hard_rejected_rcpt_bounces_with_a_custom_reply(start_sink: StartSink) -> None:
    """-f RCPT with -B: the server's own code, status and words are each recipient's reply."""
    sink = start_sink("-f", "RCPT", "-B", "550 5.1.1 No such user here")
    outcome = await deliver(channel_for(), sink.destination, make_message([A]))
    [reply] = outcome.replies
    assert (reply.code, reply.smtp_code, reply.enhanced, reply.text) == (
        ReplyCode.USER,
        550,
        "5.1.1",
        "No such user here",
    )
    assert outcome.actions() == [Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_rejected_mail_from_bounces_everyone(start_sink: StartSink) -> None:
    """-f MAIL: the 5xx to MAIL FROM is every recipient's (permanent) reply."""
    sink = start_sink("-f", "MAIL")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert [r.smtp_code for r in outcome.replies] == [500, 500]
    assert outcome.actions() == [Action.BOUNCE] * 2


@pytest_twisted.ensureDeferred
async def test_rejected_data_is_the_final_reply(start_sink: StartSink) -> None:
    """-f DATA: the recipients were AOK; the 5xx to DATA bounces them."""
    sink = start_sink("-f", "DATA")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert [r.code for r in outcome.replies] == [ReplyCode.AOK] * 2
    assert outcome.final is not None and outcome.final.smtp_code == 500
    assert outcome.actions() == [Action.BOUNCE] * 2


@pytest_twisted.ensureDeferred
async def test_soft_rejected_final_dot_defers(start_sink: StartSink) -> None:
    """-r .: a 4xx after the text defers every accepted recipient."""
    sink = start_sink("-r", ".")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert outcome.final is not None and outcome.final.smtp_code == 450
    assert outcome.actions() == [Action.RETRY] * 2


@pytest_twisted.ensureDeferred
async def test_disconnect_after_rcpt_defers_with_net(start_sink: StartSink) -> None:
    """-q RCPT: the server hangs up on RCPT; NET (host dead) for every recipient."""
    sink = start_sink("-q", "RCPT")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert [r.code for r in outcome.replies] == [ReplyCode.NET] * 2
    assert "while sending RCPT TO" in outcome.replies[0].text
    assert outcome.actions() == [Action.HOST_DEAD] * 2


@pytest_twisted.ensureDeferred
async def test_disconnect_at_the_final_dot_warns_of_duplicates(start_sink: StartSink) -> None:
    """-q .: no reply to the end of data: NET, saying the message may be sent twice."""
    sink = start_sink("-q", ".")
    outcome = await deliver(channel_for(), sink.destination, make_message([A]))
    assert outcome.final is not None and outcome.final.code is ReplyCode.NET
    assert "more than once" in outcome.final.text
    assert outcome.actions() == [Action.HOST_DEAD]


@pytest_twisted.ensureDeferred
async def test_421_to_mail_defers_everyone(start_sink: StartSink) -> None:
    """-Q MAIL: 421 and a hang-up: every recipient deferred with the server's 421."""
    sink = start_sink("-Q", "MAIL")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert [(r.smtp_code, r.code) for r in outcome.replies] == [(421, ReplyCode.DHST)] * 2
    assert outcome.actions() == [Action.HOST_DEAD] * 2


@pytest_twisted.ensureDeferred
async def test_greeting_rejection_fails_the_session(start_sink: StartSink) -> None:
    """-f CONNECT: a 5xx greeting: the session fails, recipients deferred (not bounced)."""
    sink = start_sink("-f", "CONNECT")
    outcome = await deliver(channel_for(), sink.destination, make_message([A]))
    assert outcome.session_failed
    assert "refused to talk to me: 500 5.3.0" in outcome.replies[0].text
    assert outcome.actions() == [Action.HOST_DEAD]


@pytest_twisted.ensureDeferred
async def test_no_pipelining_still_delivers(start_sink: StartSink) -> None:
    """-p: without PIPELINING the channel goes command by command and delivers."""
    sink = start_sink("-p")
    outcome = await deliver(channel_for(), sink.destination, make_message([A, B]))
    assert outcome.actions() == [Action.COMMIT] * 2
    assert sink.dumped().count("X-Rcpt-Args") == 2


@pytest_twisted.ensureDeferred
async def test_no_esmtp_falls_back_to_helo(start_sink: StartSink) -> None:
    """-e: EHLO is refused, HELO works, the mail is delivered."""
    sink = start_sink("-e")
    outcome = await deliver(channel_for(), sink.destination, make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    assert "X-Client-Proto: SMTP" in sink.dumped()


@pytest_twisted.ensureDeferred
async def test_8bit_message_to_a_server_without_8bitmime_bounces(start_sink: StartSink) -> None:
    """-8: an 8-bit message bounces with 5.6.3 and is never sent; with 8BITMIME it goes."""
    message = make_message(
        [A], "Subject: ü\r\n\r\nñ\r\n".encode(), body_type=BodyType.EIGHT_BIT_MIME
    )
    plain = start_sink("-8")
    refused = await deliver(channel_for(), plain.destination, message)
    assert refused.replies[0].effective_enhanced == "5.6.3"
    assert refused.actions() == [Action.BOUNCE]
    assert plain.dumped() == ""
    capable = start_sink()
    sent = await deliver(channel_for(), capable.destination, message)
    assert sent.actions() == [Action.COMMIT]
    assert "X-Mail-Args: <sender@origin.test> BODY=8BITMIME" in capable.dumped()


@pytest_twisted.ensureDeferred
async def test_null_sender_and_envid(start_sink: StartSink) -> None:
    """A bounce (null sender) with an ENVID goes out as MAIL FROM:<> ENVID=... (DSN offered)."""
    sink = start_sink()
    message = make_message([A], sender=None, env_id="queue+id=1")
    outcome = await deliver(channel_for(), sink.destination, message)
    assert outcome.actions() == [Action.COMMIT]
    assert "X-Mail-Args: <> ENVID=queue+2Bid+3D1" in sink.dumped()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("limit", [998, 100, 0])
async def test_long_lines_arrive_broken_at_the_configured_limit(
    start_sink: StartSink, tmp_path: Path, limit: int
) -> None:
    """[smtp_client] line_length_limit: a 3 000-octet line reaches smtp-sink in CRLF SP
    pieces of at most the limit (the space counted), or whole with 0."""
    sink = start_sink()
    config = parse_config(
        f'[relay]\nhostname = "client.test"\n[smtp_client]\nline_length_limit = {limit}\n',
        tmp_path,
    )
    channel = build_smtp_channel(config, reactor, resolver=object())
    line = bytes(48 + i % 75 for i in range(3000))
    text = b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n"
    outcome = await deliver(channel, sink.destination, make_message([A], text))
    assert outcome.actions() == [Action.COMMIT]
    if limit:
        pieces = [line[:limit]] + [
            b" " + line[at : at + limit - 1] for at in range(limit, len(line), limit - 1)
        ]
    else:
        pieces = [line]
    assert b"\n\n" + b"\n".join(pieces) + b"\nend\n" in sink.dump.read_bytes()

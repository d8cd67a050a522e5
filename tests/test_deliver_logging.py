"""One log event per recipient disposition: a Postfix-like line, and fields that make JSON."""

from __future__ import annotations

import json

from twisted.logger import LogEvent, Logger, eventAsJSON, eventFromJSON, formatEvent

from relay.address import Address, parse_reverse_path
from relay.channels.discard import DiscardChannel
from relay.deliver.logging import DispositionStatus, log_disposition
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.errors import SessionFailed
from relay.interfaces import SequencingMode
from relay.reply import Reply, ReplyCode

from test_deliver_fakes import PER_ADDRESS, Harness, ScriptedChannel, envelope

FIELDS = {
    "queue_id": str,
    "recipient": str,
    "channel": str,
    "destination": str,
    "reply": str,
    "reply_code": str,
    "smtp_code": int,
    "enhanced": str,
    "delay": float,
    "attempt": int,
    "status": str,
}


def _harness() -> tuple[Harness, str]:
    replies = {
        "ok@dest.test": Reply(ReplyCode.MOK),
        "later@dest.test": Reply(ReplyCode.LOCK, "mailbox busy"),
        "gone@dest.test": Reply(ReplyCode.USER, "no such user"),
    }
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: replies[str(r.address)])
    harness = Harness(channel, DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT, name="smtp"))
    harness.start()
    harness.advance(90)
    queue_id = harness.store(envelope("ok@dest.test", "later@dest.test", "gone@dest.test"))
    return harness, queue_id


def test_one_event_per_disposition_with_every_field() -> None:
    """Each recipient's disposition is one event carrying every documented field."""
    harness, queue_id = _harness()
    events = [e for e in harness.dispositions() if e["queue_id"] == queue_id]
    assert [(e["recipient"], e["status"]) for e in events] == [
        ("ok@dest.test", "sent"),
        ("later@dest.test", "deferred"),
        ("gone@dest.test", "bounced"),
    ]
    for event in events:
        for name, kind in FIELDS.items():
            assert isinstance(event[name], kind), name
        assert event["channel"] == "fake" and event["destination"] == "dest.test"
        assert event["attempt"] == 1
    assert events[1]["reply"] == "450 4.2.0 mailbox busy [LOCK]"
    assert events[2]["reply_code"] == "USER" and events[2]["smtp_code"] == 550


def test_the_event_formats_as_a_postfix_like_line() -> None:
    """formatEvent gives the queue id, to=<>, relay=, delay=, attempt= and status (reply)."""
    harness, queue_id = _harness()
    lines = [formatEvent(e) for e in harness.dispositions() if e["queue_id"] == queue_id]
    assert lines[2] == (
        f"{queue_id}: to=<gone@dest.test>, relay=fake:dest.test, delay=0.00, attempt=1, "
        "status=bounced (550 5.1.1 no such user [USER])"
    )


def test_the_event_is_json_and_round_trips() -> None:
    """eventAsJSON works on the event; the JSON holds the fields and formats the same back."""
    harness, _ = _harness()
    for event in harness.dispositions():
        text = eventAsJSON(event)
        data = json.loads(text)
        for name, kind in FIELDS.items():
            assert isinstance(data[name], kind), name
        assert data["status"] == event["status"]
        assert formatEvent(eventFromJSON(text)) == formatEvent(event)


def test_delay_counts_from_arrival() -> None:
    """delay is the seconds since the message arrived, at the retry too."""
    harness, _ = _harness()
    harness.advance(300)
    retry = [e for e in harness.dispositions() if e["recipient"] == "later@dest.test"]
    assert [e["delay"] for e in retry] == [0.0, 300.0]
    assert [e["attempt"] for e in retry] == [1, 2]


def test_unrouted_failures_log_no_relay() -> None:
    """A recipient without a route logs relay=none: and the router's reason."""
    harness = Harness(DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT, name="smtp")).start()
    harness.store(envelope("user@here.test", destination=None))
    (event,) = [e for e in harness.dispositions() if e["recipient"] == "user@here.test"]
    assert event["channel"] == "none" and event["status"] == "bounced"
    assert "relay=none:," in formatEvent(event)


def test_a_recipient_destination_override_is_logged() -> None:
    """The destination logged is where the recipient went, with its host."""
    smtp = ScriptedChannel(PER_ADDRESS, "smtp")
    harness = Harness(smtp).start()
    harness.store(envelope("a@far.test", destination=None))
    (event,) = harness.dispositions()
    assert (event["channel"], event["destination"]) == ("smtp", "far.test")
    assert smtp.calls[0].detail == Destination("smtp", "far.test")


def test_addresses_and_remote_reply_texts_are_logged_escaped() -> None:
    """A recipient, ORCPT or remote reply holding a line separator is logged as one line."""
    log = Logger(observer=lambda event: seen.append(event))
    seen: list[LogEvent] = []
    recipient = Recipient(Address("a\u2028b", "dest.test"), original="rfc822;x\r\ny@dest.test")
    reply = Reply(ReplyCode.USER, "no such\u0085user \x1b[31m", 550, "5.1.1")
    log_disposition(
        log,
        queue_id="0123456789ABCD",
        recipient=recipient,
        destination=Destination("smtp", "dest.test"),
        reply=reply,
        status=DispositionStatus.BOUNCED,
        delay=1.0,
        attempt=1,
    )
    (event,) = seen
    line = formatEvent(event)
    assert line.isprintable(), line
    assert "to=<a\\u2028b@dest.test>" in line
    assert "(550 5.1.1 no such\\x85user \\x1b[31m [USER])" in line
    assert event["orig_recipient"] == "rfc822;x\\r\\ny@dest.test"


def test_the_bounce_notice_line_escapes_the_senders_address() -> None:
    """The "notice queued" line names the sender (an SMTPUTF8 address may hold U+2028) escaped."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.USER))
    harness = Harness(channel, DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT, name="smtp"))
    harness.start()
    sender = Envelope(
        return_path=parse_reverse_path("<a\u2028forged@origin.test>", smtputf8=True),
        recipients=envelope("gone@dest.test").recipients,
        arrival=0.0,
        submitter=Submitter("ESMTP"),
        smtputf8=True,
    )
    harness.store(sender)
    lines = [formatEvent(e) for e in harness.events if "notice queued" in formatEvent(e)]
    assert len(lines) == 1 and lines[0].isprintable(), lines
    assert "for <a\\u2028forged@origin.test>" in lines[0]


def test_a_resting_destination_is_logged_with_the_reply_escaped() -> None:
    """The "rests until" line carries the remote's reply text on one escaped line."""
    channel = ScriptedChannel(PER_ADDRESS)
    refusal = Reply(ReplyCode.DHST, "connection\u2028refused")
    channel.answers["open_session"] = lambda destination: SessionFailed(refusal)
    harness = Harness(channel, DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT, name="smtp"))
    harness.start()
    harness.store(envelope("a@dest.test"))
    lines = [formatEvent(e) for e in harness.events if "rests until" in formatEvent(e)]
    assert len(lines) == 1 and lines[0].isprintable(), lines
    assert "connection\\u2028refused" in lines[0]

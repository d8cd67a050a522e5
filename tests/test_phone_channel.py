"""The phone channel's pieces in the relay: the channel, its store, the call log, the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from relay.address import parse_forward_path, parse_reverse_path
from relay.channels.phone.calllog import CallLog, CallRecord, read_calls
from relay.channels.phone.channel import PhoneChannel
from relay.channels.phone.held import HeldMessage
from relay.channels.phone.inbox import count_hops
from relay.channels.phone.store import SpoolPhoneStore
from relay.cli.phone_commands import exit_code, format_call, format_calls
from relay.config import ConfigError, parse_config
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.errors import SessionFailed
from relay.interfaces import IChannel, IPhoneStore, IReadSession, SequencingMode
from relay.queue.protocol import ProtocolError, Request, parse_request
from relay.reply import Action, Reply, ReplyCode

_BASE = """
[relay]
hostname = "hub-a.example.test"
[phone.sites.b]
secret_file = "secret"
"""


def _config(tmp_path: Path, extra: str = "", site: str = "") -> object:
    (tmp_path / "secret").write_text("s\n")
    return parse_config(_BASE + site + extra, tmp_path)


def test_channel_provides_ichannel_in_address_then_text_mode() -> None:
    """The phone channel is an IChannel in address-then-text mode, named phone."""
    channel = PhoneChannel(frozenset({"b"}))
    assert verifyObject(IChannel, channel)
    assert channel.name == "phone" and channel.mode is SequencingMode.ADDRESS_THEN_TEXT


def test_open_session_asks_for_a_call_and_defers_without_marking_the_site_dead() -> None:
    """Outside a call the deliverer's mail waits: AGN (retry, not host-dead), call asked."""
    asked: list[str] = []
    channel = PhoneChannel(frozenset({"b"}))
    channel.add_listener(asked.append)
    failures: list[SessionFailed] = []
    channel.open_session(Destination("phone", "b")).addErrback(lambda f: failures.append(f.value))
    channel.open_session(Destination("phone", "calls-in")).addErrback(
        lambda f: failures.append(f.value)
    )
    assert asked == ["b", "calls-in"]
    assert [f.reply.code for f in failures] == [ReplyCode.AGN, ReplyCode.AGN]
    assert all(f.reply.code.action is Action.RETRY for f in failures)
    assert "next call to b" in failures[0].reply.text
    assert "waiting for calls-in to call" in failures[1].reply.text


def test_spool_store_is_an_iphonestore() -> None:
    """The relay's store for the link is a real IPhoneStore."""
    store = SpoolPhoneStore(object(), object())  # type: ignore[arg-type]
    assert verifyObject(IPhoneStore, store)


@pytest.mark.parametrize(
    ("text", "hops"),
    [
        (b"Subject: x\r\n\r\nReceived: in the body\r\n", 0),
        (b"Received: a\r\nreceived: b\r\nRECEIVED: c\r\n\r\n", 3),
        (b"Received: a\r\n\tfolded\r\nX: y", 1),
        (b"", 0),
    ],
)
def test_hops_are_counted_in_the_header_only(text: bytes, hops: int) -> None:
    """Hop counting counts Received: lines of the header, in any case, never the body."""
    assert count_hops(text) == hops


def test_phone_keys_are_read(tmp_path: Path) -> None:
    """[phone] name and the site keys are read with their defaults and conversions."""
    config = _config(
        tmp_path,
        site=(
            'transport = "tcp:127.0.0.1:2600"\npoll = ["14:00", "02:30"]\n'
            'call_window = "22:00-06:00"\ngather_delay = "10s"\nmax_call_time = "5m"\n'
            "compression = false\nencryption = true\nmax_message_size = 1000\n"
        ),
    )
    site = config.phone.sites["b"]  # type: ignore[attr-defined]
    assert config.phone.name == "hub-a"  # type: ignore[attr-defined]
    assert site.poll_times == (2 * 3600 + 1800, 14 * 3600) and site.poll is None
    assert site.call_window == (22 * 3600, 6 * 3600)
    assert (site.gather_delay, site.max_call_time) == (10.0, 300.0)
    assert (site.compression, site.encryption, site.max_message_size) == (False, True, 1000)


def test_phone_key_defaults(tmp_path: Path) -> None:
    """Without the keys: compression on, encryption off, a 30 s gathering delay."""
    config = _config(tmp_path, '[phone]\nname = "hub"\n')
    site = config.phone.sites["b"]  # type: ignore[attr-defined]
    assert config.phone.name == "hub"  # type: ignore[attr-defined]
    assert (site.compression, site.encryption, site.gather_delay) == (True, False, 30.0)
    assert site.poll is None and site.poll_times == () and site.call_window is None


@pytest.mark.parametrize(
    "site",
    [
        'transport = "tcp:h:1"\ncall_window = "22:00"\n',
        'transport = "tcp:h:1"\ncall_window = "25:00-01:00"\n',
        'transport = "tcp:h:1"\npoll = ["2:3"]\n',
        'poll = "5m"\n',  # a poll needs a transport
        'transport = "tcp:h:1"\ncompression = "yes"\n',
        'transport = "tcp:h:1"\npoll = "5m"\nschedule = "5m"\n',
    ],
)
def test_bad_phone_keys_are_refused(tmp_path: Path, site: str) -> None:
    """A bad window, time of day, poll without transport or boolean is a config error."""
    with pytest.raises(ConfigError):
        _config(tmp_path, site=site)


def test_call_log_round_trip_and_limit(tmp_path: Path) -> None:
    """Call records written to the log are read back, newest last, bad lines skipped."""
    from twisted.internet import reactor

    log = CallLog(tmp_path, reactor)
    log.path.parent.mkdir(parents=True)
    records = [CallRecord(f"s{i}", "out", float(i), 1.5, "completed", "") for i in range(3)]
    with log.path.open("w") as f:
        for record in records:
            f.write(json.dumps(record.to_dict()) + "\n")
        f.write("not json\n")
    assert read_calls(tmp_path) == records
    assert read_calls(tmp_path, 2) == records[1:]
    assert read_calls(tmp_path / "nowhere") == []


def test_call_summary_and_exit_codes() -> None:
    """relay call's summary names the result and figures; its exit code follows sysexits."""
    record = CallRecord("b", "out", 0.0, 2.0, "completed", "", 3, 1, 300, 100, 500, 200, 0.5, 2)
    text = format_call(record)
    assert "completed" in text and "3 messages, 300 bytes" in text and "0.500" in text
    assert exit_code(record) == 0
    assert exit_code(CallRecord("b", "out", 0, 0, "no-connection", "busy")) == 75
    assert exit_code(CallRecord("b", "out", 0, 0, "auth-failed", "")) == 77
    assert exit_code(CallRecord("b", "out", 0, 0, "version-mismatch", "")) == 76
    assert "No calls" in format_calls([]) and "b " in format_calls([record])


def test_control_call_request_is_checked() -> None:
    """The control socket's call op names a site; anything else is refused."""
    assert parse_request({"op": "call", "site": "b"}) == Request("call", site="b")
    assert Request("call", site="b").to_json() == {"op": "call", "site": "b"}
    for bad in ({"op": "call"}, {"op": "call", "site": ""}, {"op": "call", "site": "a\nb"}):
        with pytest.raises(ProtocolError):
            parse_request(bad)


def _held(tmp_path: Path, text: bytes) -> HeldMessage:
    from twisted.internet import reactor

    path = tmp_path / "ID.text"
    path.write_bytes(text)
    envelope = Envelope(
        parse_reverse_path("<a@x.test>"),
        (Recipient(parse_forward_path("<b@y.test>")), Recipient(parse_forward_path("<c@y.test>"))),
        0.0,
        Submitter("phone"),
    )
    return HeldMessage(path, envelope, reactor)


@pytest_twisted.ensureDeferred
async def test_held_message_is_a_read_session_of_one_message(tmp_path: Path) -> None:
    """The read side gives the message once, its addresses, its text in chunks, and
    drops the link's copy once the queue has it."""
    text = bytes(range(256)) * 700  # more than one chunk
    held = _held(tmp_path, text)
    assert verifyObject(IReadSession, held)
    assert await held.next_message() == ("m", parse_reverse_path("<a@x.test>"))
    assert await held.next_message() is None
    addresses = []
    while (recipient := await held.next_recipient()) is not None:
        addresses.append(str(recipient.address))
        await held.answer_recipient(Reply(ReplyCode.AOK))
    assert addresses == ["b@y.test", "c@y.test"] and len(held.replies) == 2
    await held.begin_text()
    chunks = []
    while chunk := await held.read_text():
        chunks.append(chunk)
    assert b"".join(chunks) == text and len(chunks) > 1
    await held.answer_message(Reply(ReplyCode.FSPC, "disk full"))
    assert (tmp_path / "ID.text").exists()  # not stored: kept for the next start
    await held.answer_message(Reply(ReplyCode.OK))
    assert not (tmp_path / "ID.text").exists()


@pytest_twisted.ensureDeferred
async def test_held_message_abort_drops_the_copy(tmp_path: Path) -> None:
    """A message refused for good (a loop) is dropped from the link's directory."""
    held = _held(tmp_path, b"Subject: x\r\n\r\nbody\r\n")
    await held.abort_message()
    assert not (tmp_path / "ID.text").exists()

"""End to end: two ``twistd relay`` processes exchange mail by phone over the line emulator.

The hub answers on one end of an emulated 115 200 bit/s line (a pseudo-terminal opened
through Twisted's SerialPort), the site calls on the other (``relay call``).  Messages
are small, so the calls take seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.fakemodem import FakeModem
from support.lineemu import DropPlan, LineEmulator
from support.phone_relays import PhonePair, relay_command, send_mail, write_hub, write_site
from support.relay_process import free_port, mailbox_texts, wait_for

RATE = 115200


def _message(subject: str, body_size: int, seed: int) -> bytes:
    """A message with a body of printable but varied lines (no compression on the line)."""
    rng = __import__("random").Random(seed)
    lines = []
    size = 0
    while size < body_size:
        line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(70))
        lines.append(line)
        size += 72
    return (
        f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    ).encode()


def _body(delivered: bytes) -> bytes:
    """What the sender wrote, from a Maildir file: the text after the trace headers the
    relays added, with the CRLF line ends the message had on the wire."""
    start = delivered.index(b"Subject: ")
    return delivered[start:].replace(b"\n", b"\r\n")


def _queued(config: Path) -> int:
    result = relay_command(config, "queue", "--json")
    assert result.returncode == 0, result.stderr
    return len(json.loads(result.stdout))


@pytest.fixture
def line(tmp_path: Path) -> Iterator[LineEmulator]:
    """The line emulator at 115 200 bit/s, 1e-5 bit errors, seeded."""
    (tmp_path / "line").mkdir()
    with LineEmulator(tmp_path / "line", rate=RATE, ber=1e-5, seed=17) as emulator:
        yield emulator


def _pair(tmp_path: Path, line: LineEmulator) -> PhonePair:
    return PhonePair.make(
        tmp_path,
        f"serial:{line.link_a}:baudrate={RATE}",
        f"serial:{line.link_b}:baudrate={RATE}",
    )


@pytest.mark.timeout(240)
def test_mail_both_ways_in_one_call(tmp_path: Path, line: LineEmulator) -> None:
    """Mail submitted by SMTP on the hub reaches the site's Maildir by phone, and mail
    queued on the site for the hub comes back in the same call, byte-identical at BER 1e-5."""
    pair = _pair(tmp_path, line)
    try:
        pair.start_hub()
        pair.start_site()
        to_site = [_message(f"to-site-{i}", 3000, i) for i in range(3)]
        to_hub = [_message(f"to-hub-{i}", 2000, 10 + i) for i in range(2)]
        for text in to_site:
            send_mail(pair.hub_port, "alice@example.test", "bob@site-b.test", text)
        for text in to_hub:
            send_mail(pair.site_port, "bob@site-b.test", "alice@example.test", text)
        wait_for(lambda: _queued(pair.hub_config) == 3, what="mail queued on the hub")
        listing = relay_command(pair.hub_config, "queue").stdout
        assert "phone site site-b: 3 messages (3 recipients) waiting for a call" in listing
        line.connect()
        result = pair.call()
        assert result.returncode == 0, result.stdout + result.stderr
        record = json.loads(result.stdout)
        assert record["messages_sent"] == 2 and record["messages_received"] == 3
        status = json.loads(relay_command(pair.site_config, "status", "--json").stdout)
        hub_site = status["daemon"]["phone_sites"]["hub-a"]
        assert hub_site["calls_out"] and hub_site["last_call"]["result"] == "completed"
        assert not hub_site["down"]
        site_box = tmp_path / "site"
        wait_for(lambda: len(mailbox_texts(site_box, "bob")) == 3, what="mail at the site")
        wait_for(lambda: len(mailbox_texts(tmp_path / "hub")) == 2, what="mail at the hub")
        assert sorted(_body(t) for t in mailbox_texts(site_box, "bob")) == sorted(to_site)
        assert sorted(_body(t) for t in mailbox_texts(tmp_path / "hub")) == sorted(to_hub)
        wait_for(lambda: _queued(pair.hub_config) == 0, what="the hub's queue empty")
        calls = relay_command(pair.hub_config, "calls", "--json")
        assert calls.returncode == 0
        (answered,) = json.loads(calls.stdout)
        assert answered["direction"] == "in" and answered["result"] == "completed"
        assert answered["messages_sent"] == 3 and answered["messages_received"] == 2
        assert 0 < answered["efficiency"] < 1  # the answering line's configured rate
        line.hang_up()  # the hub's next answer is on a dead line: it can stop at once
    finally:
        pair.stop()


@pytest.mark.timeout(300)
def test_dropped_line_then_restart_then_next_call_completes(
    tmp_path: Path, line: LineEmulator
) -> None:
    """A line dropped in the middle of a message, the site restarted, the next call on the
    same device names completes it: every message delivered once, byte-identical, and the
    hub kept answering."""
    pair = _pair(tmp_path, line)
    try:
        pair.start_hub()
        pair.start_site()
        big = _message("big", 40000, 99)
        small = [_message(f"small-{i}", 1500, i) for i in range(2)]
        send_mail(pair.hub_port, "alice@example.test", "bob@site-b.test", big)
        for text in small:
            send_mail(pair.site_port, "bob@site-b.test", "alice@example.test", text)
        wait_for(lambda: _queued(pair.hub_config) == 1, what="mail queued on the hub")
        line.new_line(DropPlan(after_bytes=20000, direction="a2b"))
        line.connect()
        first = pair.call()
        assert first.returncode == os.EX_TEMPFAIL, first.stdout + first.stderr
        assert json.loads(first.stdout)["result"] == "line-dropped"
        assert _queued(pair.hub_config) == 1  # the big message waits for the next call
        pair.stop_site()
        line.new_line()
        pair.start_site()
        line.connect()
        second = pair.call()
        assert second.returncode == 0, second.stdout + second.stderr
        site_box = tmp_path / "site"
        wait_for(lambda: len(mailbox_texts(site_box, "bob")) == 1, what="the big message")
        wait_for(lambda: len(mailbox_texts(tmp_path / "hub")) == 2, what="the small ones")
        assert [_body(t) for t in mailbox_texts(site_box, "bob")] == [big]
        assert sorted(_body(t) for t in mailbox_texts(tmp_path / "hub")) == sorted(small)
        wait_for(lambda: _queued(pair.hub_config) == 0, what="the hub's queue empty")
        wait_for(lambda: _queued(pair.site_config) == 0, what="the site's queue empty")
        calls = json.loads(relay_command(pair.hub_config, "calls", "--json").stdout)
        assert [c["result"] for c in calls] == ["line-dropped", "completed"]
        line.hang_up()
    finally:
        pair.stop()


@pytest.mark.timeout(240)
def test_through_hayes_modems_with_a_chat_login(tmp_path: Path) -> None:
    """Through two fake Hayes modems: the site dials, logs in by chat script, and mail
    moves both ways; the hub's modem answers the next call too (re-opened and reset)."""
    with FakeModem(tmp_path, login="site-b:pw") as modems:
        hub_port, site_port = free_port(), free_port()
        modem = 'modem_init = ["ATZ"]\n'
        pair = PhonePair(
            write_hub(
                tmp_path / "hub", hub_port, f"serial:{modems.dte_a}:baudrate={RATE}", phone=modem
            ),
            write_site(
                tmp_path / "site",
                site_port,
                f"serial:{modems.dte_b}:baudrate={RATE}",
                phone=modem,
                site='dial = "ATDT5551234"\nchat = ["ogin:", "site-b", "ssword:", "pw"]\n',
            ),
            hub_port,
            site_port,
        )
        try:
            pair.start_hub()
            pair.start_site()
            to_site = _message("by-modem", 2000, 5)
            to_hub = _message("back-by-modem", 1000, 6)
            send_mail(pair.hub_port, "alice@example.test", "bob@site-b.test", to_site)
            send_mail(pair.site_port, "bob@site-b.test", "alice@example.test", to_hub)
            wait_for(lambda: _queued(pair.hub_config) == 1, what="mail queued on the hub")
            result = pair.call()
            assert result.returncode == 0, result.stdout + result.stderr
            wait_for(lambda: len(mailbox_texts(tmp_path / "site", "bob")) == 1, what="at site")
            wait_for(lambda: len(mailbox_texts(tmp_path / "hub")) == 1, what="at the hub")
            assert [_body(t) for t in mailbox_texts(tmp_path / "site", "bob")] == [to_site]
            assert [_body(t) for t in mailbox_texts(tmp_path / "hub")] == [to_hub]
            # The hub's modem hangs up (escape, ATH0), its line is re-opened and the modem
            # reset; then it answers the next call (nothing to move: it just completes).
            hub_log = tmp_path / "hub" / "twistd.log"
            wait_for(lambda: "waiting for the next call" in hub_log.read_text(), what="re-open")
            again = pair.call()
            for _ in range(3):  # a ring before the reset is over gets NO CARRIER: redial
                if again.returncode == 0:
                    break
                assert json.loads(again.stdout)["result"] == "no-connection", again.stdout
                again = pair.call()
            assert again.returncode == 0, again.stdout + again.stderr
            assert modems.wait_for("login")
        finally:
            pair.stop()

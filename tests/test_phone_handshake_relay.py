"""The link's handshake through two running relays (over TCP): a failed handshake is
logged at both ends, the line is dropped, and no mail moves."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from relay.sansio.phone import records
from relay.sansio.phone.handshake import MAJOR
from relay.sansio.phone.link import Link, LinkParams, RecordReceived
from relay.sansio.phone.records import Abort, Capabilities, Hello, Role

from support.phone_relays import PhonePair, relay_command, send_mail, write_hub, write_site
from support.relay_process import free_port, wait_for


def _queued(config: Path) -> int:
    result = relay_command(config, "queue", "--json")
    assert result.returncode == 0, result.stderr
    return len(json.loads(result.stdout))


def _log(config: Path) -> str:
    return (config.parent / "twistd.log").read_text()


def _pair(tmp_path: Path) -> tuple[PhonePair, int]:
    port = free_port()
    return PhonePair.make(tmp_path, f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"), port


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("change", "hub_outcome"),
    [({"secret": "not the secret"}, "auth-failed"), ({"name": "site-x"}, "unknown-site")],
)
def test_refused_handshake_moves_no_mail(
    tmp_path: Path, change: dict[str, str], hub_outcome: str
) -> None:
    """A wrong secret or an unknown site: both ends log it, the call fails (exit 77), and
    the mail queued at each end stays there."""
    pair, port = _pair(tmp_path)
    write_site(tmp_path / "site", pair.site_port, f"tcp:127.0.0.1:{port}", **change)
    try:
        pair.start_hub()
        pair.start_site()
        send_mail(
            pair.hub_port, "alice@example.test", "bob@site-b.test", b"Subject: a\r\n\r\nx\r\n"
        )
        send_mail(
            pair.site_port, "bob@site-b.test", "alice@example.test", b"Subject: b\r\n\r\ny\r\n"
        )
        wait_for(lambda: _queued(pair.hub_config) == 1 and _queued(pair.site_config) == 1)
        result = pair.call()
        assert result.returncode == os.EX_NOPERM, result.stdout + result.stderr
        record = json.loads(result.stdout)
        assert record["messages_sent"] == 0 and record["messages_received"] == 0
        wait_for(lambda: hub_outcome in _log(pair.hub_config), what="the hub's log line")
        assert "failing" in _log(pair.site_config)
        assert _queued(pair.hub_config) == 1 and _queued(pair.site_config) == 1
    finally:
        pair.stop()


@pytest.mark.timeout(120)
def test_version_mismatch_is_answered_and_hung_up(tmp_path: Path) -> None:
    """A caller speaking another major version gets an Abort naming both versions, the hub
    hangs up cleanly and records the call as a version mismatch."""
    pair, port = _pair(tmp_path)
    try:
        pair.start_hub()
        params = LinkParams()
        link = Link(params, time.monotonic())
        caps = Capabilities(
            params.min_frame_payload,
            params.max_frame_payload,
            params.window,
            params.max_record,
            1 << 20,
            False,
            False,
        )
        hello = Hello(MAJOR + 1, 0, Role.CALLER, "site-b", os.urandom(records.NONCE_SIZE), caps)
        link.send_record(records.encode(hello))
        received: list[object] = []
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(link.data_to_send(time.monotonic()))
            while data := sock.recv(65536):
                link.receive_data(data, time.monotonic())
                sock.sendall(link.data_to_send(time.monotonic()))
                while (event := link.next_event()) is not None:
                    if isinstance(event, RecordReceived):
                        received.append(records.decode(event.record))
        aborts = [r for r in received if isinstance(r, Abort)]
        assert aborts and f"{MAJOR + 1}.0" in aborts[0].reply.text
        calls = lambda: json.loads(relay_command(pair.hub_config, "calls", "--json").stdout)  # noqa: E731
        wait_for(lambda: calls() and calls()[-1]["result"] == "version-mismatch")
    finally:
        pair.stop()


def _until_hung_up(port: int, say: bytes) -> bytes:
    """Connect to the hub's answering port, send ``say`` (maybe nothing), and read until
    the hub drops the line; what the hub sent."""
    heard = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        if say:
            sock.sendall(say)
        while data := sock.recv(65536):
            heard += data
    return heard


@pytest.mark.timeout(180)
def test_silent_or_garbled_caller_is_dropped_and_the_hub_answers_on(tmp_path: Path) -> None:
    """A caller that connects and says nothing, then one that sends only garbage, is logged
    and dropped after ``[phone] handshake_timeout`` with no mail moved, and the hub answers
    the next call, which moves the mail."""
    pair, port = _pair(tmp_path)
    write_hub(
        tmp_path / "hub",
        pair.hub_port,
        f"tcp:127.0.0.1:{port}",
        phone='handshake_timeout = "1s"\n',
    )
    try:
        pair.start_hub()
        pair.start_site()
        send_mail(
            pair.hub_port, "alice@example.test", "bob@site-b.test", b"Subject: a\r\n\r\nx\r\n"
        )
        wait_for(lambda: _queued(pair.hub_config) == 1)
        _until_hung_up(port, b"")
        wait_for(lambda: _log(pair.hub_config).count("failing (timeout)") == 1, what="the log")
        garbage = bytes(range(256)) * 8 + b"login: \r\nNO CARRIER\r\n"
        _until_hung_up(port, garbage)
        wait_for(lambda: _log(pair.hub_config).count("failing (timeout)") == 2, what="the log")
        assert _queued(pair.hub_config) == 1
        assert not list((tmp_path / "site" / "mail" / "bob").glob("*/*"))
        result = pair.call()
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["messages_received"] == 1
        wait_for(lambda: _queued(pair.hub_config) == 0, what="the hub's queue to empty")
    finally:
        pair.stop()

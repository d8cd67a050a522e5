"""The whole relay, as twistd builds it: smtplib in, smtp-sink out, every message once."""

from __future__ import annotations

import re
import smtplib
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from relay.cli.main import main
from relay.config import Config, load_config, parse_config
from relay.envelope import RecipientState
from relay.tap import build_service

from support.ports import free_port
from support.smtpsink import Sink, SinkPool

MESSAGES = 1000
CLIENTS = 10
MARKER = re.compile(r"^X-Marker: (\d+)$", re.MULTILINE)


@pytest.fixture
def sinks() -> Iterator[SinkPool]:
    pool = SinkPool()
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def sink(sinks: SinkPool) -> Sink:
    return sinks.start()


def _config(tmp_path: Path, smtp_port: int, sink_port: int, retry_min: str = "1s") -> Config:
    (tmp_path / "mail").mkdir()
    text = _config_text(smtp_port, sink_port, retry_min)
    return parse_config(text, tmp_path)


def _config_text(smtp_port: int, sink_port: int, retry_min: str) -> str:
    return f"""
[relay]
hostname = "hub.example.test"
local_domains = ["example.test"]
spool = "spool"

[smtp]
listen = ["tcp:{smtp_port}:interface=127.0.0.1"]
trusted_networks = ["127.0.0.0/8"]

[local]
mail_root = "mail"
users = ["alice"]

[deliver]
retry_min = "{retry_min}"
retry_max = "70m"

[[route]]
domain = "sink.test"
channel = "smtp"
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
"""


def _message(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@example.test"
    message["To"] = "rcpt@sink.test"
    message["Subject"] = f"message {number}"
    message["X-Marker"] = str(number)
    message.set_content(f"body of message {number}\n.\n..leading dots survive\n" * 20)
    return message


def _send(port: int, numbers: range) -> None:
    """One client: one connection, several messages (blocking; runs in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.test")
        for number in numbers:
            refused = client.send_message(_message(number))
            assert refused == {}


async def _wait_until(predicate: Any, limit: float = 90.0) -> None:
    """Poll ``predicate`` on the real reactor until it holds (no wall-clock assertion)."""
    for _ in range(int(limit / 0.05)):
        if predicate():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    assert predicate(), "condition not reached"


@pytest_twisted.ensureDeferred
async def test_thousand_messages_reach_smtp_sink_exactly_once(tmp_path: Path, sink: Sink) -> None:
    """1 000 messages accepted over SMTP are relayed to smtp-sink, each exactly once."""
    port = free_port()
    service = build_service(_config(tmp_path, port, sink.port), reactor)
    service.startService()
    try:
        spool = service.getServiceNamed("spool")
        await spool.when_ready()
        per_client = MESSAGES // CLIENTS
        await defer.gatherResults(
            [
                deferToThread(_send, port, range(i * per_client, (i + 1) * per_client))
                for i in range(CLIENTS)
            ]
        )

        def all_arrived() -> bool:
            return len(MARKER.findall(sink.dumped())) >= MESSAGES

        await _wait_until(all_arrived)
        queue = spool.queue
        await _wait_until(lambda: not queue.entries())
    finally:
        await service.stopService()
    counts = Counter(int(n) for n in MARKER.findall(sink.dumped()))
    assert set(counts) == set(range(MESSAGES))
    assert set(counts.values()) == {1}
    dumped = sink.dumped()
    assert re.search(r"^\.\.leading dots survive\r?$", dumped, re.MULTILINE)
    assert re.search(r"^\.\r?$", dumped, re.MULTILINE)


@pytest_twisted.ensureDeferred
async def test_relay_flush_revives_a_dead_destination(tmp_path: Path, sinks: SinkPool) -> None:
    """After a refused connection marks the smarthost dead, `relay flush` delivers at once."""
    port, sink_port = free_port(), free_port()
    config_path = tmp_path / "relay.toml"
    config_path.write_text(_config_text(port, sink_port, retry_min="60m"))
    (tmp_path / "mail").mkdir()
    service = build_service(load_config(config_path), reactor)
    service.startService()
    try:
        spool = service.getServiceNamed("spool")
        queue = await spool.when_ready()
        await deferToThread(_send, port, range(3))

        def all_deferred() -> bool:
            entries = queue.entries()
            return len(entries) == 3 and all(
                status.state is RecipientState.DEFERRED
                for entry in entries
                for status in entry.statuses
            )

        await _wait_until(all_deferred)  # connection refused: the smarthost rests
        sink = sinks.start(port=sink_port)
        flushed = await deferToThread(main, ["flush", "-c", str(config_path)])
        assert flushed == 0
        await _wait_until(lambda: len(MARKER.findall(sink.dumped())) >= 3, limit=30)
        await _wait_until(lambda: not queue.entries(), limit=30)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_mail_for_a_phone_site_waits_for_its_call(tmp_path: Path) -> None:
    """Mail routed to a phone site that only calls in is accepted and deferred (AGN,
    waiting for the site's call), not bounced and not refused."""
    port = free_port()
    (tmp_path / "secret").write_text("s3cret\n")
    text = _config_text(port, free_port(), "1s") + (
        '\n[[route]]\ndomain = "site-b.test"\nchannel = "phone"\nsite = "site-b"\n'
        '\n[phone.sites.site-b]\nsecret_file = "secret"\n'
    )
    (tmp_path / "mail").mkdir()
    service = build_service(parse_config(text, tmp_path), reactor)
    service.startService()
    try:
        queue = await service.getServiceNamed("spool").when_ready()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail(
                    "sender@example.test", ["someone@site-b.test"], b"Subject: x\r\n\r\ny\r\n"
                )

        await deferToThread(send)

        def deferred() -> bool:
            entries = list(queue.entries())
            return bool(entries) and entries[0].statuses[0].state is RecipientState.DEFERRED

        while not deferred():
            await task.deferLater(reactor, 0.05, lambda: None)
        status = next(iter(queue.entries())).statuses[0]
        assert (
            status.last_reply is not None and "waiting for site-b to call" in status.last_reply.text
        )
    finally:
        await service.stopService()

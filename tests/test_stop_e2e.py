"""Stopping ``twistd relay`` while deliveries are in flight, then starting it again.

The relay runs as operators run it (``twistd -n relay --config FILE``, the shipped
defaults apart from paths, ports and a route), relaying to a loopback SMTP server that
waits half a second before its final 250.  SIGTERM arrives while transactions are in
flight; after a restart every message must have arrived exactly once (counted by
Message-ID at the server) and neither log may hold a critical line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from email.message import EmailMessage
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from reactor_helpers import until
from smtpserver import Script, ScriptedSmtpFactory, start_server
from smtpsink import free_port
from test_tap import _stop

BIN = Path(sys.executable).parent
MESSAGES = 200
CLIENTS = 4
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]*>)\r?$", re.MULTILINE | re.IGNORECASE)


def _shipped_config(where: Path, smtp_port: int, server_port: int) -> Path:
    """The embedded default, listening on ``smtp_port``, routing sink.test to the server."""
    text = files("relay").joinpath("default.toml").read_text(encoding="utf-8")
    listen = 'listen = ["tcp:2525:interface=127.0.0.1"]'
    assert listen in text
    text = text.replace(listen, f'listen = ["tcp:{smtp_port}:interface=127.0.0.1"]')
    text += (
        f'\n[[route]]\ndomain = "sink.test"\nchannel = "smtp"\n'
        f'smarthost = "[127.0.0.1]:{server_port}"\ntls = "none"\n'
    )
    config = where / "relay.toml"
    config.write_text(text, encoding="utf-8")
    return config


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``twistd -n relay --config FILE`` with the relay's log observer (levels shown)."""
    argv = [
        str(BIN / "twistd"),
        "--nodaemon",
        "--pidfile=",
        "--logger",
        "relay.logfile.observer",
        "relay",
        "--config",
        str(config),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=config.parent, env=env, stdout=out, stderr=out)


def _message(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@localhost"
    message["To"] = "rcpt@sink.test"
    message["Subject"] = f"message {number}"
    message["Message-ID"] = f"<stop-{number}@client.test>"
    message.set_content(f"body of message {number}\n")
    return message


def _submit(port: int, numbers: range) -> None:
    """One client, one connection, several messages (blocking: runs in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        for number in numbers:
            assert client.send_message(_message(number)) == {}


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the relay greets with 220 (before its spool is open it answers 421)."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.noop()
                return
        except (OSError, smtplib.SMTPException):
            assert time.monotonic() < deadline, "the relay never greeted with 220"
            time.sleep(0.05)


def _queue_listing(config: Path) -> list[Any]:
    """``relay queue --json``: the running relay's queue, through its control socket."""
    done = subprocess.run(
        [str(BIN / "relay"), "queue", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listing: list[Any] = json.loads(done.stdout)
    return listing


def _arrived(factory: ScriptedSmtpFactory) -> Counter[bytes]:
    """How often each Message-ID reached the server (a message counts at its final dot)."""
    seen: Counter[bytes] = Counter()
    for session in factory.sessions:
        for transaction in session.transactions:
            if transaction.text is not None:
                seen.update(MESSAGE_ID.findall(transaction.text))
    return seen


def _critical_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "#critical]" in line]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_sigterm_during_deliveries_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """SIGTERM with transactions in flight, then a restart: every message arrives once."""
    script = Script(final_delay=0.5)
    port, factory = start_server(reactor, script)
    smtp_port = free_port()
    config = _shipped_config(tmp_path, smtp_port, port.getHost().port)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    relay = _start(config, first_log)
    try:
        await deferToThread(_wait_ready, smtp_port, relay, first_log)
        began = reactor.seconds()
        per_client = MESSAGES // CLIENTS
        await defer.gatherResults(
            [
                deferToThread(_submit, smtp_port, range(i * per_client, (i + 1) * per_client))
                for i in range(CLIENTS)
            ],
            consumeErrors=True,
        )
        await task.deferLater(reactor, max(0.0, began + 1.0 - reactor.seconds()), lambda: None)
        await until(lambda: factory.holding() > 0, limit=60)
        in_flight, before = factory.holding(), sum(_arrived(factory).values())
        status = await deferToThread(_stop, relay)
        assert status in (0, -signal.SIGTERM), first_log.read_text(errors="replace")
        assert before < MESSAGES, "everything was delivered before SIGTERM: nothing was tested"

        relay = _start(config, second_log)
        await deferToThread(_wait_ready, smtp_port, relay, second_log)
        await until(lambda: len(_arrived(factory)) >= MESSAGES, limit=120)
        for _ in range(600):
            if not await deferToThread(_queue_listing, config):
                break
            await task.deferLater(reactor, 0.2, lambda: None)
        assert await deferToThread(_queue_listing, config) == []
    finally:
        await deferToThread(_stop, relay)
        await port.stopListening()
    arrived = _arrived(factory)
    duplicates = sum(arrived.values()) - len(arrived)
    print(f"in flight at SIGTERM: {in_flight}; duplicates: {duplicates}")
    assert set(arrived) == {f"<stop-{n}@client.test>".encode() for n in range(MESSAGES)}
    assert duplicates == 0, {k: v for k, v in arrived.items() if v > 1}
    assert _critical_lines(first_log) == []
    assert _critical_lines(second_log) == []

"""``relay status``: the running relay answers over its control socket; a stopped one
is reported down (exit 69) with what the spool holds.

The relay runs as ``twistd -n relay --config FILE``; mail goes in with relay-sendmail,
so the states are real ones: delivered and failed recipients of messages still queued
for a deferred one (a smarthost that refuses connections), and a held message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpsink import free_port

BIN = Path(sys.executable).parent


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nhostname = "hub.example.test"\nlocal_domains = ["example.test"]\n'
        'spool = "spool"\nmaildrop = "maildrop"\n'
        '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\nworkers = 0\n'
        '[deliver]\nretry_min = "1h"\nretry_max = "2h"\n'
        '[local]\nmail_root = "mail"\nusers = ["alice", "bob"]\n'
        f'[[route]]\ndomain = "remote.test"\nchannel = "smtp"\n'
        f'smarthost = "[127.0.0.1]:{free_port()}"\n'
    )
    return path


def _run(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _status(config: Path) -> tuple[int, dict[str, Any]]:
    result = _run(config, "relay", "status", "--json", "-c", str(config))
    return result.returncode, json.loads(result.stdout)


def _wait(predicate: Any, limit: float = 30.0) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition never became true")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    config = _config(tmp_path)
    log = tmp_path / "twistd.log"
    argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}", "relay"]
    proc = subprocess.Popen([*argv, "--config", str(config)], cwd=tmp_path)
    try:
        yield config, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _queue(config: Path) -> list[dict[str, Any]]:
    result = _run(config, "relay", "queue", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    messages: list[dict[str, Any]] = json.loads(result.stdout)
    return messages


def _settled(config: Path, count: int) -> list[dict[str, Any]] | None:
    """The queue once it holds ``count`` messages none of whose recipients is pending."""
    messages = _queue(config)
    states = [r["state"] for m in messages for r in m["recipients"]]
    return messages if len(messages) == count and "pending" not in states else None


def test_status_of_a_running_relay_field_by_field(
    tmp_path: Path, relay: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """Up since its start; queue counts by state and channel; oldest; last per channel."""
    config, proc = relay
    before = time.time()
    send = ("relay-sendmail", "-f", "alice@example.test")
    assert _run(config, *send, "bob", "x@remote.test", stdin=b"Subject: 1\n\n1\n").returncode == 0
    _wait(lambda: _settled(config, 1))
    assert (
        _run(config, *send, "nobody", "y@remote.test", stdin=b"Subject: 2\n\n2\n").returncode == 0
    )
    _wait(lambda: _settled(config, 2))
    assert _run(config, *send, "z@remote.test", stdin=b"Subject: 3\n\n3\n").returncode == 0
    messages = _wait(lambda: _settled(config, 3))
    first, _, third = (m["id"] for m in messages)
    held = _run(config, "relay", "queue", "hold", third, "-c", str(config))
    assert held.returncode == 0, held.stderr

    code, status = _status(config)
    assert code == 0
    daemon, queue = status["daemon"], status["queue"]
    assert daemon["running"] is True
    assert daemon["pid"] == proc.pid
    assert daemon["started"] <= time.time() and daemon["uptime"] >= 0
    assert abs(daemon["started"] + daemon["uptime"] - time.time()) < 30
    assert daemon["phone_sites"] == {}
    assert queue["messages"] == 3
    assert queue["recipients"] == {
        "pending": 0,
        "deferred": 2,
        "delivered": 1,
        "failed": 1,
        "held": 1,
    }
    assert queue["channels"] == {
        "local": {"delivered": 1, "failed": 1},
        "smtp": {"deferred": 2, "held": 1},
    }
    assert queue["oldest"]["id"] == first
    assert queue["oldest"]["arrival"] >= before - 1
    assert 0 <= queue["oldest"]["age"] < 60
    local, smtp = daemon["deliveries"]["local"], daemon["deliveries"]["smtp"]
    # The last local delivery is the bounce of message 2 to alice, after bob's.
    assert local["last_delivery"]["recipient"] == "alice@example.test"
    assert local["last_delivery"]["status"] == "sent"
    assert local["last_failure"]["recipient"] == "nobody@example.test"
    assert local["last_failure"]["status"] == "bounced"
    assert local["last_failure"]["reply"].startswith("550 5.1.1")
    assert smtp["last_delivery"] is None
    assert smtp["last_failure"]["recipient"] == "z@remote.test"
    assert smtp["last_failure"]["status"] == "deferred"
    assert smtp["last_failure"]["destination"].startswith("smtp:[127.0.0.1]:")

    text = _run(config, "relay", "status", "-c", str(config))
    assert text.returncode == 0
    assert text.stdout.startswith("relay: running since ")
    assert "1 deferred" not in text.stdout and "2 deferred" in text.stdout


def test_status_of_a_stopped_relay_exits_69_and_shows_the_spool(
    tmp_path: Path, relay: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """After the relay stops, status says so (69) and still counts what is queued."""
    config, proc = relay
    assert _run(config, "relay-sendmail", "x@remote.test", stdin=b"x\n").returncode == 0
    _wait(lambda: _settled(config, 1))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    code, status = _status(config)
    assert code == 69
    assert status["daemon"] == {"running": False}
    assert status["queue"]["messages"] == 1
    assert status["queue"]["recipients"]["deferred"] == 1
    assert status["queue"]["channels"] == {"smtp": {"deferred": 1}}
    text = _run(config, "relay", "status", "-c", str(config))
    assert (text.returncode, text.stdout.splitlines()[0]) == (
        69,
        "relay: not running (the queue below was read from the spool directly)",
    )

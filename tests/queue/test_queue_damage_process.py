"""``twistd relay`` restarted on a damaged spool: mail taken by smtplib survives one bad octet.

The relay runs as operators run it (``twistd --nodaemon relay --config``), mail goes in
over SMTP, and between runs the spool's files are damaged on disk.  A flipped octet in
one record header costs that one message; damage that cannot be set aside makes the
relay stop by itself, saying why in one line, with the spool's bytes untouched.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from relay.queue.layout import SpoolLayout
from relay.queue.payload import encode_envelope, encode_message_prefix
from relay.queue.record import HEADER_SIZE
from relay.queue.recovery import recover

from queue_helpers import mounted_tmpfs

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(tmp_path: Path, smtp_port: int) -> Path:
    """Mail for dead.test goes to a smarthost nobody listens on: it stays queued."""
    config = tmp_path / "relay.toml"
    dead_end = f"127.0.0.1:{_free_port()}"
    config.write_text(
        f'[relay]\nhostname = "hub.example.test"\nspool = "spool"\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface=127.0.0.1"]\n'
        '[deliver]\nretry_min = "1h"\n'
        f'[[route]]\ndomain = "dead.test"\nchannel = "smtp"\nsmarthost = "{dead_end}"\n'
        'tls = "none"\n'
    )
    return config


def _start(tmp_path: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}", "relay"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([*argv, "--config", str(config)], cwd=tmp_path, env=env)


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"{text!r} not logged; log was:\n{log.read_text() if log.exists() else ''}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _connect(port: int) -> smtplib.SMTP:
    """A session, once the relay takes mail (it answers 421 until its spool is open)."""
    for _ in range(300):
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=60)
        except smtplib.SMTPConnectError as e:
            if e.smtp_code != 421:
                raise
            time.sleep(0.1)
    raise AssertionError("the relay never took mail")


def _send(port: int, count: int) -> None:
    with _connect(port) as client:
        client.ehlo("client.example.test")
        for number in range(count):
            message = EmailMessage()
            message["From"] = "sender@example.test"
            message["To"] = "rcpt@dead.test"
            message["Subject"] = f"message {number}"
            message.set_content(f"body of message {number}\n" * 30)
            assert client.send_message(message) == {}


def _records(spool: Path) -> dict[str, tuple[int, int]]:
    """Where each queued message's record starts and ends in segment 1 (a read-only look)."""
    places = {}
    for entry in recover(SpoolLayout(spool), repair=False).state.messages.values():
        assert entry.segment == 1
        prefix = encode_message_prefix(entry.queue_id, encode_envelope(entry.envelope))
        start = entry.text_offset - len(prefix) - HEADER_SIZE
        places[entry.queue_id] = (start, entry.text_offset + entry.size)
    return places


def _flip(spool: Path, offset: int) -> None:
    path = SpoolLayout(spool).segment_path(1)
    data = bytearray(path.read_bytes())
    data[offset + 9] ^= 0x01  # in the length field
    path.write_bytes(bytes(data))


def _listed(config: Path) -> list[str]:
    done = subprocess.run(
        [str(BIN / "relay"), "queue", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return sorted(message["id"] for message in json.loads(done.stdout))


def test_a_restarted_relay_keeps_every_message_but_the_damaged_one(tmp_path: Path) -> None:
    """Five queued by SMTP, one header octet flipped: four come back, and no bytes are lost."""
    port = _free_port()
    config = _config(tmp_path, port)
    spool = tmp_path / "spool"
    proc = _start(tmp_path, config, tmp_path / "first.log")
    try:
        _wait_for(tmp_path / "first.log", "records replayed", proc)  # the spool is open
        _send(port, 5)
    finally:
        _stop(proc)
    places = _records(spool)
    assert len(places) == 5
    damaged = sorted(places)[2]
    start, end = places[damaged]
    _flip(spool, start)

    proc = _start(tmp_path, config, tmp_path / "second.log")
    try:
        _wait_for(tmp_path / "second.log", "records replayed", proc)  # the spool is open
        assert _listed(config) == sorted(set(places) - {damaged})
        assert "1 regions quarantined" in (tmp_path / "second.log").read_text()
    finally:
        _stop(proc)
    [copy] = SpoolLayout(spool).quarantine_dir.iterdir()
    assert copy.read_bytes() == SpoolLayout(spool).segment_path(1).read_bytes()[start:end]

    _flip(spool, places[sorted(places)[3]][0])
    before = SpoolLayout(spool).segment_path(1).read_bytes()
    log = tmp_path / "third.log"
    with mounted_tmpfs(
        SpoolLayout(spool).quarantine_dir, "ro,size=64k", "an unwritable quarantine/"
    ):
        proc = _start(tmp_path, config, log)
        try:
            proc.wait(timeout=60)  # it stops by itself; a relay that runs on fails here
        finally:
            _stop(proc)
    lines = log.read_text().splitlines()
    [spool_line] = [n for n, line in enumerate(lines) if "spool: cannot open" in line]
    assert "cannot set aside" in lines[spool_line] and "refusing to open" in lines[spool_line]
    assert lines[spool_line + 1].startswith(lines[spool_line][:4])  # the next is a new line
    assert any("relay cannot run without its spool" in line for line in lines)
    assert SpoolLayout(spool).segment_path(1).read_bytes() == before

"""``twistd relay-slave``: the relay answering calls only (no SMTP, no calls out)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.python import usage

from relay.slave_tap import Options, slave_config

from support.phone_relays import RELAY, PhonePair, send_mail
from support.relay_process import TWISTD, free_port, mailbox_texts, wait_for


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_relay_slave_answers_call_after_call(tmp_path: Path) -> None:
    """twistd relay-slave answers a site's calls on --answer, one after another, storing
    what the site brings and sending what waits for it."""
    port = free_port()
    pair = PhonePair.make(tmp_path, f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}")
    log = tmp_path / "hub" / "slave.log"
    slave = subprocess.Popen(
        [
            *(TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "relay-slave"),
            *("--config", str(pair.hub_config), "--answer", f"tcp:127.0.0.1:{port}"),
        ],
        cwd=pair.hub_config.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        wait_for(lambda: _accepting(port), what="the slave answering")
        pair.start_site()
        for n in range(2):
            send_mail(
                pair.site_port, "bob@site-b.test", "alice@example.test", b"Subject: s\r\n\r\nx\r\n"
            )
            result = pair.call()
            assert result.returncode == 0, result.stdout + result.stderr
            assert json.loads(result.stdout)["messages_sent"] == 1
            wait_for(lambda n=n: len(mailbox_texts(tmp_path / "hub")) == n + 1, what="delivered")
        assert not _accepting(pair.hub_port)  # no SMTP listener in the slave
    finally:
        pair.stop()
        slave.send_signal(signal.SIGTERM)
        slave.wait(timeout=30)
    assert "Server Shut Down" in log.read_text()  # a clean stop on SIGTERM


def test_slave_options_need_somewhere_to_answer(tmp_path: Path) -> None:
    """Without --answer or [phone] answer, relay-slave refuses with a usage error."""
    pair = PhonePair.make(tmp_path, "tcp:127.0.0.1:1", "tcp:127.0.0.1:1")
    text = pair.hub_config.read_text().replace('answer = ["tcp:127.0.0.1:1"]\n', "")
    pair.hub_config.write_text(text)
    with pytest.raises(usage.UsageError, match="nowhere to answer"):
        Options().parseOptions(["--config", str(pair.hub_config)])
    options = Options()
    options.parseOptions(["--config", str(pair.hub_config), "--answer", "tcp:2600"])
    assert options.config.smtp.listen == () and len(options.config.phone.answer) == 1
    with pytest.raises(ValueError, match="not a transport"):
        slave_config(options.config, "carrier-pigeon")


def _pump(source: Callable[[int], bytes], sink: Callable[[bytes], object]) -> None:
    """Copy bytes until end of file (one direction of the bridge)."""
    with contextlib.suppress(OSError, ValueError):
        while data := source(65536):
            sink(data)


@pytest.mark.timeout(120)
def test_relay_slave_stdio_answers_one_call(tmp_path: Path) -> None:
    """relay slave --stdio answers one call on its standard input and output (as a login
    shell would be run), stores what the site brings, and exits 0 when the call completed."""
    port = free_port()
    pair = PhonePair.make(tmp_path, "stdio", f"tcp:127.0.0.1:{port}")
    listener = socket.create_server(("127.0.0.1", port))
    try:
        pair.start_site()
        send_mail(
            pair.site_port, "bob@site-b.test", "alice@example.test", b"Subject: s\r\n\r\nx\r\n"
        )
        calling = threading.Thread(target=lambda: results.append(pair.call()), daemon=True)
        results: list[subprocess.CompletedProcess[str]] = []
        calling.start()
        connection, _ = listener.accept()  # the site's call: bridged to the slave's stdio
        slave = subprocess.Popen(
            [RELAY, "slave", "--stdio", "--config", str(pair.hub_config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=pair.hub_config.parent,
        )
        assert slave.stdin is not None and slave.stdout is not None
        stdin, stdout = slave.stdin, slave.stdout

        def to_slave(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        threading.Thread(target=_pump, args=(connection.recv, to_slave), daemon=True).start()
        threading.Thread(target=_pump, args=(stdout.read1, connection.sendall), daemon=True).start()
        assert slave.wait(timeout=60) == 0
        connection.close()
        calling.join(timeout=60)
        assert results and results[0].returncode == 0, results
        wait_for(lambda: len(mailbox_texts(tmp_path / "hub")) == 1, what="delivered by the slave")
    finally:
        listener.close()
        pair.stop()

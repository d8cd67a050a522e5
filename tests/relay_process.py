"""A relay started as an operator starts it, ``twistd --nodaemon relay --config FILE``.

For tests that need the real process: its own reactor, its own spool, its own log.
:func:`start_relay` returns once the SMTP port greets with 220; :meth:`RelayProcess.stop`
sends SIGTERM and waits, killing it only if it does not stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RelayProcess",
    "free_port",
    "mailbox_texts",
    "relay_routing_to",
    "start_relay",
    "wait_for",
    "write_config",
]

TWISTD = str(Path(sys.executable).parent / "twistd")


def write_config(directory: Path, port: int, extra: str = "") -> Path:
    """``directory/relay.toml``: the shipped defaults but for the paths, the SMTP port, the
    local domain example.test whose one user alice is also the postmaster, and ``extra``
    (routes, say)."""
    (directory / "mail").mkdir(exist_ok=True)
    config = directory / "relay.toml"
    config.write_text(
        '[relay]\nhostname = "hub.example.test"\nlocal_domains = ["example.test"]\n'
        'spool = "spool"\npostmaster = "alice@example.test"\n'
        f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        '[local]\nmail_root = "mail"\nusers = ["alice"]\n' + extra
    )
    return config


def mailbox_texts(directory: Path, user: str = "alice") -> list[bytes]:
    """The messages in ``user``'s Maildir under ``directory/mail``, oldest first."""
    new = directory / "mail" / user / "new"
    paths = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.is_dir() else []
    return [path.read_bytes() for path in paths]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], object], limit: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` every 50 ms; AssertionError if it does not hold within ``limit``."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what or condition}")
        time.sleep(0.05)


@dataclass
class RelayProcess:
    """A running ``twistd relay``: its process, its log file and its SMTP port."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def stop(self) -> int:
        """SIGTERM, then wait (kill after 30 s); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def start_relay(config: Path, port: int) -> RelayProcess:
    """Start twistd relay with ``config`` (which listens on ``port``) and wait until it
    greets with 220; the log goes to ``twistd.log`` beside the configuration."""
    log = config.parent / "twistd.log"
    argv = [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "relay"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([*argv, "--config", str(config)], cwd=config.parent, env=env)
    relay = RelayProcess(process, log, port)

    def listening() -> bool:
        if process.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise AssertionError(f"twistd relay exited with {process.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                greeting = probe.recv(512)
                probe.sendall(b"QUIT\r\n")
        except OSError:
            return False
        return greeting.startswith(b"220 ")  # not 421 4.3.2: the spool is open

    try:
        wait_for(listening, what=f"twistd relay listening on port {port}")
    except BaseException:
        relay.stop()
        raise
    return relay


@contextmanager
def relay_routing_to(directory: Path, domain: str, port: int) -> Iterator[RelayProcess]:
    """A relay of :func:`write_config` whose one ``[[route]]`` sends ``domain`` to the SMTP
    server on 127.0.0.1:``port`` (an smtp-sink, say); stopped afterwards."""
    route = (
        f'[[route]]\ndomain = "{domain}"\nchannel = "smtp"\n'
        f'smarthost = "127.0.0.1:{port}"\ntls = "none"\n'
    )
    smtp_port = free_port()
    running = start_relay(write_config(directory, smtp_port, route), smtp_port)
    try:
        yield running
    finally:
        running.stop()

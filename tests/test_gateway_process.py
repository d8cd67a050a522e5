"""The gateway in a real relay process (``twistd -n relay``) against real clients.

The relay runs on the shipped defaults apart from its paths and port (and, where a test
says so, one timeout or an AUTH users file), with its gateway worker process, as an
operator runs it: Postfix's ``smtp-source`` bursts from loopback, a raw socket client
that pipelines without reading, watched through ``/proc`` (the relay's and its worker's
resident size), and smtplib clients guessing a password in parallel.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.gateway.auth import make_user_line

from auth_guesses import guess_in_parallel

TWISTD = str(Path(sys.executable).parent / "twistd")
SMTP_SOURCE = "/usr/sbin/smtp-source"
_WORKER = re.compile(r"smtp worker \d+ started \(pid (\d+)\)")


@dataclass
class Relay:
    """A running ``twistd relay``: its process, port and log."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_text(self) -> str:
        if not self.log.exists():
            return ""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, limit: float = 60.0) -> None:
        """Wait until ``pattern`` appears ``count`` times in the log (fail past ``limit`` s)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log_text())) >= count:
                return
            assert self.proc.poll() is None, self.log_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} x{count} not in the log:\n{self.log_text()[-3000:]}")

    def pids(self) -> list[int]:
        """The relay's process and its gateway workers."""
        return [self.proc.pid, *(int(pid) for pid in _WORKER.findall(self.log_text()))]

    def rss_kib(self) -> int:
        """Resident memory of the relay and its workers together, in KiB (VmRSS)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def running_relay(tmp_path: Path, smtp: str = "") -> Iterator[Relay]:
    """``twistd -n relay --config FILE`` on the shipped defaults; SIGTERM at the end."""
    port = _free_port()
    (tmp_path / "mail").mkdir()
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nhostname = "hub.example.test"\nlocal_domains = ["example.test"]\n'
        'spool = "spool"\n'
        f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n{smtp}\n'
        '[local]\nmail_root = "mail"\nusers = ["alice"]\n'
    )
    log = tmp_path / "twistd.log"
    argv = [
        TWISTD,
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log}",
        "relay",
        "--config",
        str(config),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env)
    relay = Relay(proc, port, log)
    try:
        relay.wait_for_log(r"smtp worker 1: accepting on")
        yield relay
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _smtp_source(port: int, sessions: int, messages: int) -> subprocess.CompletedProcess[str]:
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages)]
    argv += ["-f", "sender@example.test", "-t", "alice@example.test", f"127.0.0.1:{port}"]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.timeout(600)
def test_smtp_source_bursts_from_loopback_are_all_taken(tmp_path: Path) -> None:
    """smtp-source -s 20, then -s 50, from a trusted address: no 421, every message stored."""
    with running_relay(tmp_path) as relay:
        stored = 0
        for sessions in (20, 50, 50):
            result = _smtp_source(relay.port, sessions, 500)
            assert result.returncode == 0, result.stdout + result.stderr
            stored += 500
            relay.wait_for_log(r"stored from=<sender@example\.test>", stored)
        assert "refused 127.0.0.1" not in relay.log_text()


def _pipeline_without_reading(port: int, commands: int) -> tuple[socket.socket, int]:
    """Connect and send up to ``commands`` VRFYs, never reading; stop once the relay
    has taken nothing for a while (it stopped reading).  Returns the socket and how many
    commands it took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setblocking(False)
    data = memoryview(b"VRFY a\r\n" * commands)
    sent = 0
    stalled_since: float | None = None
    while sent < len(data):
        try:
            sent += sock.send(data[sent : sent + 65536])
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = now if stalled_since is None else stalled_since
            if now - stalled_since > 3.0:  # nothing taken for 3 s: it stopped reading
                break
            time.sleep(0.01)
    return sock, sent // len(b"VRFY a\r\n")


def _dropped(sock: socket.socket, limit: float) -> bool:
    """Whether the relay closes (or resets) the connection within ``limit`` seconds."""
    sock.setblocking(True)
    sock.settimeout(limit)
    try:
        while sock.recv(1 << 20):
            pass  # the replies it had sent: read and thrown away
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.mark.timeout(600)
def test_a_client_that_does_not_read_cannot_grow_the_relay(tmp_path: Path) -> None:
    """2 000 000 pipelined VRFY never read: the relay's memory stays flat; the client is dropped."""
    with running_relay(tmp_path, 'idle_timeout = "5s"') as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as warm_up:
            warm_up.recv(1024)  # one session first: both processes have run a session
        time.sleep(1.0)
        before = relay.rss_kib()
        sock, taken = _pipeline_without_reading(relay.port, 2_000_000)
        with sock:
            time.sleep(2.0)  # let the relay answer what it has read
            after = relay.rss_kib()
            print(f"VRFY taken {taken}; RSS before {before} KiB, after {after} KiB")
            assert after - before < 4 * 1024  # KiB: the session holds at most ~320 KiB
            assert taken < 2_000_000  # it stopped reading: the rest stayed with the client
            relay.wait_for_log(r"dropped: it leaves its replies unread")
            assert _dropped(sock, 60.0)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as later:
            assert later.recv(1024).startswith(b"220 ")  # its slot is free again


@pytest.mark.timeout(300)
def test_parallel_auth_guesses_are_held_to_auth_max_failures_relay_wide(tmp_path: Path) -> None:
    """12 parallel wrong AUTHs at a relay with its worker: 5 passwords checked (535), 7 get 454."""
    (tmp_path / "smtp-users").write_text(make_user_line("carol", "right") + "\n")
    smtp = 'trusted_networks = []\nauth_requires_tls = false\nauth_users_file = "smtp-users"'
    with running_relay(tmp_path, smtp) as relay:
        # The kernel may give one process every connection of a round, which would not
        # test the count across processes: then another round, from another loopback
        # address (a count of its own), until the sessions of one were split.
        for host in range(1, 6):
            source = f"127.0.0.{host}"
            codes = guess_in_parallel(relay.port, 12, source=source)
            assert sorted(codes) == [454] * 7 + [535] * 5, f"{source}: {sorted(codes)}"
            lines = rf"smtp: {re.escape(source)} (failed|refused) AUTH PLAIN"
            relay.wait_for_log(lines, 12)
            log = relay.log_text()
            checked = re.findall(rf"smtp: {re.escape(source)} failed AUTH PLAIN", log)
            in_worker = re.findall(rf"smtp worker 1: {lines}", log)
            print(f"{source}: codes {sorted(codes)}; {len(in_worker)} of 12 in the worker")
            assert len(checked) == 5  # passwords checked, in both processes together
            if 0 < len(in_worker) < 12:
                return
    raise AssertionError("five rounds, and the kernel never split one between the processes")

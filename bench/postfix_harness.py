"""A throw-away Postfix for the benchmarks, and the smtp-source driver they share.

The benchmarks compare the relay with this machine's Postfix (Debian's package, installed
with "No configuration", so no system instance runs).  :class:`Postfix` makes a private
instance: its own ``config_directory``, queue and data directories under a fresh temp
directory, listening only on loopback on one high port (the stock ``smtp/inet`` service
is commented out, so port 25 is never opened), logging to a file there instead of
syslog.  The caller adds the ``main.cf`` settings that make it do what the benchmark
needs (hold everything, relay to a sink, ...).  Start waits until the port answers; stop
waits until the master has exited, then removes the directory.

    with Postfix(port, {"mynetworks": "127.0.0.0/8"}) as postfix:
        drive(port, 1000, 20, 4096)
        print(postfix.queue_files("incoming"))

Bench scripts run as ``python bench/X.py`` (``sys.path[0]`` is ``bench/``), so they
``import postfix_harness``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

__all__ = [
    "SMTP_SOURCE",
    "Postfix",
    "drive",
    "free_port",
    "process_cpu_seconds",
    "wait_listening",
]

SMTP_SOURCE = "/usr/sbin/smtp-source"

# What every throw-away instance has: private directories, loopback only, no syslog,
# no DNS lookup of its own name.  Callers' settings come after these and may override.
_BASE_SETTINGS = {
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "compatibility_level": "3.6",
    "shlib_directory": "/usr/lib/postfix",
    "daemon_directory": "/usr/lib/postfix/sbin",
    "command_directory": "/usr/sbin",
    "inet_interfaces": "loopback-only",
    "inet_protocols": "ipv4",
    "myhostname": "bench.test",
}


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU so far of these processes (all their threads), from /proc.

    A process that has exited counts nothing (its last figures are gone with it).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drive(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    *,
    sender: str = "from@x.test",
    recipient: str = "to@y.test",
) -> float:
    """Run smtp-source against 127.0.0.1:port (one message per connection); return seconds.

    Each run starts with the page cache clean (``os.sync()`` first): otherwise the
    writeback of the previous run's files (spools, the sink's dump) lands on this run's
    fsyncs, and whichever server runs second pays for the first.
    """
    os.sync()
    command = [
        SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
        "-f", sender, "-t", recipient, f"127.0.0.1:{port}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def wait_listening(port: int, limit: float = 20.0) -> None:
    """Return once 127.0.0.1:port accepts a connection; RuntimeError after ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {limit} s")


class Postfix:
    """One private Postfix instance whose smtpd listens on 127.0.0.1:``port``."""

    def __init__(self, port: int, settings: Mapping[str, str]) -> None:
        self.port = port
        self.base = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        self.etc = self.base / "etc"
        self.queue = self.base / "spool"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self._started = False
        try:
            self._configure(settings)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _configure(self, settings: Mapping[str, str]) -> None:
        for directory in (self.etc, self.queue, self.data):
            directory.mkdir()
        for name in ("master.cf", "dynamicmaps.cf", "postfix-files"):
            shutil.copy(f"/etc/postfix/{name}", self.etc / name)
        for name in ("dynamicmaps.cf.d", "postfix-files.d"):
            if Path(f"/etc/postfix/{name}").is_dir():
                shutil.copytree(f"/etc/postfix/{name}", self.etc / name)
        (self.etc / "main.cf").write_text("")
        shutil.chown(self.data, "postfix")
        for path in (self.base, self.etc):
            path.chmod(0o755)
        everything = {
            **_BASE_SETTINGS,
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": str(self.etc),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            **settings,
        }
        self.postconf("-e", *(f"{key}={value}" for key, value in everything.items()))
        self.postconf("-M#", "smtp/inet")
        port = self.port
        self.postconf("-Me", f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - y - - smtpd")
        self.postconf("-Me", "postlog/unix-dgram = postlog unix-dgram n - n - 1 postlogd")

    def postconf(self, *args: str) -> None:
        """Run ``postconf`` on this instance's configuration."""
        subprocess.run(["postconf", "-c", str(self.etc), *args], check=True)

    def start(self) -> None:
        """Start the instance; return once its smtpd accepts connections."""
        self._started = True
        subprocess.run(["postfix", "-c", str(self.etc), "start"], check=True, capture_output=True)
        wait_listening(self.port)

    def stop(self) -> None:
        """Stop the instance (if started), wait for its master to exit, remove its files."""
        try:
            if self._started:
                pid = self._master_pid()
                subprocess.run(
                    ["postfix", "-c", str(self.etc), "stop"], check=False, capture_output=True
                )
                self._started = False
                if pid is not None:
                    _wait_exit(pid, 20.0)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def queue_files(self, *subdirs: str) -> int:
        """How many queue files are in these queue subdirectories (incoming, hold, ...)."""
        return sum(len(files) for sub in subdirs for _, _, files in os.walk(self.queue / sub))

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> Postfix:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_exit(pid: int, limit: float) -> None:
    """Wait until process ``pid`` (not our child) is gone, at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)

"""Postfix's smtp-sink(1) as a test peer: start it on 127.0.0.1, read what it received.

smtp-sink is a real, independent SMTP server (tests/install-peers.sh installs it; a
missing one is an error, never a skip).  ``-D FILE`` appends every message it receives,
with ``X-Mail-Args`` / ``X-Rcpt-Args`` lines for the envelope, to FILE; when run as root
it must drop privileges (``-u nobody``), so the dump directory is world-writable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SMTP_SINK", "Sink", "SinkPool", "free_port", "running_sink"]

SMTP_SINK = "/usr/sbin/smtp-sink"


@dataclass
class Sink:
    """A running smtp-sink: where it listens and where it dumps messages."""

    port: int
    dump: Path
    process: subprocess.Popen[bytes]

    @property
    def destination(self) -> str:
        """The destination key (a bracketed smarthost) that reaches it."""
        return f"[127.0.0.1]:{self.port}"

    def dumped(self) -> str:
        """What smtp-sink wrote to its dump file so far."""
        return self.dump.read_text(encoding="utf-8", errors="replace")


class SinkPool:
    """Starts smtp-sinks for one test and stops them all afterwards."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="relay-sink-"))
        self._dir.chmod(0o777)
        self._sinks: list[Sink] = []

    def start(self, *options: str, port: int | None = None) -> Sink:
        """A new smtp-sink with ``options`` (on ``port`` if given), listening when this returns."""
        assert os.access(SMTP_SINK, os.X_OK), "smtp-sink missing: run tests/install-peers.sh"
        dump = self._dir / f"dump{len(self._sinks)}"
        dump.touch()
        dump.chmod(0o666)
        port = free_port() if port is None else port
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        process = subprocess.Popen(
            [SMTP_SINK, *user, "-D", str(dump), *options, f"127.0.0.1:{port}", "16"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        sink = Sink(port, dump, process)
        self._sinks.append(sink)
        _wait_listening(port, process)
        return sink

    def stop(self) -> None:
        """Stop every sink and remove the dumps."""
        for sink in self._sinks:
            sink.process.terminate()
            sink.process.wait(timeout=10)
            if sink.process.stderr is not None:
                sink.process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def running_sink(*options: str) -> Iterator[Sink]:
    """One smtp-sink started with ``options`` for a with-block, stopped afterwards."""
    pool = SinkPool()
    try:
        yield pool.start(*options)
    finally:
        pool.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            assert process.stderr is not None
            raise RuntimeError(f"smtp-sink exited: {process.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("smtp-sink did not start listening")

"""Local channel benchmark: Maildir deliveries/s next to the disk's raw fsync rate.

Prints ONE JSON line.  Each Maildir delivery costs two fsyncs (the file, then the
``new/`` directory) plus a thread hop, so one delivery at a time can reach at most about
half the raw rate of "write 4 KiB + fsync" on the same disk; with several deliveries in
flight the channel's thread pool overlaps them.  The numbers are what the channel's
session gives (``add_recipient`` with its pool hop), not the mailbox code called alone.

Runs for about ``--seconds`` (default 9) in three equal phases, in a directory on the
same disk as this checkout (not tmpfs), removed afterwards::

    .venv/bin/python bench/local.py [--seconds 9] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from relay.address import parse_forward_path, parse_reverse_path
from relay.channels.local import build_local_channel
from relay.config import parse_config
from relay.envelope import Destination, Envelope, Recipient, Submitter

from fakes import BytesMessage

MESSAGE_BYTES = 4096
CONCURRENCY = 4


def raw_fsync_rate(directory: Path, seconds: float) -> float:
    """Files of 4 KiB written and fsynced per second (a new file each time)."""
    directory.mkdir()
    data = os.urandom(MESSAGE_BYTES)
    count = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        fd = os.open(directory / f"f{count}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        count += 1
    return count / (time.monotonic() - start)


def _message(index: int) -> BytesMessage:
    body = b"x" * 76 + b"\r\n"
    header = b"Subject: bench %d\r\n\r\n" % index
    text = header + body * ((MESSAGE_BYTES - len(header)) // len(body))
    text += b"y" * (MESSAGE_BYTES - len(text))
    envelope = Envelope(
        return_path=parse_reverse_path("<bench@remote.test>"),
        recipients=(Recipient(parse_forward_path("<alice@example.test>")),),
        arrival=time.time(),
        submitter=Submitter("ESMTP"),
    )
    return BytesMessage(f"B{index}", envelope, text)


class FsyncCounter:
    """Counts ``os.fsync`` calls (from any thread) while installed: what a delivery costs."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counting(fd: int) -> None:
            self.calls += 1  # one increment per call; the GIL makes it safe enough here
            self._real(fd)

        os.fsync = counting
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


async def delivery_rate(
    reactor: Any, base: Path, seconds: float, concurrency: int
) -> tuple[float, int]:
    """Maildir deliveries/s through the channel's session, ``concurrency`` at a time,
    and how many deliveries that was."""
    base.mkdir()
    config = parse_config(
        '[relay]\nhostname = "bench.test"\nlocal_domains = ["example.test"]\n'
        '[local]\nusers = ["alice"]\n',
        base,
    )
    channel = build_local_channel(config, None, reactor)
    message = _message(0)
    done = 0
    start = time.monotonic()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal done
        session = await channel.open_session(Destination("local", ""))
        await session.begin_message("m", message.envelope.return_path, message)
        rcpt = message.envelope.recipients[0]
        while time.monotonic() < deadline:
            reply = await session.add_recipient(rcpt)
            if not reply.code.is_success:
                raise RuntimeError(str(reply))
            done += 1

    try:
        await defer.gatherResults(
            [defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True
        )
    finally:
        await channel.close()
    elapsed = time.monotonic() - start
    delivered = len(list((base / "var/mail/alice/new").iterdir()))
    if delivered != done:
        raise RuntimeError(f"{done} deliveries answered, {delivered} files in new/")
    return done / elapsed, done


async def main(reactor: Any, options: argparse.Namespace) -> None:
    """Run the three phases and print the JSON line."""
    parent = Path(options.dir) if options.dir else Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix=".bench-local-", dir=parent))
    phase = options.seconds / 3
    try:
        fsync = raw_fsync_rate(work / "raw", phase)
        with FsyncCounter() as fsyncs:
            sequential, n_seq = await delivery_rate(reactor, work / "seq", phase, 1)
            concurrent, n_par = await delivery_rate(reactor, work / "par", phase, CONCURRENCY)
        same_disk = (
            os.stat(work).st_dev == os.stat("/work" if Path("/work").exists() else parent).st_dev
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "local",
                "message_bytes": MESSAGE_BYTES,
                "maildir_deliveries_per_s": round(concurrent, 1),
                "concurrency": CONCURRENCY,
                "maildir_deliveries_per_s_sequential": round(sequential, 1),
                "raw_fsync_per_s": round(fsync, 1),
                "fsyncs_per_delivery": round(fsyncs.calls / (n_seq + n_par), 2),
                "seconds_per_phase": round(phase, 2),
                "directory": str(parent),
                "same_device_as_work": same_disk,
            }
        )
    )


def run() -> None:
    """Parse the options and run under the reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=9.0, help="total run time (3 phases)")
    parser.add_argument("--dir", default=None, help="where to write (default: bench/)")
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))


if __name__ == "__main__":
    run()

"""Spool throughput against the disk's own fsync rate; prints one JSON line.

What it measures, on one disk, in one run:

* ``raw_fsync_per_s``: create a file, write 4 KiB, fsync, close; as fast as possible.
  That is the ceiling of a spool that makes one file per message durable on its own.
* ``stores_per_s`` at concurrency 1, 8 and 64: ``SpoolQueue.store`` of a 4 KiB message,
  with that many stores outstanding (each completion starts the next).  Group commit
  should make concurrency 64 several times faster than the raw fsync rate.
* ``ratio_at_64``: stores/s at 64 divided by the raw fsync rate (target: >= 5).

The spool lives in a temporary directory under ``var/`` beside this checkout (the same
disk as the code, and not ``/tmp``, which may be a tmpfs where fsync costs nothing);
``--dir`` chooses another parent.  Each point runs for ``--seconds`` (default 3).

    .venv/bin/python bench/spool.py [--seconds 3] [--dir PATH]
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
from twisted.internet.defer import Deferred

from relay.address import parse_forward_path, parse_reverse_path
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.queue.store import SpoolQueue

MESSAGE_SIZE = 4096
CONCURRENCY = (1, 8, 64)
TARGET_RATIO = 5.0


def raw_fsync_rate(directory: Path, seconds: float) -> float:
    """Files per second: create, write 4 KiB, fsync, close (then removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(MESSAGE_SIZE)
    count = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        path = directory / f"f{count}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        count += 1
    shutil.rmtree(directory)
    return count / elapsed


def envelope() -> Envelope:
    """A small realistic envelope: one sender, one routed recipient."""
    return Envelope(
        return_path=parse_reverse_path("<alice@example.test>"),
        recipients=(
            Recipient(parse_forward_path("<bob@dest.test>"), Destination("smtp", "dest.test")),
        ),
        arrival=time.time(),
        submitter=Submitter("ESMTP", "192.0.2.1"),
    )


async def store_rate(
    reactor: Any, spool: Path, concurrency: int, seconds: float
) -> tuple[float, float]:
    """(stores/s, fsyncs/s) with ``concurrency`` stores outstanding for ``seconds``."""
    queue = await SpoolQueue.open(spool, reactor)
    text = os.urandom(MESSAGE_SIZE)
    env = envelope()
    done = 0
    start = time.monotonic()
    deadline = start + seconds
    finished: Deferred[None] = Deferred()
    running = 0

    def one() -> None:
        nonlocal running
        running += 1
        queue.store(env, text).addCallbacks(stored, failed)

    def stored(_: str) -> None:
        nonlocal done, running
        done += 1
        running -= 1
        if time.monotonic() < deadline:
            one()
        elif running == 0 and not finished.called:
            finished.callback(None)

    def failed(failure: Any) -> None:
        if not finished.called:
            finished.errback(failure)

    batches_before = queue.writer.batches
    for _ in range(concurrency):
        one()
    await finished
    elapsed = time.monotonic() - start
    batches = queue.writer.batches - batches_before
    await queue.close()
    shutil.rmtree(spool)
    return done / elapsed, batches / elapsed


async def run(reactor: Any, args: argparse.Namespace) -> None:
    parent = Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "var"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=parent))
    try:
        raw = raw_fsync_rate(work / "raw", args.seconds)
        stores: dict[str, float] = {}
        syncs: dict[str, float] = {}
        for concurrency in CONCURRENCY:
            rate, sync_rate = await store_rate(
                reactor, work / f"spool-{concurrency}", concurrency, args.seconds
            )
            stores[str(concurrency)] = round(rate, 1)
            syncs[str(concurrency)] = round(sync_rate, 1)
        ratio = stores["64"] / raw if raw else float("inf")
        result = {
            "bench": "spool",
            "message_size": MESSAGE_SIZE,
            "seconds_per_point": args.seconds,
            "raw_fsync_per_s": round(raw, 1),
            "stores_per_s": stores,
            "fsyncs_per_s": syncs,
            "ratio_at_64": round(ratio, 2),
            "target_ratio_at_64": TARGET_RATIO,
            "meets_target": ratio >= TARGET_RATIO,
            "dir": str(parent),
        }
        sys.stdout.write(json.dumps(result) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each point")
    parser.add_argument("--dir", help="parent directory for the spools (default: ./var)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()

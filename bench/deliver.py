"""Deliverer throughput through the discard channel, in both modes; prints one JSON line.

For each queue and each sequencing mode it queues ``--messages`` messages of
``--recipients`` recipients (4 KiB of text, all for the discard channel, already
routed), starts the deliverer, and measures until the queue is empty:

* ``queue: "memory"`` — the in-memory IQueue of the tests (``tests/support/memqueue.py``) on a
  ``task.Clock``: every Deferred fires at once, so this is the deliverer's own cost
  (scan, claims, sequencing, decisions, log events, status records) and nothing else.
  ``cpu_us_per_message`` is ``time.process_time()`` over the run / messages.
* ``queue: "spool"`` — the real spool (``relay.queue``) in a directory under ``var/``
  (``--dir`` to change; not ``/tmp``, which may be a tmpfs where fsync is free), on the
  real reactor.  The messages are stored first (``store_s``, not in the rates); the
  delivery phase then writes one durable record per message.  ``cpu_us_per_message``
  is the whole process (reactor, spool writer and reader threads);
  ``reactor_cpu_us_per_message`` only the reactor thread (the deliverer plus the
  spool's in-memory bookkeeping, ``time.thread_time()``); ``fsyncs`` the writer's
  fdatasync batches in the delivery phase; the rest of the wall time is waiting for
  the disk.

Log events go to a null observer (formatting and writing a log is the sink's cost).

    .venv/bin/python bench/deliver.py [--messages 10000] [--recipients 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from relay.address import parse_forward_path, parse_reverse_path  # noqa: E402
from relay.channels.discard import DiscardChannel  # noqa: E402
from relay.config import parse_config  # noqa: E402
from relay.deliver import DelivererService, build_deliverer  # noqa: E402
from relay.envelope import Destination, Envelope, Recipient, Submitter  # noqa: E402
from relay.interfaces import IQueue, SequencingMode  # noqa: E402
from relay.queue.ready import QueueReady  # noqa: E402
from relay.queue.store import SpoolQueue  # noqa: E402

from support.memqueue import MemoryQueue  # noqa: E402

CONFIG = """
[relay]
hostname = "bench.test"
local_domains = ["bench.test"]
"""
TEXT_SIZE = 4096
DISCARD = Destination("discard", "")


def _envelope(recipients: int, serial: int, arrival: float) -> Envelope:
    return Envelope(
        return_path=parse_reverse_path("<alice@example.test>"),
        recipients=tuple(
            Recipient(parse_forward_path(f"<r{serial}x{i}@dest.test>"), DISCARD)
            for i in range(recipients)
        ),
        arrival=arrival,
        submitter=Submitter("ESMTP", "192.0.2.1"),
    )


def _text() -> bytes:
    header = b"From: alice@example.test\r\nTo: bob@dest.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return header + line * ((TEXT_SIZE - len(header)) // len(line))


def _deliverer(queue: IQueue, mode: SequencingMode, clock: Any) -> DelivererService:
    config = parse_config(CONFIG, ROOT)
    channel = DiscardChannel(mode)
    quiet = Logger(observer=lambda event: None)
    return build_deliverer(
        config, QueueReady.of(queue), {"discard": channel}, clock, random.Random(1), log=quiet
    )


def memory_run(mode: SequencingMode, messages: int, recipients: int) -> dict[str, Any]:
    """The deliverer alone: the in-memory queue on a Clock."""
    clock = task.Clock()
    clock.advance(time.time())
    queue = MemoryQueue(clock)
    text = _text()
    for serial in range(messages):
        queue.store(_envelope(recipients, serial, clock.seconds()), text)
    service = _deliverer(queue, mode, clock)
    cpu = time.process_time()
    wall = time.perf_counter()
    service.startService()
    clock.advance(0)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    if queue.queued():
        raise RuntimeError(f"{len(queue.queued())} messages left undelivered")
    service.stopService()
    clock.advance(10)
    return {
        "queue": "memory",
        "mode": mode.value,
        "deliveries_per_s": round(messages * recipients / wall, 1),
        "messages_per_s": round(messages / wall, 1),
        "cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "wall_s": round(wall, 3),
    }


async def spool_run(
    reactor: Any, spool: Path, mode: SequencingMode, messages: int, recipients: int
) -> dict[str, Any]:
    """The deliverer on the real spool and the real reactor."""
    queue = await SpoolQueue.open(spool, reactor)
    text = _text()
    started = time.perf_counter()
    stores = [
        queue.store(_envelope(recipients, serial, time.time()), text) for serial in range(messages)
    ]
    await defer.gatherResults(stores)
    store_s = time.perf_counter() - started
    service = _deliverer(queue, mode, reactor)
    batches = queue.writer.batches
    records = queue.writer.records
    cpu = time.process_time()
    thread_cpu = time.thread_time()
    wall = time.perf_counter()
    service.startService()
    while queue.entries():
        await task.deferLater(reactor, 0.02, lambda: None)
    wall = time.perf_counter() - wall
    thread_cpu = time.thread_time() - thread_cpu
    cpu = time.process_time() - cpu
    fsyncs = queue.writer.batches - batches
    written = queue.writer.records - records
    await service.stopService()
    await queue.close()
    shutil.rmtree(spool)
    return {
        "queue": "spool",
        "mode": mode.value,
        "deliveries_per_s": round(messages * recipients / wall, 1),
        "messages_per_s": round(messages / wall, 1),
        "cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "reactor_cpu_us_per_message": round(thread_cpu / messages * 1e6, 1),
        "fsyncs": fsyncs,
        "records": written,
        "wall_s": round(wall, 3),
        "store_s": round(store_s, 3),
    }


async def run(reactor: Any, args: argparse.Namespace) -> None:
    parent = Path(args.dir) if args.dir else ROOT / "var"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-deliver-", dir=parent))
    results: list[dict[str, Any]] = []
    try:
        for mode in SequencingMode:
            results.append(memory_run(mode, args.messages, args.recipients))
        for mode in SequencingMode:
            spool = work / f"spool-{mode.name.lower()}"
            results.append(await spool_run(reactor, spool, mode, args.messages, args.recipients))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line = {
        "bench": "deliver",
        "channel": "discard",
        "messages": args.messages,
        "recipients_per_message": args.recipients,
        "text_size": len(_text()),
        "log": "null observer",
        "cpus": os.cpu_count(),
        "results": results,
        "dir": str(parent),
    }
    sys.stdout.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--recipients", type=int, default=3)
    parser.add_argument("--dir", help="parent directory for the spools (default: ./var)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()

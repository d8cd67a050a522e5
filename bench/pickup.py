"""The maildrop: how fast sendmail's drop is, and how fast the pickup empties it.

* ``drops_per_s``: :func:`relay.maildrop.submit.drop` of a 4 KiB message, one after
  another, as ``relay sendmail`` does once per process (file fsync + directory fsync;
  without the process start, which costs more than the drop).
* ``picked_per_s``: those files taken into a real spool by the pickup service, started
  with all of them waiting (mail left while the relay was down), until the drop
  directory is empty; ``syncs_per_message`` says how much the spool's group commit
  shared its fsyncs over a pickup batch.

The maildrop and spool live under ``var/`` beside this checkout (not ``/tmp``, which may
be a tmpfs); ``--dir`` chooses another parent.  Prints one JSON line.

    .venv/bin/python bench/pickup.py [--messages 1000] [--dir PATH]
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

from relay.address import parse_forward_path, parse_reverse_path
from relay.maildrop.dropfile import encode_drop_file
from relay.maildrop.layout import MaildropLayout
from relay.maildrop.pickup import PickupService
from relay.maildrop.submit import drop
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue

MESSAGE_SIZE = 4096


async def measure(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    parent = Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "var"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pickup-", dir=parent))
    try:
        layout = MaildropLayout(work / "maildrop")
        text = b"Subject: bench\r\n\r\n" + b"x" * (MESSAGE_SIZE - 20) + b"\r\n"
        data = encode_drop_file(
            parse_reverse_path("<alice@example.test>"),
            [parse_forward_path("<bob@dest.test>")],
            text,
        )
        start = time.monotonic()
        for _ in range(args.messages):
            drop(layout, data)
        drops = args.messages / (time.monotonic() - start)

        queue = await SpoolQueue.open(work / "spool", reactor)
        pickup = PickupService(
            layout, QueueReady.of(queue), reactor, hostname="bench.test", max_text=1 << 20
        )
        start = time.monotonic()
        pickup.startService()
        while pickup.stored < args.messages or os.listdir(layout.drop_dir):
            await task.deferLater(reactor, 0.01, lambda: None)
        picked = args.messages / (time.monotonic() - start)
        await pickup.stopService()
        syncs = queue.writer.batches
        await queue.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "bench": "pickup",
        "messages": args.messages,
        "message_size": MESSAGE_SIZE,
        "drops_per_s": round(drops, 1),
        "picked_per_s": round(picked, 1),
        "syncs_per_message": round(syncs / args.messages, 3),
        "dir": str(parent),
    }


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """Measure, then print the one JSON line."""
    sys.stdout.write(json.dumps(await measure(reactor, args)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="files dropped, then taken")
    parser.add_argument("--dir", help="parent directory for maildrop and spool (./var)")
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, parser.parse_args())))


if __name__ == "__main__":
    main()

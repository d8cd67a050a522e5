"""What the spool's tests share: envelopes, reading a text back, opening a spool."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relay.address import parse_forward_path, parse_reverse_path
from relay.envelope import BodyType, Destination, Envelope, Recipient, Submitter
from relay.interfaces import IMessage
from relay.queue.key import load_key, segment_framing
from relay.queue.layout import SpoolLayout
from relay.queue.record import ScanResult, scan
from relay.queue.store import SpoolQueue

SMTP_DEST = Destination("smtp", "dest.test")
LOCAL_DEST = Destination("local", "")


def make_envelope(
    recipients: int = 1,
    *,
    sender: str | None = "alice@example.test",
    destinations: tuple[Destination | None, ...] = (SMTP_DEST,),
    arrival: float | None = None,
) -> Envelope:
    """An envelope with ``recipients`` addresses, destinations taken round-robin."""
    return Envelope(
        return_path=None if sender is None else parse_reverse_path(f"<{sender}>", smtputf8=True),
        recipients=tuple(
            Recipient(
                parse_forward_path(f"<user{i}@dest.test>"),
                destinations[i % len(destinations)],
            )
            for i in range(recipients)
        ),
        arrival=time.time() if arrival is None else arrival,
        submitter=Submitter("ESMTP", "192.0.2.1", "client.test", "client.test"),
        body_type=BodyType.EIGHT_BIT_MIME,
        smtputf8=sender is not None and not sender.isascii(),
    )


async def read_all(message: IMessage, chunk: int = 1000) -> bytes:
    """The whole text of a queued message, read chunk by chunk."""
    reader = message.open_text()
    parts = []
    try:
        while True:
            data = await reader.read(chunk)
            if not data:
                return b"".join(parts)
            parts.append(data)
    finally:
        reader.close()


def open_queue(
    path: Path,
    *,
    clock: IReactorTime | None = None,
    segment_limit: int = 1 << 20,
    fresh_text_budget: int | None = None,
) -> Deferred[SpoolQueue]:
    """Open (and recover) the spool at ``path`` on the global reactor."""
    extra = {} if fresh_text_budget is None else {"fresh_text_budget": fresh_text_budget}
    return SpoolQueue.open(path, reactor, clock, segment_limit=segment_limit, **extra)  # type: ignore[arg-type]


def scan_segment(root: Path, number: int) -> ScanResult:
    """The records of segment ``number`` of the spool at ``root``, read with its key."""
    layout = SpoolLayout(root)
    framing = segment_framing(load_key(layout), number)
    return scan(layout.segment_path(number).read_bytes(), framing)


@contextmanager
def mounted_tmpfs(directory: Path, options: str, purpose: str) -> Iterator[None]:
    """A tmpfs mounted on ``directory`` for the block; the test fails if it cannot be."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{purpose} needs a tmpfs mounted (run as root, with mount permitted): "
            f"mount said: {done.stderr.strip() or done.returncode}"
        )
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)

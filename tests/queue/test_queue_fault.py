"""A full disk: a store that cannot be made durable fails cleanly and leaves nothing behind."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from relay.errors import SpoolError
from relay.queue.layout import SpoolLayout
from relay.queue.store import SpoolQueue

from queue_helpers import make_envelope, mounted_tmpfs, open_queue, read_all, scan_segment


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (we run as root); the test fails if it cannot be."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    with mounted_tmpfs(mount_point, "size=256k,mode=0700", "the disk-full test"):
        yield mount_point / "spool"


async def _fill(queue: SpoolQueue, size: int) -> tuple[dict[str, bytes], Failure]:
    """Store messages of ``size`` octets until one fails; the stored ones and the failure."""
    stored: dict[str, bytes] = {}
    for _ in range(10_000):
        text = os.urandom(size)
        try:
            qid = await queue.store(make_envelope(), text)
        except Exception:
            return stored, Failure()
        stored[qid] = text
    raise AssertionError(f"the disk never filled up after {len(stored)} messages")


def _sound(root: Path) -> None:
    for number in SpoolLayout(root).segment_numbers():
        result = scan_segment(root, number)
        assert result.stop is None and not result.damaged, f"segment {number}: {result.stop}"


@pytest_twisted.ensureDeferred
async def test_a_store_on_a_full_disk_fails_with_spool_error_and_earlier_mail_survives(
    small_disk: Path,
) -> None:
    """ENOSPC fails the store with SpoolError, cuts its bytes off, and the spool reloads whole."""
    queue = await open_queue(small_disk)
    try:
        stored, failure = await _fill(queue, 4096)
        assert failure.check(SpoolError), failure.getTraceback()
        assert len(stored) > 10
        _sound(small_disk)  # nothing half-written is visible, even before a restart
        await queue.close()
        queue = await open_queue(small_disk)
        assert queue.quarantined == 0
        assert list(await queue.list_messages()) == sorted(stored)
        for qid, text in stored.items():
            assert await read_all(queue.open_message(qid), chunk=65536) == text
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_small_records_still_fit_when_a_big_one_in_the_same_batch_does_not(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch failed by ENOSPC is retried record by record, so status updates still land."""
    queue = await open_queue(small_disk)
    try:
        stored, _ = await _fill(queue, 16384)  # leaves less than 16 KiB free
        targets = sorted(stored)[:5]
        entered, release = threading.Event(), threading.Event()
        real = os.fdatasync

        def slow_sync(fd: int) -> None:
            entered.set()
            release.wait(10)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", slow_sync)
        blocker = queue.hold(targets[0])  # occupies the writer while the batch queues up
        assert entered.wait(10)
        big = queue.store(make_envelope(), os.urandom(200_000))
        holds = [queue.hold(qid) for qid in targets[1:]]
        release.set()
        assert await blocker == 1
        with pytest.raises(SpoolError):
            await big
        assert await defer.gatherResults(holds) == [1, 1, 1, 1]
        _sound(small_disk)
        await queue.close()
        queue = await open_queue(small_disk)
        for qid in targets:
            assert [s.state.value for s in (await queue.load(qid))[1]] == ["held"]
    finally:
        release.set()
        await queue.close()

"""The group-commit writer on its own: batches, their size limit, order, and stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import LogEvent, globalLogPublisher

from relay.errors import SpoolError
from relay.queue import writer as writer_module
from relay.queue.key import open_key
from relay.queue.layout import SpoolLayout
from relay.queue.record import RecordType
from relay.queue.segment import DEFAULT_SEGMENT_LIMIT, SegmentLog
from relay.queue.writer import GroupCommitWriter, Written


def _writer(tmp_path: Path, max_batch_bytes: int) -> GroupCommitWriter:
    layout = SpoolLayout(tmp_path)
    layout.make_dirs()
    log = SegmentLog(layout, open_key(layout), 1, 0, DEFAULT_SEGMENT_LIMIT)
    return GroupCommitWriter(log, reactor, max_batch_bytes=max_batch_bytes, commit_delay=0)  # type: ignore[arg-type]


async def _append_before_start(writer: GroupCommitWriter, sizes: list[int]) -> list[Written]:
    """Queue records while the thread is not running yet, so the batches are predictable."""
    waiting = [writer.append(RecordType.MESSAGE, [b"x" * size]) for size in sizes]
    writer.start()
    return list(await defer.gatherResults(waiting))


@pytest_twisted.ensureDeferred
async def test_everything_waiting_shares_one_sync(tmp_path: Path) -> None:
    """Five records queued together are written in log order with one fdatasync."""
    writer = _writer(tmp_path, 1 << 20)
    try:
        written = await _append_before_start(writer, [10, 20, 30, 40, 50])
        assert writer.batches == 1 and writer.records == 5
        offsets = [w.offset for w in written]
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
    finally:
        await writer.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_stops_at_its_size_limit(tmp_path: Path) -> None:
    """Records that would make a batch too big wait for the next one; none is lost."""
    writer = _writer(tmp_path, 100)
    try:
        written = await _append_before_start(writer, [60, 30, 60, 60, 150, 10])
        # [60, 30] | [60] | [60] | [150] (alone, over the limit by itself) | [10]
        assert writer.batches == 5 and writer.records == 6
        offsets = [w.offset for w in written]
        assert offsets == sorted(offsets)
    finally:
        await writer.stop()


@pytest_twisted.ensureDeferred
async def test_stop_writes_what_was_queued_and_refuses_the_rest(tmp_path: Path) -> None:
    """Records queued before stop() are made durable; later ones fail with SpoolError."""
    writer = _writer(tmp_path, 1 << 20)
    before = [writer.append(RecordType.MESSAGE, [b"a" * 8]) for _ in range(3)]
    writer.start()
    stopped = writer.stop()
    assert writer.stop() is stopped  # a second stop waits for the same end
    after = writer.append(RecordType.MESSAGE, [b"late"])
    with pytest.raises(SpoolError):
        await after
    assert len(await defer.gatherResults(before)) == 3
    await stopped
    assert writer.records == 3


@pytest_twisted.ensureDeferred
async def test_writers_arriving_together_get_a_moment_to_share_a_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a batch of several, the thread waits for the next records; a lone one, or one
    after a quiet spell, never waits."""
    layout = SpoolLayout(tmp_path)
    layout.make_dirs()
    log = SegmentLog(layout, open_key(layout), 1, 0, DEFAULT_SEGMENT_LIMIT)
    # The default delay is the module's COMMIT_DELAY when the writer is made (a bench sets it).
    monkeypatch.setattr(writer_module, "COMMIT_DELAY", 30.0)
    writer = GroupCommitWriter(log, reactor)  # type: ignore[arg-type]
    waits: list[float] = []
    late: list[Deferred[Written]] = []

    def wait(seconds: float) -> None:
        """Instead of sleeping: the records that were on their way arrive meanwhile."""
        waits.append(seconds)
        late.extend(blockingCallFromThread(reactor, _append_three))  # not waiting for them

    def _append_three() -> list[Deferred[Written]]:
        return [writer.append(RecordType.MESSAGE, [b"late"]) for _ in range(3)]

    monkeypatch.setattr(writer_module, "_sleep", wait)
    clock = [0.0]  # the writer's monotonic clock: batches end "just now" until moved on
    monkeypatch.setattr(writer_module, "_now", lambda: clock[0])
    try:
        await _append_before_start(writer, [10])  # alone: no wait
        assert waits == [] and writer.batches == 1
        await defer.gatherResults([writer.append(RecordType.MESSAGE, [b"x"]) for _ in range(2)])
        assert waits == [] and writer.batches == 2  # the last batch before was a lone one
        await writer.append(RecordType.MESSAGE, [b"first"])  # after a batch of two: it waits
        await defer.gatherResults(late)
        assert waits == [30.0]
        assert writer.batches == 3 and writer.records == 1 + 2 + 1 + 3  # one sync for four
        clock[0] += 60.0  # a quiet minute: the next record does not wait, despite the four
        await writer.append(RecordType.MESSAGE, [b"after a while"])
        assert waits == [30.0] and writer.batches == 4
    finally:
        await writer.stop()


@pytest_twisted.ensureDeferred
async def test_hooks_of_one_sync_share_their_finishers(tmp_path: Path) -> None:
    """Each distinct finisher returned by a sync's hooks runs once, after all the hooks."""
    writer = _writer(tmp_path, 1 << 20)
    calls: list[str] = []

    class Link:
        def __init__(self, name: str) -> None:
            self.name = name

        def hook(self, n: int) -> object:
            calls.append(f"{self.name}{n}")
            return self.finish

        def finish(self) -> None:
            calls.append(f"{self.name} done")

    a, b = Link("a"), Link("b")
    hooks = [lambda: a.hook(1), lambda: b.hook(1), lambda: a.hook(2), lambda: None]
    waiting = [writer.append(RecordType.MESSAGE, [b"x"], on_durable=h) for h in hooks]
    writer.start()
    try:
        await defer.gatherResults(waiting)
        assert writer.batches == 1
        assert calls == ["a1", "b1", "a2", "a done", "b done"]
    finally:
        await writer.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_finisher_costs_the_records_nothing(tmp_path: Path) -> None:
    """What a finisher raises is logged; the records are durable and their Deferreds fire."""
    writer = _writer(tmp_path, 1 << 20)

    def broken() -> None:
        raise RuntimeError("finisher broke")

    writer.start()
    try:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        try:
            written = await writer.append(RecordType.MESSAGE, [b"x"], on_durable=lambda: broken)
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert written.offset == 0 and writer.records == 1
        failures = [e["log_failure"] for e in events if "log_failure" in e]
        assert [str(f.value) for f in failures] == ["finisher broke"]
    finally:
        await writer.stop()

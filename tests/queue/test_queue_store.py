"""The spool as the relay uses it: durable stores, per-recipient updates, removal, reclaim."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relay.envelope import RecipientState, RecipientStatus
from relay.errors import SpoolError
from relay.interfaces import IHandoffStore, IMessage, IQueue, ITextReader
from relay.queue import record
from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLocked
from relay.queue.payload import encode_envelope
from relay.queue.recovery import recover
from relay.queue.state import NoSuchMessage
from relay.queue.store import SpoolQueue
from relay.reply import Reply, ReplyCode

from support.queue_helpers import LOCAL_DEST, SMTP_DEST, make_envelope, open_queue, read_all

DELIVERED = RecipientStatus(RecipientState.DELIVERED, 1, last_reply=Reply(ReplyCode.MOK))
FAILED = RecipientStatus(RecipientState.FAILED, 1, last_reply=Reply(ReplyCode.USER))


def _deferred(until: float, attempts: int = 1) -> RecipientStatus:
    return RecipientStatus(RecipientState.DEFERRED, attempts, until, Reply(ReplyCode.DHST))


async def _reopen(queue: SpoolQueue, **kw: object) -> SpoolQueue:
    await queue.close()
    return await open_queue(queue.layout.root, **kw)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_the_queue_provides_the_interfaces(spool: SpoolQueue) -> None:
    """SpoolQueue (IQueue, IHandoffStore), its messages and text readers verify as declared."""
    qid = await spool.store(make_envelope(), b"Subject: x\r\n\r\nhi\r\n")
    message = spool.open_message(qid)
    assert verifyObject(IQueue, spool)
    assert verifyObject(IHandoffStore, spool)
    assert verifyObject(IMessage, message)
    reader = message.open_text()
    assert verifyObject(ITextReader, reader)
    reader.close()


@pytest_twisted.ensureDeferred
async def test_a_stored_message_reads_back_identical_after_a_restart(tmp_path: Path) -> None:
    """Envelope and text come back byte for byte, in chunks, before and after reopening."""
    envelope = make_envelope(3, destinations=(SMTP_DEST, LOCAL_DEST, None))
    text = bytes(range(256)) * 300 + b"\r\n.\r\n"
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(envelope, text)
        assert (await queue.load(qid))[0] == envelope
        assert await read_all(queue.open_message(qid), chunk=4096) == text
        assert await read_all(queue.open_message(qid), chunk=7) == text  # a fresh stream
        queue = await _reopen(queue)
        loaded, statuses = await queue.load(qid)
        assert loaded == envelope
        assert [s.state for s in statuses] == [RecipientState.PENDING] * 3
        message = queue.open_message(qid)
        assert message.size == len(text)
        assert await read_all(message) == text
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_stores_waiting_during_a_sync_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every store queued while a sync runs is made durable by one single following sync."""
    queue = await open_queue(tmp_path)
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_sync(fd: int) -> None:
        entered.set()
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    try:
        first = queue.store(make_envelope(), os.urandom(4096))
        assert entered.wait(10)  # the writer is inside the first sync
        rest = [queue.store(make_envelope(), os.urandom(4096)) for _ in range(63)]
        release.set()
        ids = await defer.gatherResults([first, *rest])
        assert len(set(ids)) == 64
        assert ids == sorted(ids)  # ids sort by arrival, and log order is call order
        assert (queue.writer.batches, queue.writer.records) == (2, 64)
    finally:
        release.set()
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_an_empty_text_is_a_valid_message(spool: SpoolQueue) -> None:
    """A zero-octet text stores and reads back as b""."""
    qid = await spool.store(make_envelope(), b"")
    assert await read_all(spool.open_message(qid)) == b""


@pytest_twisted.ensureDeferred
async def test_updates_change_only_the_named_recipients_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    """An update sets the given recipients' states; the others keep theirs, durably."""
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(make_envelope(3), b"text")
        await queue.update(qid, {1: DELIVERED})
        await queue.update(qid, {2: _deferred(4e9)})
        queue = await _reopen(queue)
        _, statuses = await queue.load(qid)
        assert statuses == (RecipientStatus(), DELIVERED, _deferred(4e9))
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_updates_to_one_message_are_all_kept(tmp_path: Path) -> None:
    """Updates issued without waiting are applied in order; none overwrites another."""
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(make_envelope(4), b"text")
        await defer.gatherResults(
            [queue.update(qid, {i: _deferred(4e9, attempts=i + 1)}) for i in range(4)]
        )
        queue = await _reopen(queue)
        _, statuses = await queue.load(qid)
        assert [s.attempts for s in statuses] == [1, 2, 3, 4]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_message_whose_recipients_are_all_final_is_removed(tmp_path: Path) -> None:
    """When the last recipient becomes final, the message leaves the queue for good."""
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(make_envelope(2), b"text")
        keep = await queue.store(make_envelope(1), b"other")
        await queue.update(qid, {0: DELIVERED})
        assert await queue.list_messages() == [qid, keep]
        await queue.update(qid, {1: FAILED})
        assert await queue.list_messages() == [keep]
        with pytest.raises(NoSuchMessage):
            await queue.load(qid)
        with pytest.raises(NoSuchMessage):
            queue.open_message(qid)
        with pytest.raises(NoSuchMessage):
            await queue.update(qid, {0: DELIVERED})
        queue = await _reopen(queue)
        assert await queue.list_messages() == [keep]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_bad_update_is_refused_and_writes_nothing(spool: SpoolQueue) -> None:
    """An index outside the envelope fails the update and leaves the states as they were."""
    qid = await spool.store(make_envelope(1), b"text")
    records = spool.writer.records
    with pytest.raises(IndexError):
        await spool.update(qid, {0: DELIVERED, 5: DELIVERED})
    assert spool.writer.records == records
    assert (await spool.load(qid))[1] == (RecipientStatus(),)


@pytest_twisted.ensureDeferred
async def test_listeners_hear_of_new_mail_and_of_deferrals_falling_due(tmp_path: Path) -> None:
    """A listener is called on store, and when the injected clock reaches a next attempt."""
    clock = Clock()
    clock.advance(1_000_000)
    queue = await open_queue(tmp_path, clock=clock)
    calls: list[float] = []
    queue.add_listener(lambda: calls.append(clock.seconds()))
    try:
        qid = await queue.store(make_envelope(2), b"text")
        assert calls == [1_000_000]
        assert list(await queue.due(clock.seconds())) == [(qid, 0), (qid, 1)]
        await queue.update(qid, {0: _deferred(1_000_060), 1: _deferred(1_000_030)})
        assert list(await queue.due(clock.seconds())) == []
        assert queue.next_due_time() == 1_000_030
        clock.advance(30)
        assert calls == [1_000_000, 1_000_030]
        assert dict(await queue.due_by_destination(clock.seconds())) == {SMTP_DEST: [(qid, 1)]}
        clock.advance(30)
        assert list(await queue.due(clock.seconds())) == [(qid, 0), (qid, 1)]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_reopened_spool_rebuilds_the_due_index(tmp_path: Path) -> None:
    """After a restart, pending recipients are due and deferred ones wait for their time."""
    clock = Clock()
    queue = await open_queue(tmp_path, clock=clock)
    try:
        qid = await queue.store(make_envelope(2), b"text")
        await queue.update(qid, {1: _deferred(500)})
        queue = await _reopen(queue, clock=clock)
        assert list(await queue.due(0)) == [(qid, 0)]
        assert queue.next_due_time() == 500
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_hold_release_and_flush(tmp_path: Path) -> None:
    """Hold takes recipients out of the due set, release puts them back, flush makes due now."""
    clock = Clock()
    clock.advance(1000)
    queue = await open_queue(tmp_path, clock=clock)
    calls: list[None] = []
    try:
        qid = await queue.store(make_envelope(3, destinations=(SMTP_DEST, LOCAL_DEST)), b"t")
        await queue.update(qid, {0: _deferred(5000), 1: _deferred(5000), 2: DELIVERED})
        queue.add_listener(lambda: calls.append(None))
        assert await queue.hold(qid) == 2
        assert await queue.hold(qid) == 0
        assert queue.next_due_time() is None
        assert [s.state for s in (await queue.load(qid))[1]] == [
            RecipientState.HELD,
            RecipientState.HELD,
            RecipientState.DELIVERED,
        ]
        assert await queue.flush() == 0  # held mail is not flushed
        assert await queue.release(qid) == 2
        assert queue.next_due_time() == 5000  # back to deferred: their time is still ahead
        assert await queue.flush([qid], channel="local") == 1
        assert list(await queue.due(clock.seconds())) == [(qid, 1)]
        assert calls == [None]  # woken once, by the flush
        assert await queue.flush_message(qid) == 1
        assert list(await queue.due(clock.seconds())) == [(qid, 0), (qid, 1)]
        queue = await _reopen(queue, clock=clock)
        assert [s.state for s in (await queue.load(qid))[1]][:2] == [RecipientState.PENDING] * 2
        with pytest.raises(NoSuchMessage):
            await queue.hold("00000000000000")
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_remove_deletes_whatever_the_states(tmp_path: Path) -> None:
    """The operator's remove takes a message out even with recipients pending."""
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(make_envelope(2), b"text")
        await queue.remove(qid)
        assert await queue.list_messages() == []
        assert list(await queue.due(1e12)) == []
        queue = await _reopen(queue)
        assert await queue.list_messages() == []
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_deleting_a_segment_keeps_the_latest_status_of_an_older_live_message(
    tmp_path: Path,
) -> None:
    """A segment is deleted only after the newest status it held for a live message is copied."""
    queue = await open_queue(tmp_path, segment_limit=4096)
    try:
        old = await queue.store(make_envelope(2), b"x" * 5000)  # alone in segment 1
        await queue.update(old, {0: DELIVERED, 1: _deferred(4e9, attempts=3)})
        status_segment = queue.entry(old).status_segment
        fillers = [await queue.store(make_envelope(1), b"y" * 5000) for _ in range(3)]
        assert queue.entry(fillers[0]).segment == status_segment
        for qid in fillers:
            await queue.update(qid, {0: DELIVERED})
        await queue.reclaim()
        assert status_segment not in queue.segments()
        assert not SpoolLayout(tmp_path).segment_path(status_segment).exists()
        assert queue.entry(old).segment in queue.segments()
        queue = await _reopen(queue, segment_limit=4096)
        _, statuses = await queue.load(old)
        assert statuses == (DELIVERED, _deferred(4e9, attempts=3))
        assert await queue.list_messages() == [old]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_deleting_a_segment_never_brings_a_removed_message_back(tmp_path: Path) -> None:
    """The DONE record of a message in a surviving segment is copied before its segment goes."""
    queue = await open_queue(tmp_path, segment_limit=4096)
    try:
        keeper = await queue.store(make_envelope(1), b"k" * 100)
        gone = await queue.store(make_envelope(1), b"g" * 5000)  # fills segment 1
        filler = await queue.store(make_envelope(1), b"f" * 100)  # segment 2
        await queue.remove(gone)  # its DONE lands in segment 2
        pad = await queue.store(make_envelope(1), b"p" * 5000)  # fills segment 2
        middle = queue.entry(filler).segment
        assert queue.entry(pad).segment == middle != queue.entry(keeper).segment
        await queue.remove(filler)
        await queue.remove(pad)  # segment 3 now: segment 2 holds nothing live
        await queue.reclaim()
        assert middle not in queue.segments()
        assert queue.entry(keeper).segment in queue.segments()
        queue = await _reopen(queue, segment_limit=4096)
        assert await queue.list_messages() == [keeper]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_sync_fails_the_store_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error on fdatasync fails the store with SpoolError and cuts the bytes off again."""
    queue = await open_queue(tmp_path)
    try:
        first = await queue.store(make_envelope(), b"first")
        segment = SpoolLayout(tmp_path).segment_path(queue.entry(first).segment)
        size = segment.stat().st_size
        real = os.fdatasync
        failures = [OSError(errno.EIO, "Input/output error")]

        def failing(fd: int) -> None:
            if failures:
                raise failures.pop()
            real(fd)

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(SpoolError):
            await queue.store(make_envelope(), b"lost")
        assert segment.stat().st_size == size
        second = await queue.store(make_envelope(), b"second")
        queue = await _reopen(queue)
        assert await queue.list_messages() == [first, second]
        assert await read_all(queue.open_message(second)) == b"second"
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_log_that_cannot_be_cut_back_refuses_later_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a failed batch cannot be truncated away, every later store fails too."""
    queue = await open_queue(tmp_path)
    try:
        first = await queue.store(make_envelope(), b"first")
        real_sync, real_truncate = os.fdatasync, os.ftruncate
        failures = [OSError(errno.EIO, "Input/output error")]

        def failing_sync(fd: int) -> None:
            if failures:
                raise failures.pop()
            real_sync(fd)

        def failing_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing_sync)
        monkeypatch.setattr(os, "ftruncate", failing_truncate)
        with pytest.raises(SpoolError):
            await queue.store(make_envelope(), b"lost")
        monkeypatch.setattr(os, "ftruncate", real_truncate)
        with pytest.raises(SpoolError, match="unusable"):
            await queue.store(make_envelope(), b"refused")
        assert [e.queue_id for e in queue.entries()] == [first]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_record_over_the_format_limit_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message too big for the record format fails with SpoolError; the writer goes on."""
    queue = await open_queue(tmp_path)
    try:
        monkeypatch.setattr(record, "MAX_PAYLOAD", 2000)
        big = queue.store(make_envelope(), b"x" * 5000)
        small = queue.store(make_envelope(), b"y" * 10)
        with pytest.raises(SpoolError):
            await big
        qid = await small
        assert await queue.list_messages() == [qid]
        assert await read_all(queue.open_message(await queue.store(make_envelope(), b"z"))) == b"z"
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_text_damaged_on_disk_fails_the_read_instead_of_ending_it(tmp_path: Path) -> None:
    """A reader whose checksum no longer matches fails at the end rather than answering b""."""
    queue = await open_queue(tmp_path, fresh_text_budget=0)
    try:
        qid = await queue.store(make_envelope(), b"A" * 10_000)
        entry = queue.entry(qid)
        path = SpoolLayout(tmp_path).segment_path(entry.segment)
        with open(path, "r+b") as f:
            f.seek(entry.text_offset + 5000)
            f.write(b"B")
        with pytest.raises(SpoolError):
            await read_all(queue.open_message(qid))
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_an_untried_text_is_read_from_memory_until_its_first_status_update(
    tmp_path: Path,
) -> None:
    """The first attempt reads the stored bytes from memory; after a status update, the disk."""
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(make_envelope(), b"A" * 10_000)
        entry = queue.entry(qid)
        with open(SpoolLayout(tmp_path).segment_path(entry.segment), "r+b") as f:
            f.seek(entry.text_offset + 5000)
            f.write(b"B")  # only the disk copy is damaged
        assert await read_all(queue.open_message(qid)) == b"A" * 10_000
        await queue.update(qid, {})  # what the end of an attempt does: the memory copy goes
        with pytest.raises(SpoolError):
            await read_all(queue.open_message(qid))
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_second_owner_is_refused(tmp_path: Path) -> None:
    """Opening a spool another owner holds fails with SpoolLocked after the timeout."""
    queue = await open_queue(tmp_path)
    try:
        with pytest.raises(SpoolLocked):
            from twisted.internet import reactor

            await SpoolQueue.open(tmp_path, reactor, lock_timeout=0.2)  # type: ignore[arg-type]
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_closed_queue_refuses_changes(tmp_path: Path) -> None:
    """After close, store and update fail with SpoolError instead of being lost silently."""
    queue = await open_queue(tmp_path)
    qid = await queue.store(make_envelope(), b"text")
    await queue.close()
    with pytest.raises(SpoolError):
        await queue.store(make_envelope(), b"late")
    with pytest.raises(SpoolError):
        await queue.update(qid, {0: DELIVERED})


@pytest_twisted.ensureDeferred
async def test_ids_are_unique_across_restarts_even_if_the_clock_goes_back(tmp_path: Path) -> None:
    """A spool reopened with an earlier clock still hands out larger ids."""
    late = Clock()
    late.advance(2_000_000_000)
    queue = await open_queue(tmp_path, clock=late)
    try:
        first = await queue.store(make_envelope(), b"one")
        queue = await _reopen(queue, clock=Clock())
        second = await queue.store(make_envelope(), b"two")
        assert second > first
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_nothing_written_by_the_store_is_left_unreadable(tmp_path: Path) -> None:
    """After a clean close, a fresh recovery finds only sound records and no temp files."""
    queue = await open_queue(tmp_path, segment_limit=8192)
    try:
        ids = await defer.gatherResults(
            [queue.store(make_envelope(2), os.urandom(3000)) for _ in range(20)]
        )
        for qid in ids[::2]:
            await queue.update(qid, {0: DELIVERED, 1: DELIVERED})
    finally:
        await queue.close()
    found = recover(SpoolLayout(tmp_path), repair=False)
    assert found.quarantined == [] and found.torn_tails == 0
    assert sorted(found.state.messages) == ids[1::2]
    assert SpoolLayout(tmp_path).temp_files() == []


@pytest_twisted.ensureDeferred
async def test_on_durable_runs_in_the_writer_thread_before_the_deferred_fires(
    tmp_path: Path,
) -> None:
    """The hook gets the queue id after the sync, in the writer thread, before the reactor."""
    queue = await open_queue(tmp_path)
    seen: list[tuple[str, str, int]] = []

    def hook(queue_id: str) -> None:
        # synced already: the writer has counted the batch
        seen.append((queue_id, threading.current_thread().name, queue.writer.batches))

    try:
        d = queue.store(make_envelope(), b"Subject: x\r\n\r\nhi\r\n", on_durable=hook)
        qid = await d
        assert seen == [(qid, "spool-writer", seen[0][2])] and seen[0][2] >= 1
        assert threading.current_thread().name != "spool-writer"
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_an_envelope_already_encoded_is_written_as_given(tmp_path: Path) -> None:
    """A worker's link passes the envelope's bytes on: they go to disk unchanged."""
    envelope = make_envelope(2)
    given = json.dumps(envelope.to_dict(), indent=1).encode()  # same envelope, other bytes
    assert given != encode_envelope(envelope)
    queue = await open_queue(tmp_path)
    try:
        qid = await queue.store(envelope, b"Subject: x\r\n\r\nhi\r\n", envelope_json=given)
        queue = await _reopen(queue)
        assert (await queue.load(qid))[0] == envelope
        segments = sorted(queue.layout.log_dir.iterdir())
        assert any(given in path.read_bytes() for path in segments)
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_hook_costs_the_message_nothing(tmp_path: Path) -> None:
    """What the hook raises is logged; the message is stored and its Deferred fires."""

    def hook(queue_id: str) -> None:
        raise RuntimeError("hook broke")

    queue = await open_queue(tmp_path)
    envelope = make_envelope()
    try:
        qid = await queue.store(envelope, b"Subject: x\r\n\r\nhi\r\n", on_durable=hook)
        assert (await queue.load(qid))[0] == envelope
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_no_hook_for_a_store_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose sync fails is not durable: the hook is not called."""
    queue = await open_queue(tmp_path)
    called: list[str] = []

    def broken_sync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    try:
        monkeypatch.setattr(os, "fdatasync", broken_sync)
        with pytest.raises(SpoolError):
            await queue.store(
                make_envelope(), b"Subject: x\r\n\r\nhi\r\n", on_durable=called.append
            )
        assert called == []
    finally:
        monkeypatch.undo()
        await queue.close()

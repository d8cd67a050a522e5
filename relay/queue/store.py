"""The spool as the rest of the relay sees it: :class:`SpoolQueue`, the IQueue.

Theory of operation
-------------------
Everything the queue knows lives in memory (:class:`~relay.queue.state.SpoolState` and
the :class:`~relay.queue.index.DueIndex`); every change goes to disk first, through the
group-commit writer, and is applied in memory only when its Deferred fires, that is once
it is durable.  So memory never runs ahead of the disk, and a caller told "done" can
tell a peer "yes".

Changes to one message are serialised: an update waits until the previous change to the
same message is durable, then computes the message's full new state from the durable
one.  A failed write therefore never leaks into a later record, and the newest STATUS
record of a message is always its whole truth (see :mod:`relay.queue.payload`).
Changes to different messages run concurrently and share fsyncs.

Space comes back by deleting whole segments: when a sealed segment holds no live
message, what it still holds that matters (the newest status of older live messages,
and tombstones of older messages) is copied forward, made durable, and only then is the
file unlinked (see :mod:`relay.queue.state`).

Disk I/O happens only in the writer thread, in a small pool of reader threads, and in
the thread that runs recovery at :meth:`SpoolQueue.open`; never in the reactor thread.
"""

from __future__ import annotations

import contextlib
import functools
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorCore, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relay.envelope import Destination, Envelope, RecipientStatus
from relay.errors import SpoolError
from relay.instruments.series import received
from relay.interfaces import IHandoffStore, IMessage, IQueue
from relay.queue.index import DueIndex
from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLock, SpoolLocked
from relay.queue.ops import flush_changes, hold_changes, release_changes
from relay.queue.payload import (
    DoneReason,
    encode_done,
    encode_envelope,
    encode_message_prefix,
    encode_status,
)
from relay.queue.queueid import QueueIdGenerator
from relay.queue.reader import SpoolMessage
from relay.queue.record import HEADER_SIZE, RecordType
from relay.queue.recovery import Recovered, recover
from relay.queue.segment import DEFAULT_SEGMENT_LIMIT, SegmentLog
from relay.queue.state import (
    MessageEntry,
    NoSuchMessage,
    all_final,
    initial_statuses,
    merge_statuses,
)
from relay.queue.writer import GroupCommitWriter, Written

__all__ = ["SpoolQueue"]

_T = TypeVar("_T")

FRESH_TEXT_BUDGET = 32 * 1024 * 1024
"""Octets of not-yet-tried message texts the spool keeps in memory (0: none)."""
_log = Logger()


@implementer(IQueue, IHandoffStore)
class SpoolQueue:
    """A spool directory opened by its owner: durable store, per-recipient state, due index."""

    def __init__(
        self,
        layout: SpoolLayout,
        recovered: Recovered,
        log: SegmentLog,
        lock: SpoolLock,
        reactor: IReactorThreads,
        clock: IReactorTime,
        *,
        reader_threads: int = 4,
        fresh_text_budget: int = FRESH_TEXT_BUDGET,
    ) -> None:
        """Wrap what :meth:`open` prepared; use :meth:`open`, not this, to open a spool."""
        self.layout = layout
        self.quarantined = len(recovered.quarantined)
        self._state = recovered.state
        self._lock = lock
        self._reactor = reactor
        self._clock = clock
        self._writer = GroupCommitWriter(log, reactor)
        self._active = log.segment
        self._state.add_segment(self._active)
        self._ids = QueueIdGenerator(clock.seconds, recovered.highest_id)
        self._index = DueIndex(clock, self._notify)
        self._listeners: list[Callable[[], object]] = []
        self._tails: dict[str, Deferred[None]] = {}
        self._closing = False
        self._reclaim_running = False
        self._reclaim_again = False
        self._reclaim_waiters: list[Deferred[None]] = []
        self._forget_trigger: Callable[[], object] = lambda: None
        # Texts stored by this process and not tried yet: the first attempt reads them
        # from memory instead of from the segment through the reader threads.
        self._fresh: dict[str, bytes] = {}
        self._fresh_bytes = 0
        self._fresh_budget = fresh_text_budget
        self._pool = ThreadPool(minthreads=0, maxthreads=reader_threads, name="spool-reader")
        for entry in self._state.messages.values():
            self._reindex(entry)
        self._writer.start()
        self._pool.start()
        self._reclaim_soon()

    @classmethod
    def open(
        cls,
        spool_dir: Path,
        reactor: IReactorThreads,
        clock: IReactorTime | None = None,
        *,
        segment_limit: int = DEFAULT_SEGMENT_LIMIT,
        lock_timeout: float = 10.0,
        fresh_text_budget: int = FRESH_TEXT_BUDGET,
        close_at_shutdown: bool = True,
    ) -> Deferred[SpoolQueue]:
        """Take the spool's lock, recover it in a thread, and fire with the open queue.

        The queue closes itself when the reactor begins to shut down, unless
        ``close_at_shutdown`` is False: then its owner closes it, in its turn (the spool
        service, after the deliverer has recorded what it delivered).

        Fails with :class:`~relay.queue.lock.SpoolLocked` if another process keeps the
        lock for ``lock_timeout`` seconds, or SpoolError/OSError if the spool cannot be
        used at all.  Damage found in the log never fails it (see recovery) unless its
        bytes cannot be set aside in ``quarantine/``, or the spool's key is missing: then
        it fails with a SpoolError whose message is one line for the operator.
        """
        layout = SpoolLayout(Path(spool_dir))
        the_clock = clock if clock is not None else cast(IReactorTime, reactor)

        def opened(prepared: tuple[SpoolLock, Recovered, SegmentLog]) -> SpoolQueue:
            lock, recovered, log = prepared
            queue = cls(
                layout,
                recovered,
                log,
                lock,
                reactor,
                the_clock,
                fresh_text_budget=fresh_text_budget,
            )
            core = IReactorCore(reactor, None) if close_at_shutdown else None
            if core is not None:  # finish queued writes even if nobody calls close()

                def at_shutdown() -> Deferred[None]:
                    queue._forget_trigger = lambda: None  # firing: nothing to remove
                    return queue.close()

                trigger = core.addSystemEventTrigger("before", "shutdown", at_shutdown)
                queue._forget_trigger = lambda: core.removeSystemEventTrigger(trigger)
            _log.info(
                "spool: {path}: {messages} messages in {segments} segments; "
                "{records} records replayed, {torn} torn tails cut, {bad} regions quarantined",
                path=str(layout.root),
                messages=len(recovered.state.messages),
                segments=len(recovered.state.segments),
                records=recovered.records,
                torn=recovered.torn_tails,
                bad=len(recovered.quarantined),
            )
            return queue

        d: Deferred[tuple[SpoolLock, Recovered, SegmentLog]] = deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            _prepare,
            layout,
            segment_limit,
            lock_timeout,
        )
        return d.addCallback(opened)

    # --- IQueue (store: IHandoffStore's, a superset of IStore's) ----------------------

    def store(
        self,
        envelope: Envelope,
        text: bytes,
        *,
        on_durable: Callable[[str], object] | None = None,
        envelope_json: bytes | None = None,
    ) -> Deferred[str]:
        """Write a new message durably; fire with its queue id, or fail with SpoolError.

        ``on_durable(queue_id)`` is called in the spool's writer thread the moment the
        message is synced, before the Deferred fires (see GroupCommitWriter.append): a
        gateway worker's link uses it to send the 250's go-ahead without waiting for
        this reactor.  ``envelope_json``, when the caller has it (a worker's link
        decoded ``envelope`` from those bytes), is written as it is instead of the
        envelope being encoded a second time.
        """
        if self._closing:
            return defer.fail(SpoolError("the spool is closing"))
        if not isinstance(envelope, Envelope) or not isinstance(text, bytes):
            return defer.fail(TypeError("store() takes an Envelope and bytes"))
        queue_id = self._ids.next()
        if envelope_json is None:
            envelope_json = encode_envelope(envelope)
        prefix = encode_message_prefix(queue_id, envelope_json)

        def stored(written: Written) -> str:
            entry = MessageEntry(
                queue_id=queue_id,
                envelope=envelope,
                size=len(text),
                segment=written.segment,
                text_offset=written.offset + HEADER_SIZE + len(prefix),
                text_crc_seed=zlib.crc32(prefix),
                record_crc=written.crc,
                statuses=initial_statuses(envelope),
                status_segment=written.segment,
            )
            self._note_segment(written.segment)
            self._state.add_message(entry)
            if self._fresh_bytes + len(text) <= self._fresh_budget:
                self._fresh[queue_id] = text
                self._fresh_bytes += len(text)
            if self._reindex(entry):
                self._notify()
            received(envelope.submitter.protocol, "accepted").inc()
            return queue_id

        def failed(failure: Failure) -> Failure:
            received(envelope.submitter.protocol, "failed").inc()
            return failure

        hook = None if on_durable is None else functools.partial(on_durable, queue_id)
        appended = self._writer.append(RecordType.MESSAGE, [prefix, text], on_durable=hook)
        return appended.addCallbacks(stored, failed)

    def load(self, queue_id: str) -> Deferred[tuple[Envelope, Sequence[RecipientStatus]]]:
        """Fire with a message's envelope and its recipients' states (not its text)."""
        try:
            entry = self._state.get(queue_id)
        except NoSuchMessage as e:
            return defer.fail(e)
        return defer.succeed((entry.envelope, entry.statuses))

    def open_message(self, queue_id: str) -> IMessage:
        """The message as a channel sees it; raises NoSuchMessage if it is not queued."""
        entry = self._state.get(queue_id)
        return SpoolMessage(
            self.layout.segment_path(entry.segment),
            entry,
            self._reactor,
            self._pool,
            self._fresh.get(queue_id),
        )

    def update(self, queue_id: str, changes: Mapping[int, RecipientStatus]) -> Deferred[None]:
        """Record new states for some recipients, atomically; remove the message if all final."""
        changes = dict(changes)

        def apply() -> Deferred[None]:
            entry = self._state.get(queue_id)
            statuses = merge_statuses(entry.statuses, changes)
            if all_final(statuses):
                return self._write_done(entry, DoneReason.FINAL)
            return self._write_status(entry, statuses)

        return self._serialized(queue_id, apply)

    def list_messages(self) -> Deferred[Sequence[str]]:
        """Fire with the ids of every message in the queue, oldest first."""
        return defer.succeed(sorted(self._state.messages))

    def due(self, now: float) -> Deferred[Iterable[tuple[str, int]]]:
        """Fire with (queue id, recipient index) of every recipient due at ``now``."""
        return defer.succeed(self._index.due(now))

    def due_by_destination(
        self, now: float
    ) -> Deferred[Mapping[Destination | None, Sequence[tuple[str, int]]]]:
        """The same recipients grouped by (channel, destination); None: not routed yet."""
        return defer.succeed(self._index.due_by_destination(now))

    def next_due_time(self) -> float | None:
        """When the earliest deferred recipient falls due, or None if nothing waits."""
        return self._index.next_due_time()

    def add_listener(self, callback: object) -> None:
        """Call ``callback()`` whenever new mail is stored or a recipient becomes due."""
        if not callable(callback):
            raise TypeError("a listener must be callable")
        self._listeners.append(callback)

    def remove_listener(self, callback: object) -> None:
        """Stop calling ``callback``."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def remove(self, queue_id: str) -> Deferred[None]:
        """Delete a message whatever its recipients' states (``relay queue rm``)."""
        return self._serialized(
            queue_id, lambda: self._write_done(self._state.get(queue_id), DoneReason.REMOVED)
        )

    def hold(self, queue_id: str) -> Deferred[int]:
        """Put every recipient not yet final on hold; fire with how many changed."""
        return self._serialized(queue_id, lambda: self._change(queue_id, _hold))

    def release(self, queue_id: str) -> Deferred[int]:
        """Take held recipients off hold; fire with how many changed."""
        return self._serialized(queue_id, lambda: self._change(queue_id, _release))

    def flush_message(self, queue_id: str, channel: str | None = None) -> Deferred[int]:
        """Make the message's deferred recipients (on ``channel``) due now; fire with how many."""

        def changes(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
            return flush_changes(entry.envelope, entry.statuses, channel, now)

        return self._serialized(queue_id, lambda: self._change(queue_id, changes))

    def flush(
        self, queue_ids: Iterable[str] | None = None, channel: str | None = None
    ) -> Deferred[int]:
        """Make matching deferred recipients due now; fire with how many were.

        Ids no longer queued are skipped; use :meth:`flush_message` to hear about them.
        """
        wanted = sorted(self._state.messages) if queue_ids is None else list(queue_ids)
        flushes = [
            self.flush_message(qid, channel) for qid in wanted if qid in self._state.messages
        ]

        async def total() -> int:
            count = 0
            for flushed in flushes:
                with contextlib.suppress(NoSuchMessage):  # removed meanwhile
                    count += await flushed
            return count

        return ensureDeferred(total())

    # --- for the control socket, the tests and the benchmark -----------------------------

    def entries(self) -> list[MessageEntry]:
        """Every live message's entry, oldest first (read-only use)."""
        return [self._state.messages[qid] for qid in sorted(self._state.messages)]

    def entry(self, queue_id: str) -> MessageEntry:
        """One live message's entry; raises NoSuchMessage."""
        return self._state.get(queue_id)

    @property
    def writer(self) -> GroupCommitWriter:
        """The group-commit writer (its counters show how many fsyncs were shared)."""
        return self._writer

    def segments(self) -> list[int]:
        """The segment numbers the spool still has, ascending."""
        return sorted(self._state.segments)

    def close(self) -> Deferred[None]:
        """Finish queued writes, stop the threads and give up the lock."""
        if self._closing:
            return defer.succeed(None)
        self._closing = True
        self._index.stop()
        self._forget_trigger()

        def stop_readers(_: object) -> Deferred[None]:
            # ThreadPool.stop() joins its threads: a read in flight would block the
            # reactor, so the joining happens in a thread of the reactor's own pool.
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._pool.stop)

        def release(_: object) -> None:
            self._lock.release()

        return self._writer.stop().addCallback(stop_readers).addCallback(release)

    # --- internals -----------------------------------------------------------------------

    def _serialized(self, queue_id: str, action: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Run ``action`` after every earlier change to ``queue_id`` has finished."""
        if self._closing:
            return defer.fail(SpoolError("the spool is closing"))
        previous = self._tails.get(queue_id)
        tail: Deferred[None] = Deferred()
        self._tails[queue_id] = tail
        result: Deferred[_T] = Deferred()

        def finished(outcome: object) -> object:
            if self._tails.get(queue_id) is tail:
                del self._tails[queue_id]
            tail.callback(None)
            return outcome

        def run(_: object = None) -> None:
            maybeDeferred(action).addBoth(finished).chainDeferred(result)  # type: ignore[arg-type]

        if previous is None:
            run()
        else:
            previous.addCallback(run)
        return result

    def _change(
        self, queue_id: str, compute: Callable[[MessageEntry, float], dict[int, RecipientStatus]]
    ) -> Deferred[int]:
        entry = self._state.get(queue_id)
        changes = compute(entry, self._clock.seconds())
        if not changes:
            return defer.succeed(0)
        statuses = merge_statuses(entry.statuses, changes)
        return self._write_status(entry, statuses).addCallback(lambda _: len(changes))

    def _write_status(
        self, entry: MessageEntry, statuses: tuple[RecipientStatus, ...]
    ) -> Deferred[None]:
        queue_id = entry.queue_id

        def written(where: Written) -> None:
            self._note_segment(where.segment)
            self._forget_text(queue_id)
            if self._state.set_statuses(queue_id, statuses, where.segment) is None:
                return
            if self._reindex(entry):
                self._notify()

        payload = encode_status(queue_id, statuses)
        return self._writer.append(RecordType.STATUS, [payload]).addCallback(written)

    def _write_done(self, entry: MessageEntry, reason: str) -> Deferred[None]:
        queue_id = entry.queue_id

        def written(where: Written) -> None:
            self._note_segment(where.segment)
            self._forget_text(queue_id)
            if self._state.remove(queue_id, where.segment) is None:
                return
            self._index.discard_message(queue_id, len(entry.envelope.recipients))
            _log.info("spool: {queue_id} removed ({reason})", queue_id=queue_id, reason=reason)
            if entry.segment != self._active and not self._state.segments[entry.segment].live:
                self._reclaim_soon()

        payload = encode_done(queue_id, reason)
        return self._writer.append(RecordType.DONE, [payload]).addCallback(written)

    def _forget_text(self, queue_id: str) -> None:
        """Its first attempt is over (or it is gone): later attempts read the segment."""
        text = self._fresh.pop(queue_id, None)
        if text is not None:
            self._fresh_bytes -= len(text)

    def _reindex(self, entry: MessageEntry) -> bool:
        """File every recipient of ``entry`` in the due index; True if any is due now."""
        due_now = False
        for index, (recipient, status) in enumerate(
            zip(entry.envelope.recipients, entry.statuses, strict=True)
        ):
            due_now |= self._index.set(entry.queue_id, index, recipient.destination, status)
        return due_now

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _log.failure("spool: a queue listener failed")

    def _note_segment(self, segment: int) -> None:
        """A record landed in ``segment``: if the writer rotated, older ones may go."""
        self._state.add_segment(segment)
        if segment > self._active:
            self._active = segment
            self._reclaim_soon()

    # --- reclaiming space -----------------------------------------------------------------

    def reclaim(self) -> Deferred[None]:
        """Delete every segment that can go now; fire when that pass is over.

        The queue does this by itself whenever a segment may have become free; this is
        for tests, the benchmark and an operator's "compact now".
        """
        done: Deferred[None] = Deferred()
        self._reclaim_waiters.append(done)
        self._reclaim_soon()
        if not self._reclaim_running:  # closing: nothing will run
            self._fire_reclaim_waiters()
        return done

    def _reclaim_soon(self) -> None:
        if self._closing:
            return
        if self._reclaim_running:
            self._reclaim_again = True
            return
        self._reclaim_running = True
        ensureDeferred(self._reclaim_loop()).addErrback(
            lambda f: _log.failure("spool: reclaiming segments failed", f)
        )

    def _fire_reclaim_waiters(self) -> None:
        waiters, self._reclaim_waiters = self._reclaim_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _reclaim_loop(self) -> None:
        try:
            await self._reclaim_passes()
        finally:
            self._reclaim_running = False
            self._fire_reclaim_waiters()

    async def _reclaim_passes(self) -> None:
        while not self._closing:
            self._reclaim_again = False
            for segment in self._state.reclaimable(self._active):
                if self._closing:
                    return
                try:
                    await self._reclaim(segment)
                except (SpoolError, OSError) as e:
                    _log.warn(
                        "spool: cannot delete segment {segment} yet: {error}",
                        segment=segment,
                        error=e,
                    )
            if not self._reclaim_again:
                return

    async def _reclaim(self, segment: int) -> None:
        """Copy forward what segment ``segment`` still holds that matters, then delete it."""
        plan = self._state.checkpoint_plan(segment)
        copies: list[Deferred[Any]] = [
            self._serialized(qid, lambda qid=qid: self._copy_status(qid, segment))  # type: ignore[misc]
            for qid in plan.statuses
        ]
        copies.extend(self._copy_tombstone(qid, segment) for qid, _ in plan.tombstones)
        if copies:
            await defer.gatherResults(copies, consumeErrors=True).addErrback(_first_error)
        if not self._state.is_reclaim_ready(segment) or self._closing:
            return
        await self._writer.delete_segment(segment)
        self._state.drop_segment(segment)
        _log.info(
            "spool: deleted segment {segment} (copied forward {statuses} statuses, "
            "{tombstones} tombstones)",
            segment=segment,
            statuses=len(plan.statuses),
            tombstones=len(plan.tombstones),
        )

    def _copy_status(self, queue_id: str, segment: int) -> Deferred[None]:
        entry = self._state.messages.get(queue_id)
        if entry is None or entry.status_segment != segment:
            return defer.succeed(None)  # changed since the plan: nothing left to copy
        return self._write_status(entry, entry.statuses)

    def _copy_tombstone(self, queue_id: str, segment: int) -> Deferred[None]:
        def written(where: Written) -> None:
            self._note_segment(where.segment)
            self._state.move_tombstone(queue_id, segment, where.segment)

        payload = encode_done(queue_id, DoneReason.FINAL)
        return self._writer.append(RecordType.DONE, [payload]).addCallback(written)


def _prepare(
    layout: SpoolLayout, segment_limit: int, lock_timeout: float
) -> tuple[SpoolLock, Recovered, SegmentLog]:
    """In a thread: lock, recover, and open the log for appending."""
    layout.make_dirs()
    lock = SpoolLock(layout.lock_path)
    deadline = time.monotonic() + lock_timeout
    while True:
        try:
            lock.acquire()
            break
        except SpoolLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    try:
        recovered = recover(layout, repair=True)
        key, segment, offset = recovered.append_at()
        log = SegmentLog(layout, key, segment, offset, segment_limit)
    except BaseException:
        lock.release()
        raise
    return lock, recovered, log


def _hold(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
    return hold_changes(entry.statuses, now)


def _release(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
    return release_changes(entry.statuses, now)


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in a FirstError; unwrap it."""
    inner = getattr(failure.value, "subFailure", None)
    return inner if isinstance(inner, Failure) else failure

"""Group commit: one thread owns the log and shares each fdatasync among every waiting write.

Theory of operation
-------------------
An fsync costs the same whether it covers one record or sixty-four, so the way to make a
spool fast is to make writers *share* them.  Callers in the reactor thread hand records
to :meth:`GroupCommitWriter.append` and get a Deferred.  A single thread takes every
record waiting at that moment, writes them with one ``pwritev``, calls ``fdatasync``
once, and hands all the results back to the reactor thread in one ``callFromThread``.
While it syncs, new records queue up and form the next batch; so the more concurrent
writers there are, the bigger the batches, and throughput rises with concurrency
instead of being capped at the disk's fsync rate.

Nothing here blocks the reactor: the reactor thread only puts requests in a queue.
Framing and checksumming also happen in the writer thread (``zlib.crc32`` releases the
GIL for large buffers).

Commit delay: when the last batch held more than one record and ended less than
:data:`RECENT` (10 ms) ago, so that writers are plainly arriving together, the thread
waits :data:`COMMIT_DELAY` (1 ms) after the first record of the next batch before taking
it, as PostgreSQL's ``commit_delay`` does when enough transactions are open.  Every
batch costs a sync and, in Python, a round of GIL hand-offs between this thread and the
reactor's; waiting for the records that are about to come makes batches bigger and
both rarer: fewer syncs per message, at the same rate (``bench/relay_e2e.py
--relay-only --commit-delay 0`` against the same without the flag; the figures are in
the README).  A lone writer never waits (its batches hold one record), nor does the first
record after a quiet spell, so a quiet relay answers as fast as before.

Order is kept: records are written in the order ``append`` was called, and the
Deferreds of written records fire in that order, so callers can rely on log order =
call order.  (A record refused before writing, e.g. over the size limit, fails at once.)

Failure: a batch that cannot be made durable is cut off the log by
:class:`~relay.queue.segment.SegmentLog` and each of its Deferreds fails with
:class:`relay.errors.SpoolError`.  When a *full disk* fails a batch of several records,
each is retried on its own: small status records may still fit where a large message
did not, and a message that would not fit never costs the others their write.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from relay.errors import SpoolError
from relay.instruments.series import BATCH_RECORDS, SPOOL_SYNC
from relay.queue.record import Buffer, RecordType, checksum
from relay.queue.segment import SegmentLog, Unframed

__all__ = ["COMMIT_DELAY", "GroupCommitWriter", "Written"]

COMMIT_DELAY = 0.001  # seconds to gather a batch once writers arrive together (see above)
RECENT = 0.010  # seconds: a batch that ended longer ago says nothing about who is coming
_sleep = time.sleep  # replaceable in tests
_now = time.monotonic  # replaceable in tests

_log = Logger()


@dataclass(frozen=True, slots=True)
class Written:
    """Where a record landed: its segment, its offset there, and its payload CRC."""

    segment: int
    offset: int
    crc: int


@dataclass(slots=True)
class _Append:
    record_type: RecordType
    parts: Sequence[Buffer]
    deferred: Deferred[Written]
    size: int
    on_durable: Callable[[], object] | None = None


@dataclass(slots=True)
class _Delete:
    segment: int
    deferred: Deferred[None]


_Request = _Append | _Delete
_Result = tuple[Deferred[Written] | Deferred[None], object]


class GroupCommitWriter:
    """The only writer of a spool's log, running in a thread of its own."""

    def __init__(
        self,
        log: SegmentLog,
        reactor: IReactorFromThreads,
        *,
        max_batch_bytes: int = 16 * 1024 * 1024,
        commit_delay: float | None = None,
    ) -> None:
        self._log = log
        self._reactor = reactor
        self._max_batch_bytes = max_batch_bytes
        # None: the module's COMMIT_DELAY as it is now (bench/relay_e2e.py --commit-delay)
        self._commit_delay = COMMIT_DELAY if commit_delay is None else commit_delay
        self._last_batch = 0  # writer thread: records appended by the batch before
        self._last_done = float("-inf")  # writer thread: when that batch was written
        # Requests go to the thread through a SimpleQueue (put and get are C, and a put
        # wakes the thread only if it is waiting): a lock and a Condition cost the
        # reactor thread several Python calls per record.  None marks the end.
        self._requests: SimpleQueue[_Request | None] = SimpleQueue()
        self._held: _Request | None = None  # writer thread: the first of the next batch
        self._ending = False  # writer thread: the end mark has been taken
        self._stopping = False  # reactor thread: no more requests are taken
        self._stopped: Deferred[None] = Deferred()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self.batches = 0  # fdatasyncs done, for tests and the benchmark
        self.records = 0  # records made durable

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def append(
        self,
        record_type: RecordType,
        parts: Sequence[Buffer],
        *,
        on_durable: Callable[[], object] | None = None,
    ) -> Deferred[Written]:
        """Queue one record; fire with where it is once it is durable, or fail with SpoolError.

        ``on_durable``, if given, is called *in the writer thread* as soon as the record
        is synced, before the Deferred fires in the reactor thread (which may be busy):
        for a caller that can tell someone "it is on disk" without the reactor.  It must
        be quick, thread-safe and never block; what it raises is logged and ignored.
        It may return a callable, a *finisher*: once every hook of the sync has run,
        each distinct finisher (``==``) is called once, so a caller can send one
        message for all its records of a batch instead of one each.
        """
        d: Deferred[Written] = Deferred()
        size = sum(len(p) for p in parts)
        self._submit(_Append(record_type, parts, d, size, on_durable))
        return d

    def delete_segment(self, number: int) -> Deferred[None]:
        """Unlink an old segment and fsync the directory, after everything queued before it."""
        d: Deferred[None] = Deferred()
        self._submit(_Delete(number, d))
        return d

    def stop(self) -> Deferred[None]:
        """Finish what is queued, close the log, and fire when the thread has ended."""
        if not self._stopping:
            self._stopping = True
            self._requests.put(None)  # after everything queued so far
        if self._thread.ident is None:  # never started
            self._log.close()
            self._stopped.callback(None)
        return self._stopped

    def _submit(self, request: _Request) -> None:
        if self._stopping:
            request.deferred.errback(SpoolError("the spool is closing"))
        else:
            self._requests.put(request)

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    break
                try:
                    results = self._process(batch)
                except Exception as e:  # a defect: fail the batch, keep the thread alive
                    _log.failure("spool: the writer thread failed a batch")
                    failure = SpoolError(f"spool writer failed: {e}")
                    results = [(request.deferred, failure) for request in batch]
                self._last_done = _now()
                self._reactor.callFromThread(_deliver, results)
        finally:
            self._log.close()
            self._reactor.callFromThread(self._stopped.callback, None)

    def _take(self) -> list[_Request] | None:
        """Wait for work; take everything waiting, up to the batch size (None: the end)."""
        first = self._held
        self._held = None
        if first is None:
            if self._ending:
                return None
            first = self._requests.get()
            if first is None:
                return None
            if (
                self._last_batch > 1
                and self._commit_delay > 0
                and _now() - self._last_done < RECENT
            ):
                _sleep(self._commit_delay)  # the others are on their way: wait for them
        batch = self._fill(first)
        self._last_batch = sum(isinstance(request, _Append) for request in batch)
        return batch

    def _fill(self, first: _Request) -> list[_Request]:
        """``first`` and what else is waiting, up to the batch size."""
        batch = [first]
        total = _size(first)
        while True:
            try:
                request = self._requests.get_nowait()
            except Empty:
                return batch
            if request is None:
                self._ending = True
                return batch
            total += _size(request)
            if total > self._max_batch_bytes:
                self._held = request
                return batch
            batch.append(request)

    def _process(self, batch: list[_Request]) -> list[_Result]:
        """Carry out a batch in order: runs of appends share one sync."""
        results: list[_Result] = []
        run: list[_Append] = []
        for request in batch:
            if isinstance(request, _Append):
                run.append(request)
                continue
            results.extend(self._append_run(run))
            run = []
            results.append(self._delete(request))
        results.extend(self._append_run(run))
        return results

    def _append_run(self, run: list[_Append]) -> list[_Result]:
        if not run:
            return []
        try:
            return self._write(run)
        except OSError as e:
            if e.errno == errno.ENOSPC and len(run) > 1:
                _log.warn("spool: disk full; retrying {count} records one by one", count=len(run))
                results: list[_Result] = []
                for request in run:
                    try:
                        results.extend(self._write([request]))
                    except OSError as single:
                        results.append((request.deferred, _spool_error(single)))
                return results
            return [(request.deferred, _spool_error(e)) for request in run]

    def _write(self, run: list[_Append]) -> list[_Result]:
        """Frame, write and sync ``run``; raises OSError (with nothing left written)."""
        results: list[_Result] = []
        unframed: list[Unframed] = []
        accepted: list[tuple[_Append, int]] = []
        for request in run:
            try:
                length, crc = checksum(request.parts)
            except ValueError as e:  # e.g. a payload over the format's limit
                results.append((request.deferred, SpoolError(f"cannot store: {e}")))
                continue
            unframed.append(Unframed(request.record_type, request.parts, length, crc))
            accepted.append((request, crc))
        if not unframed:
            return results
        started = _now()
        positions = self._log.append(unframed)
        SPOOL_SYNC.observe(_now() - started)
        BATCH_RECORDS.observe(len(unframed))
        self.batches += 1
        self.records += len(unframed)
        finishers: list[Callable[[], object]] = []
        for request, _ in accepted:
            if request.on_durable is not None:
                try:
                    finish = request.on_durable()
                except Exception:
                    _log.failure("spool: an on_durable hook failed")
                    continue
                if callable(finish) and finish not in finishers:
                    finishers.append(finish)
        for finish in finishers:
            try:
                finish()
            except Exception:
                _log.failure("spool: an on_durable hook's finisher failed")
        results.extend(
            (request.deferred, Written(segment, offset, crc))
            for (request, crc), (segment, offset) in zip(accepted, positions, strict=True)
        )
        return results

    def _delete(self, request: _Delete) -> _Result:
        try:
            self._log.delete(request.segment)
        except OSError as e:
            return (request.deferred, _spool_error(e))
        return (request.deferred, None)


def _size(request: _Request) -> int:
    return request.size if isinstance(request, _Append) else 0


def _spool_error(error: OSError) -> SpoolError:
    failure = SpoolError(f"spool write failed: {error.strerror or error}")
    failure.__cause__ = error
    return failure


def _deliver(results: list[_Result]) -> None:
    """In the reactor thread: fire every Deferred of a batch, in log order."""
    for deferred, outcome in results:
        if isinstance(outcome, BaseException):
            deferred.errback(outcome)
        else:
            deferred.callback(outcome)  # type: ignore[arg-type]

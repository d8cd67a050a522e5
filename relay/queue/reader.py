"""A queued message as a channel sees it, with its text read from the log in chunks.

A message that has not been tried yet usually still has its text in memory (the spool
keeps the texts it stored until their first attempt, up to a budget):
:class:`MemoryTextReader` serves those without touching the disk or a thread.

The text of a message is a slice of a segment file.  :class:`SegmentTextReader` reads it
with ``pread`` in a thread pool (never in the reactor thread), a chunk per call, from
its own file descriptor (opened on the first read, closed at the end), so any number of
channels can read different messages, or the same one, at once.

Each reader also carries the CRC-32 of the whole MESSAGE record: it continues the
checksum over the text as it streams and, at the end, fails instead of answering
``b""`` if the text no longer matches what was written.  A disk that rotted a message
since start-up then costs a deferred delivery, never a corrupt one.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relay.envelope import Envelope
from relay.errors import SpoolError
from relay.interfaces import IMessage, ITextReader
from relay.queue.state import MessageEntry

__all__ = ["SegmentTextReader", "SpoolMessage"]


@implementer(ITextReader)
class SegmentTextReader:
    """A stream over one message's text in a segment file."""

    def __init__(
        self,
        path: Path,
        entry: MessageEntry,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
    ) -> None:
        self._path = path
        self._start = entry.text_offset
        self._size = entry.size
        self._crc = entry.text_crc_seed
        self._expected_crc = entry.record_crc
        self._queue_id = entry.queue_id
        self._reactor = reactor
        self._pool = pool
        self._position = 0
        self._fd: int | None = None
        self._busy = False
        self._closed = False

    def read(self, max_bytes: int) -> Deferred[bytes]:
        """Fire with up to ``max_bytes`` of the text; ``b""`` at the end."""
        if self._closed:
            return defer.fail(SpoolError(f"{self._queue_id}: read after close"))
        if self._busy:
            return defer.fail(SpoolError(f"{self._queue_id}: a read is already in progress"))
        if max_bytes <= 0:
            return defer.fail(ValueError("max_bytes must be positive"))
        if self._position >= self._size:
            if self._crc != self._expected_crc:
                return defer.fail(SpoolError(f"{self._queue_id}: text damaged on disk"))
            self._release_fd()
            return defer.succeed(b"")
        count = min(max_bytes, self._size - self._position)
        self._busy = True
        d: Deferred[tuple[bytes, int]] = deferToThreadPool(
            self._reactor,
            self._pool,
            self._pread,
            count,
            self._start + self._position,
            self._crc,
        )
        return d.addCallbacks(self._got, self._failed)

    def close(self) -> None:
        """Release the file; further reads are an error."""
        self._closed = True
        if not self._busy:
            self._release_fd()

    def _pread(self, count: int, offset: int, crc: int) -> tuple[bytes, int]:
        """In a pool thread: read a chunk and continue the checksum over it."""
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        data = os.pread(self._fd, count, offset)
        if not data:
            raise SpoolError(f"{self._queue_id}: segment ends before the text does")
        return data, zlib.crc32(data, crc)

    def _got(self, result: tuple[bytes, int]) -> bytes:
        self._busy = False
        data, self._crc = result
        self._position += len(data)
        if self._closed:
            self._release_fd()
        return data

    def _failed(self, failure: Failure) -> Failure:
        """A failed read ends the stream; an OSError is reported as a SpoolError."""
        self._busy = False
        self._closed = True
        self._release_fd()
        error = failure.value
        if isinstance(error, OSError):
            raise SpoolError(f"{self._queue_id}: cannot read the text: {error}") from error
        return failure

    def _release_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._pool.callInThread(os.close, fd)


@implementer(ITextReader)
class MemoryTextReader:
    """A stream over a text the spool still holds in memory (the bytes it fsynced)."""

    def __init__(self, text: bytes, queue_id: str) -> None:
        self._view = memoryview(text)
        self._queue_id = queue_id
        self._position = 0
        self._closed = False

    def read(self, max_bytes: int) -> Deferred[bytes]:
        """Fire at once with up to ``max_bytes`` of the text; ``b""`` at the end."""
        if self._closed:
            return defer.fail(SpoolError(f"{self._queue_id}: read after close"))
        if max_bytes <= 0:
            return defer.fail(ValueError("max_bytes must be positive"))
        chunk = bytes(self._view[self._position : self._position + max_bytes])
        self._position += len(chunk)
        return defer.succeed(chunk)

    def close(self) -> None:
        """Further reads are an error (nothing to release)."""
        self._closed = True


@implementer(IMessage)
class SpoolMessage:
    """A live message: id, envelope and size, and fresh text streams on demand."""

    def __init__(
        self,
        path: Path,
        entry: MessageEntry,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        text: bytes | None = None,
    ) -> None:
        """``text``: the text, when the spool still has it in memory."""
        self.queue_id: str = entry.queue_id
        self.envelope: Envelope = entry.envelope
        self.size: int = entry.size
        self._path = path
        self._entry = entry
        self._reactor = reactor
        self._pool = pool
        self._text = text

    def open_text(self) -> ITextReader:
        """A new stream over the text, from its first byte."""
        if self._text is not None:
            return MemoryTextReader(self._text, self.queue_id)
        return SegmentTextReader(self._path, self._entry, self._reactor, self._pool)

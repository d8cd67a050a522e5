"""The active segment: append a batch of records, make it durable, rotate, delete old ones.

:class:`SegmentLog` is blocking and single-threaded by design: the group-commit thread
(:mod:`relay.queue.writer`) owns one in the daemon, and the offline command uses one
directly.  It keeps one promise: after :meth:`SegmentLog.append` returns, the records
are on disk (``fdatasync``); after it raises, none of them is visible, because the file
is truncated back to where the batch began (a full disk can leave half a batch
written).  If even that truncation fails, the log refuses every later append, since
appending after bytes of unknown state could hide them inside a record.

A new segment is created, fsynced and its directory fsynced before the first record
goes into it, so a record is never durable in a file whose name is not.

Headers are made here, not by the callers, because a header's tag covers the segment
and offset the record lands at (:mod:`relay.queue.record`), which only the log knows.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from relay.fileio import fsync_directory
from relay.queue.key import SpoolKey
from relay.queue.layout import SpoolLayout

__all__ = ["DEFAULT_SEGMENT_LIMIT", "LogBroken", "SegmentLog", "Unframed"]

DEFAULT_SEGMENT_LIMIT = 64 * 1024 * 1024
_IOV_MAX = 1024

Buffer = bytes | bytearray | memoryview

_log = Logger()


@dataclass(frozen=True, slots=True)
class Unframed:
    """A record to append: its type, its payload as buffers, and the payload's checksum."""

    record_type: int
    parts: Sequence[Buffer]
    length: int
    crc: int


class LogBroken(OSError):
    """An earlier failure left the log in a state it cannot append after safely."""


class SegmentLog:
    """Appends to the newest segment of a spool's log; rotates it at ``limit`` octets."""

    def __init__(
        self, layout: SpoolLayout, key: SpoolKey, segment: int, offset: int, limit: int
    ) -> None:
        """Open segment ``segment`` to append at ``offset`` (creating it if it is new).

        ``offset`` is the end of the last sound record: recovery truncated anything after.
        A segment older than ``key`` (legacy format) is never appended to.
        """
        if segment < key.keyed_from:
            raise ValueError(f"segment {segment} predates the spool key: it is never appended to")
        self._layout = layout
        self._key = key
        self._limit = limit
        self._broken: str | None = None
        self.segment = segment
        self.offset = offset
        path = layout.segment_path(segment)
        if path.exists():
            self._fd = os.open(path, os.O_WRONLY)
        else:
            self._fd = self._create(segment)

    def append(self, records: Sequence[Unframed]) -> list[tuple[int, int]]:
        """Frame ``records``, write them and fdatasync once.

        Returns (segment, offset) of each record.  On failure the segment is truncated
        back and the OSError raised; nothing of the batch stays.
        """
        if self._broken is not None:
            raise LogBroken(errno.EIO, f"spool log unusable: {self._broken}")
        if self.offset >= self._limit:
            self._rotate()
        start = self.offset
        positions: list[tuple[int, int]] = []
        buffers: list[Buffer] = []
        at = start
        framing = self._key.framing(self.segment)
        for record in records:
            positions.append((self.segment, at))
            head = framing.header(record.record_type, record.length, record.crc, at)
            buffers.append(head)
            buffers.extend(part for part in record.parts if len(part))
            at += len(head) + record.length
        try:
            _pwrite_all(self._fd, buffers, start)
            os.fdatasync(self._fd)
        except OSError:
            self._undo(start)
            raise
        self.offset = at
        return positions

    def delete(self, number: int) -> None:
        """Remove an old segment durably (its contents were copied forward as needed)."""
        if number == self.segment:
            raise ValueError("the active segment cannot be deleted")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._layout.segment_path(number))
        fsync_directory(self._layout.log_dir)

    def close(self) -> None:
        """Close the active segment's file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _create(self, number: int) -> int:
        """Create segment ``number`` and make its name durable before it is used."""
        path = self._layout.segment_path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fsync(fd)
            fsync_directory(self._layout.log_dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd

    def _rotate(self) -> None:
        """Seal the active segment and start the next one."""
        fd = self._create(self.segment + 1)
        os.close(self._fd)
        self._fd = fd
        self.segment += 1
        self.offset = 0
        _log.info("spool: started segment {segment}", segment=self.segment)

    def _undo(self, start: int) -> None:
        """Cut a failed batch off the end of the segment."""
        try:
            os.ftruncate(self._fd, start)
        except OSError as e:
            self._broken = f"could not truncate segment {self.segment} to {start}: {e}"
            _log.critical("spool: {why}", why=self._broken)
            return
        with contextlib.suppress(OSError):
            os.fdatasync(self._fd)


def _pwrite_all(fd: int, buffers: Sequence[Buffer], offset: int) -> None:
    """Write every buffer at ``offset``, in as few system calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers]
    index = 0
    while index < len(views):
        written = os.pwritev(fd, views[index : index + _IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write to the spool log")
        offset += written
        while written > 0:
            head = views[index]
            if written >= len(head):
                written -= len(head)
                index += 1
            else:
                views[index] = head[written:]
                written = 0

"""Start-up: replay the log into a :class:`~relay.queue.state.SpoolState`, setting damage aside.

Theory of operation
-------------------
Segments are read in number order and their records replayed in order.  What is not a
sound record is one of two things:

* a **torn tail**: the end of the *last* segment, where a crash interrupted a write
  that was never acknowledged.  Nothing sound follows it.  It is cut off (the file is
  truncated) and only counted: it held nothing anyone was told was safe.
* **damage**: anything else (a bad checksum in an older segment, or in the last one
  with sound records after it, a payload whose checksum is right but whose content
  cannot be read).  Its bytes are copied into ``quarantine/`` under a name saying where
  they came from and why, a line is logged, the counter goes up, and replay goes on:
  with the next record when the header was sound (its length can be trusted), else
  with the next segment.

Recovery never raises for anything it finds in the files, and one bad record never
stops the rest from loading.  Quarantining is idempotent: a region already in
``quarantine/`` is skipped without being counted again.  With ``repair=False`` (a
read-only look by ``relay queue``) nothing is written, truncated or removed.

All of this is blocking I/O: the daemon runs it in a thread before the reactor needs
the queue; the command runs it directly.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from relay.fileio import fsync_directory
from relay.queue.layout import SpoolLayout, write_file_durably
from relay.queue.payload import (
    PayloadError,
    decode_done,
    decode_envelope,
    decode_message_prefix,
    decode_status,
)
from relay.queue.record import Buffer, Damage, Record, RecordType, find_next_record, read_at
from relay.queue.state import MessageEntry, SpoolState, initial_statuses

__all__ = ["Quarantined", "Recovered", "recover"]

_log = Logger()


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A region of a segment set aside: where it was, how long, why, and its copy."""

    segment: int
    offset: int
    length: int
    reason: str
    path: Path | None  # None on a read-only look


@dataclass(slots=True)
class Recovered:
    """What recovery found: the state, where appending resumes, and what it set aside."""

    state: SpoolState
    last_segment: int | None = None  # the highest segment present
    end_offset: int = 0  # end of the last sound record in ``last_segment``
    highest_id: str | None = None  # the largest queue id seen, live or not
    quarantined: list[Quarantined] = field(default_factory=list)  # newly set aside
    torn_tails: int = 0
    temp_files_removed: int = 0
    records: int = 0


def recover(layout: SpoolLayout, *, repair: bool = True) -> Recovered:
    """Replay every segment of ``layout``; with ``repair``, truncate and quarantine."""
    result = Recovered(SpoolState())
    if repair:
        layout.make_dirs()
        for temp in layout.temp_files():
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            result.temp_files_removed += 1
            _log.info("spool: removed temporary file {path}", path=str(temp))
        if result.temp_files_removed:
            for directory in (layout.log_dir, layout.quarantine_dir):
                fsync_directory(directory)
    numbers = layout.segment_numbers()
    for number in numbers:
        is_last = number == numbers[-1]
        _Replay(layout, number, is_last, repair, result).run()
    if numbers:
        result.last_segment = numbers[-1]
    return result


class _Replay:
    """Replays one segment into the shared result."""

    def __init__(
        self, layout: SpoolLayout, number: int, is_last: bool, repair: bool, result: Recovered
    ) -> None:
        self._layout = layout
        self._number = number
        self._is_last = is_last
        self._repair = repair
        self._result = result
        self._state = result.state

    def run(self) -> None:
        self._state.add_segment(self._number)
        path = self._layout.segment_path(self._number)
        try:
            fd = os.open(path, os.O_RDWR if self._repair else os.O_RDONLY)
        except OSError as e:
            _log.error("spool: cannot open {path}: {error}", path=str(path), error=e)
            return
        try:
            size = os.fstat(fd).st_size
            end = 0
            if size:
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        end = self._walk(view, size)
                    finally:
                        view.release()
            if self._is_last:
                self._result.end_offset = end
                if end < size and self._repair:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
        finally:
            os.close(fd)

    def _walk(self, view: memoryview, size: int) -> int:
        """Replay records; return where the sound part of the segment ends."""
        offset = 0
        while True:
            found = read_at(view, offset)
            if found is None:
                return offset
            if isinstance(found, Record):
                self._apply(view, found)
                offset = found.end
                continue
            if self._is_last and find_next_record(view, offset + 1) is None:
                self._result.torn_tails += 1
                _log.info(
                    "spool: cut a torn tail of {length} octets off segment {segment} at {offset}",
                    length=size - offset,
                    segment=self._number,
                    offset=offset,
                )
                return offset
            if isinstance(found, Damage) and found.resume is not None:
                self._quarantine(view, offset, found.resume, found.reason)
                offset = found.resume
                continue
            reason = found.reason if isinstance(found, Damage) else "truncated record"
            self._quarantine(view, offset, size, reason + " (rest of segment)")
            return offset if self._is_last else size

    def _apply(self, view: memoryview, record: Record) -> None:
        """Replay one sound record; quarantine it if its payload makes no sense."""
        self._result.records += 1
        payload = view[record.payload_offset : record.end]
        try:
            if record.type == RecordType.MESSAGE:
                self._apply_message(payload, record)
            elif record.type == RecordType.STATUS:
                queue_id, statuses = decode_status(payload)
                self._state.set_statuses(queue_id, statuses, self._number)
            elif record.type == RecordType.DONE:
                queue_id, _ = decode_done(payload)
                self._state.remove(queue_id, self._number)
            else:
                raise PayloadError(f"unknown record type {record.type}")
        except (PayloadError, ValueError) as e:
            self._quarantine(view, record.offset, record.end, str(e))
        finally:
            payload.release()

    def _apply_message(self, payload: memoryview, record: Record) -> None:
        prefix = decode_message_prefix(payload)
        envelope = decode_envelope(prefix.envelope_json)
        highest = self._result.highest_id
        if highest is None or prefix.queue_id > highest:
            self._result.highest_id = prefix.queue_id
        entry = MessageEntry(
            queue_id=prefix.queue_id,
            envelope=envelope,
            size=record.length - prefix.text_start,
            segment=self._number,
            text_offset=record.payload_offset + prefix.text_start,
            text_crc_seed=zlib.crc32(payload[: prefix.text_start]),
            record_crc=record.crc,
            statuses=initial_statuses(envelope),
            status_segment=self._number,
        )
        if not self._state.add_message(entry):
            raise PayloadError(f"duplicate queue id {prefix.queue_id}")

    def _quarantine(self, view: Buffer, start: int, end: int, reason: str) -> None:
        """Copy ``view[start:end]`` into quarantine/ (once), log it and count it."""
        slug = "".join(c if c.isalnum() else "-" for c in reason.lower()).strip("-")[:60]
        name = f"{self._number:010d}-{start:012d}-{slug}.bad"
        path = self._layout.quarantine_dir / name
        if self._repair:
            if path.exists():
                return
            try:
                write_file_durably(path, bytes(view[start:end]))
            except FileExistsError:
                return
            except OSError as e:
                _log.error("spool: cannot write {path}: {error}", path=str(path), error=e)
        self._result.quarantined.append(
            Quarantined(self._number, start, end - start, reason, path if self._repair else None)
        )
        _log.warn(
            "spool: quarantined {length} octets of segment {segment} at offset {offset}: {reason}",
            length=end - start,
            segment=self._number,
            offset=start,
            reason=reason,
        )

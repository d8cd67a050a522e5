"""Start-up: replay the log into a :class:`~relay.queue.state.SpoolState`, setting damage aside.

Theory of operation
-------------------
Segments are read in number order and their records replayed in order.  What is not a
sound record is one of three things:

* a **torn tail**: the end of the *last* segment where a crash interrupted a write that
  was never acknowledged: a sound header whose payload the file cuts short, or the
  first octets of a header.  Nothing sound follows it.  It is cut off (the file is
  truncated) and only counted: it held nothing anyone was told was safe.
* a **damaged tail**: the end of the last segment, with nothing sound after it, that
  is not plainly a torn write (a header that fails its check, a payload whose checksum
  fails).  It may be the last record of acknowledged mail, so it is copied into
  ``quarantine/`` first and cut off only once the copy is durable.
* **damage**: anything else (a bad checksum in an older segment, or in the last one
  with sound records after it, a payload whose checksum is right but whose content
  cannot be read).  Its bytes are copied into ``quarantine/`` under a name saying where
  they came from, how long they are and why, a line is logged, the counter goes up, and
  replay goes on with the next record: right after it when the header was sound (its
  length can be trusted), else at the next sound header (resynchronisation, see
  :mod:`relay.queue.record`), so only the damaged range is set aside.  In a legacy
  segment (older than the spool's key) a header can be forged by a message body, so
  there a damaged header costs the rest of the segment, which is set aside.

Recovery never raises for anything it finds in the files, and one bad record never
stops the rest from loading.  It never truncates or skips bytes whose quarantine copy
did not succeed: if the copy fails (``quarantine/`` not writable, disk full), it raises
:class:`~relay.errors.SpoolError` with a one-line reason, before anything is cut, and
the spool refuses to open.  Quarantining is idempotent: a region already in
``quarantine/`` with the same bytes is skipped without being counted again.  With
``repair=False`` (a read-only look by ``relay queue``) nothing is written, truncated or
removed.

All of this is blocking I/O: the daemon runs it in a thread before the reactor needs
the queue; the command runs it directly.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from relay.errors import SpoolError
from relay.fileio import fsync_directory
from relay.queue.key import SpoolKey, load_key, open_key, segment_framing
from relay.queue.layout import SpoolLayout, write_file_durably
from relay.queue.payload import (
    PayloadError,
    decode_done,
    decode_envelope,
    decode_message_prefix,
    decode_status,
)
from relay.queue.record import (
    Buffer,
    Damage,
    Framing,
    Record,
    RecordType,
    Truncated,
    find_next_record,
    read_at,
)
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
    key: SpoolKey | None = None  # None only on a read-only look at a spool without one
    last_segment: int | None = None  # the highest segment present
    end_offset: int = 0  # end of the last sound record in ``last_segment``
    highest_id: str | None = None  # the largest queue id seen, live or not
    quarantined: list[Quarantined] = field(default_factory=list)  # newly set aside
    torn_tails: int = 0
    temp_files_removed: int = 0
    records: int = 0

    def append_at(self) -> tuple[SpoolKey, int, int]:
        """The key, and the segment and offset where the next record goes.

        A legacy last segment (older than the key) is never appended to: new records
        start the first keyed segment.
        """
        if self.key is None:
            raise SpoolError("the spool was opened read-only; it has no key to write with")
        last = self.last_segment
        if last is None or last < self.key.keyed_from:
            return self.key, self.key.keyed_from, 0
        return self.key, last, self.end_offset


def recover(layout: SpoolLayout, *, repair: bool = True) -> Recovered:
    """Replay every segment of ``layout``; with ``repair``, truncate and quarantine.

    Raises SpoolError if the spool's key is unusable or damage cannot be set aside.
    """
    result = Recovered(SpoolState())
    if repair:
        layout.make_dirs()
        for temp in layout.temp_files():
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            result.temp_files_removed += 1
            _log.info("spool: removed temporary file {path}", path=str(temp))
        if result.temp_files_removed:
            for directory in (layout.root, layout.log_dir, layout.quarantine_dir):
                fsync_directory(directory)
        result.key = open_key(layout)
    else:
        result.key = load_key(layout)
    numbers = layout.segment_numbers()
    for number in numbers:
        is_last = number == numbers[-1]
        _Replay(layout, segment_framing(result.key, number), is_last, repair, result).run()
    if numbers:
        result.last_segment = numbers[-1]
    return result


class _Replay:
    """Replays one segment into the shared result."""

    def __init__(
        self,
        layout: SpoolLayout,
        framing: Framing,
        is_last: bool,
        repair: bool,
        result: Recovered,
    ) -> None:
        self._layout = layout
        self._framing = framing
        self._number = framing.segment
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
            raise SpoolError(f"cannot open spool segment {path}: {e.strerror or e}") from e
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
        """Replay records; return where the segment's bytes worth keeping end.

        Only the last segment ever ends before ``size``, and only after a torn tail or
        a damaged tail whose copy is in quarantine.
        """
        offset = 0
        framing = self._framing
        while True:
            found = read_at(view, offset, framing)
            if found is None:
                return offset
            if isinstance(found, Record):
                self._apply(view, found)
                offset = found.end
                continue
            if isinstance(found, Damage) and found.resume is not None:
                self._quarantine(view, offset, found.resume, found.reason)
                offset = found.resume
                continue
            following = find_next_record(view, offset + 1, framing)
            reason = found.reason if isinstance(found, Damage) else "truncated record"
            if following is None and self._is_last:
                if isinstance(found, Truncated):
                    self._cut_torn_tail(offset, size)
                else:
                    self._quarantine(view, offset, size, reason + " (damaged tail)")
                return offset
            if following is None or not framing.resynchronises:
                self._quarantine(view, offset, size, reason + " (rest of segment)")
                return size
            self._quarantine(view, offset, following, reason)
            offset = following

    def _cut_torn_tail(self, offset: int, size: int) -> None:
        self._result.torn_tails += 1
        _log.info(
            "spool: cut a torn tail of {length} octets off segment {segment} at {offset}",
            length=size - offset,
            segment=self._number,
            offset=offset,
        )

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
        """Copy ``view[start:end]`` into quarantine/ (once), log it and count it.

        Raises SpoolError if the copy cannot be made durable: the bytes must then stay
        where they are, and the spool must not open without them.
        """
        slug = "".join(c if c.isalnum() else "-" for c in reason.lower()).strip("-")[:60]
        stem = f"{self._number:010d}-{start:012d}-{end - start:012d}-{slug}"
        path = self._layout.quarantine_dir / f"{stem}.bad"
        if self._repair:
            data = bytes(view[start:end])
            for attempt in itertools.count(1):
                if _holds(path, data):
                    return  # set aside by an earlier start
                try:
                    write_file_durably(path, data)
                    break
                except FileExistsError:  # other bytes under that name: keep both
                    path = self._layout.quarantine_dir / f"{stem}.{attempt}.bad"
                except OSError as e:
                    raise SpoolError(
                        f"cannot set aside {end - start} damaged octets of spool segment "
                        f"{self._number} at offset {start} ({reason}): {e}; refusing to open "
                        f"the spool until {self._layout.quarantine_dir} is writable"
                    ) from e
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


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` already holds exactly ``data`` (an earlier start set it aside)."""
    try:
        with path.open("rb") as existing:
            return existing.read(len(data) + 1) == data
    except FileNotFoundError:
        return False

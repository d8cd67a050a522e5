"""``relay queue`` on a spool no daemon is running: the same requests, carried out directly.

The command takes the spool's lock itself (so a daemon starting meanwhile waits for
it), replays the log the way the daemon does at start, and appends the same STATUS and
DONE records the daemon would, each made durable before the command reports success.
Reading (``list``, ``show``) changes nothing on disk: not even a torn tail is cut, that
is left to whoever next writes.

This is plain blocking code without a reactor, because a command runs only this and
then exits.  It does not reclaim segments; the daemon does that when it next starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from relay.envelope import RecipientStatus
from relay.errors import SpoolError
from relay.queue.layout import SpoolLayout
from relay.queue.ops import flush_changes, hold_changes, release_changes
from relay.queue.payload import DoneReason, encode_done, encode_status
from relay.queue.protocol import Request, error_response, failed_result, reason_of, result
from relay.queue.record import RecordType, checksum
from relay.queue.recovery import recover
from relay.queue.segment import DEFAULT_SEGMENT_LIMIT, SegmentLog, Unframed
from relay.queue.state import MessageEntry, NoSuchMessage, merge_statuses
from relay.queue.view import HEADER_READ_LIMIT, details, queue_status, summary

__all__ = ["OfflineSpool"]

_Compute = Callable[[MessageEntry, float], dict[int, RecipientStatus]]


class OfflineSpool:
    """A spool opened by a command that holds its lock."""

    def __init__(
        self,
        layout: SpoolLayout,
        *,
        writable: bool,
        now: Callable[[], float],
        segment_limit: int = DEFAULT_SEGMENT_LIMIT,
    ) -> None:
        """Replay the log (repairing it only if ``writable``); the caller holds the lock."""
        self._layout = layout
        self._writable = writable
        self._now = now
        self._limit = segment_limit
        self._recovered = recover(layout, repair=writable)
        self._state = self._recovered.state
        self._log: SegmentLog | None = None

    @property
    def quarantined(self) -> int:
        """Regions recovery set aside while opening."""
        return len(self._recovered.quarantined)

    def execute(self, request: Request) -> dict[str, Any]:
        """Carry out one request; the same response the daemon would give."""
        if request.op == "list":
            entries = [self._state.messages[q] for q in sorted(self._state.messages)]
            return {"ok": True, "messages": [summary(e) for e in entries]}
        if request.op == "status":
            queue = queue_status(self._state.messages.values(), self._now())
            return {"ok": True, "status": {"daemon": {"running": False}, "queue": queue}}
        ids = request.ids
        if request.op == "show":
            assert ids is not None
            try:
                entry = self._state.get(ids[0])
                head = self._read_head(entry)
            except (NoSuchMessage, OSError) as e:
                return error_response(str(e), reason_of(e))
            return {"ok": True, "message": details(entry, head)}
        if not self._writable:
            raise SpoolError(f"{request.op} needs the spool opened for writing")
        if ids is None:
            changed = 0
            for queue_id in sorted(self._state.messages):
                changed += self._one(request, queue_id)
            return {"ok": True, "changed": changed}
        results = []
        for queue_id in ids:
            try:
                changed = self._one(request, queue_id)
            except (NoSuchMessage, SpoolError) as e:
                results.append(failed_result(queue_id, e))
            else:
                results.append(result(queue_id, changed))
        return {"ok": True, "results": results}

    def close(self) -> None:
        """Close the log, if anything was written."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def _one(self, request: Request, queue_id: str) -> int:
        entry = self._state.get(queue_id)
        if request.op == "rm":
            segment = self._append(RecordType.DONE, encode_done(queue_id, DoneReason.REMOVED))
            self._state.remove(queue_id, segment)
            return 1
        compute: _Compute
        if request.op == "hold":
            compute = _hold
        elif request.op == "release":
            compute = _release
        else:
            channel = request.channel

            def compute(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
                return flush_changes(entry.envelope, entry.statuses, channel, now)

        changes = compute(entry, self._now())
        if not changes:
            return 0
        statuses = merge_statuses(entry.statuses, changes)
        segment = self._append(RecordType.STATUS, encode_status(queue_id, statuses))
        self._state.set_statuses(queue_id, statuses, segment)
        return len(changes)

    def _append(self, record_type: RecordType, payload: bytes) -> int:
        """Write one record durably; the segment it went to.  Raises SpoolError."""
        try:
            if self._log is None:
                key, segment, offset = self._recovered.append_at()
                self._log = SegmentLog(self._layout, key, segment, offset, self._limit)
            length, crc = checksum([payload])
            [(segment, _)] = self._log.append([Unframed(record_type, [payload], length, crc)])
        except OSError as e:
            raise SpoolError(f"spool write failed: {e.strerror or e}") from e
        return segment

    def _read_head(self, entry: MessageEntry) -> bytes:
        fd = os.open(self._layout.segment_path(entry.segment), os.O_RDONLY)
        try:
            return os.pread(fd, min(entry.size, HEADER_READ_LIMIT), entry.text_offset)
        finally:
            os.close(fd)


def _hold(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
    return hold_changes(entry.statuses, now)


def _release(entry: MessageEntry, now: float) -> dict[int, RecipientStatus]:
    return release_changes(entry.statuses, now)

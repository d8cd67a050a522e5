"""The relay's record of its calls: one JSON line per call, from the link's accounting.

``relay calls`` reads it; the log line of each call and the metrics are made from the
same :class:`CallRecord`.  The file is ``SPOOL/phone/calls.jsonl``; it is accounting,
not mail, so a line lost in a crash loses no message and the appends are not fsynced
(they are written off the reactor thread all the same).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from relay.sansio.phone.accounting import CallSummary

__all__ = ["CALL_LOG", "CallLog", "CallRecord", "read_calls"]

CALL_LOG: Final = Path("phone") / "calls.jsonl"
_KEEP_BYTES: Final = 4 << 20  # the file is cut to its newer half beyond this


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call as operators see it (both ends keep their own)."""

    site: str
    direction: str  # "out": we called; "in": the site called us
    start: float
    seconds: float
    result: str  # the link's outcome, or "no-connection"
    reason: str
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    efficiency: float | None = None
    frames_resent: int = 0

    @property
    def completed(self) -> bool:
        """Whether the call ended with the hang-up both sides agreed on."""
        return self.result == "completed"

    @classmethod
    def from_summary(cls, direction: str, start: float, summary: CallSummary) -> CallRecord:
        """The record of a call the link ran to its end (whatever the outcome)."""
        payload = summary.payload_bytes_sent + summary.payload_bytes_received
        return cls(
            site=summary.peer or "?",
            direction=direction,
            start=start,
            seconds=summary.seconds,
            result=summary.outcome.value,
            reason=summary.reason,
            messages_sent=summary.messages_sent,
            messages_received=summary.messages_received,
            bytes_sent=summary.payload_bytes_sent,
            bytes_received=summary.payload_bytes_received,
            wire_bytes_sent=summary.wire_bytes_sent,
            wire_bytes_received=summary.wire_bytes_received,
            efficiency=summary.efficiency(payload),
            frames_resent=summary.frames_resent,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallRecord:
        """Read back :meth:`to_dict`'s form (unknown keys ignored)."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class CallLog:
    """Appends call records to the spool's call log, off the reactor thread."""

    def __init__(self, spool: Path, reactor: Any) -> None:
        self.path = spool / CALL_LOG
        self._reactor = reactor

    def append(self, record: CallRecord) -> Deferred[None]:
        """Add one record (fires once written)."""
        line = json.dumps(record.to_dict(), sort_keys=True) + "\n"
        result: Deferred[None] = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _append, self.path, line.encode()
        )
        return result


def _append(path: Path, line: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size > _KEEP_BYTES:
            data = path.read_bytes()
            keep = data[len(data) // 2 :]
            keep = keep[keep.find(b"\n") + 1 :]
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(keep)
            os.replace(tmp, path)
    except FileNotFoundError:
        pass
    with path.open("ab") as f:
        f.write(line)


def read_calls(spool: Path, limit: int | None = None) -> list[CallRecord]:
    """The newest ``limit`` records (all if None), oldest first; bad lines skipped."""
    records = list(_records(spool / CALL_LOG))
    return records[-limit:] if limit else records


def _records(path: Path) -> Iterator[CallRecord]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            data = json.loads(line)
            if isinstance(data, dict):
                yield CallRecord.from_dict(data)
        except (ValueError, TypeError):
            continue

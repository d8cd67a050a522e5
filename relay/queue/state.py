"""What the log says, in memory: live messages, their states, and what each segment holds.

Theory of operation
-------------------
The log is append-only, so the truth about a message is spread over records: its
MESSAGE record (envelope, text, everyone pending), then any number of STATUS records
(each the *full* state of every recipient) and at most one DONE record.  Replaying the
records in log order (segment number, then offset) through :class:`SpoolState` gives
the state; the live store applies each record the same way once it is durable.

Deleting a segment is where a log loses data if it is careless.  A segment ``S`` may be
deleted only when none of its MESSAGE records is live, and even then it can still hold
two kinds of record that matter:

* the newest STATUS record of a live message whose MESSAGE record is in an older segment
  (deleting it would roll the message back to an older state: a duplicate delivery);
* the DONE record of a message whose MESSAGE record is in an older segment that still
  exists (deleting it would bring the message back to life).

So :meth:`SpoolState.checkpoint_plan` lists exactly those; the store appends a fresh copy
of each to the active segment, waits until they are durable, and only then unlinks ``S``.
A copy is always in a later segment than what it copies, so replay order keeps it the
newest.  A crash in between leaves both copies, which replay to the same state.

This module does no I/O and knows nothing of Twisted: recovery, the live store and the
offline tools all drive the same object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from relay.envelope import Envelope, RecipientState, RecipientStatus

__all__ = [
    "CheckpointPlan",
    "MessageEntry",
    "NoSuchMessage",
    "SegmentInfo",
    "SpoolState",
    "merge_statuses",
]


class NoSuchMessage(KeyError):
    """No live message has this queue id."""

    def __str__(self) -> str:
        return f"no such message: {self.args[0]}"


@dataclass(slots=True)
class MessageEntry:
    """One live message: its envelope, where its text is, and its recipients' states."""

    queue_id: str
    envelope: Envelope
    size: int
    segment: int
    text_offset: int  # absolute offset of the text in the segment file
    text_crc_seed: int  # CRC-32 of the payload before the text: where a reader's CRC starts
    record_crc: int  # CRC-32 of the whole payload: what a reader's CRC must end at
    statuses: tuple[RecipientStatus, ...]
    status_segment: int  # the segment holding the newest record of ``statuses``


@dataclass(slots=True)
class SegmentInfo:
    """What one segment file holds that still matters."""

    number: int
    live: set[str] = field(default_factory=set)  # live messages whose MESSAGE record is here
    status_holders: set[str] = field(default_factory=set)  # live, newest status here
    tombstones: dict[str, int] = field(default_factory=dict)  # DONE here: id -> its segment


@dataclass(frozen=True, slots=True)
class CheckpointPlan:
    """What must be copied forward before a segment can be deleted."""

    segment: int
    statuses: tuple[str, ...]  # live messages whose newest STATUS is in the segment
    tombstones: tuple[tuple[str, int], ...]  # (queue id, segment of its MESSAGE record)


def merge_statuses(
    current: tuple[RecipientStatus, ...], changes: Mapping[int, RecipientStatus]
) -> tuple[RecipientStatus, ...]:
    """The statuses after ``changes`` (by recipient index); raises IndexError if out of range."""
    merged = list(current)
    for index, status in changes.items():
        if not 0 <= index < len(merged):
            raise IndexError(f"no recipient {index} (the message has {len(merged)})")
        if not isinstance(status, RecipientStatus):
            raise TypeError(f"recipient {index}: not a RecipientStatus")
        merged[index] = status
    return tuple(merged)


def all_final(statuses: Iterable[RecipientStatus]) -> bool:
    """True when every recipient is delivered or failed: the message is done."""
    return all(s.state.is_final for s in statuses)


def initial_statuses(envelope: Envelope) -> tuple[RecipientStatus, ...]:
    """A new message: every recipient pending, never tried."""
    return tuple(RecipientStatus(RecipientState.PENDING) for _ in envelope.recipients)


class SpoolState:
    """The replayed log: live messages by id and the bookkeeping of every segment."""

    def __init__(self) -> None:
        self.messages: dict[str, MessageEntry] = {}
        self.segments: dict[int, SegmentInfo] = {}

    def add_segment(self, number: int) -> SegmentInfo:
        """Note that segment ``number`` exists (idempotent)."""
        info = self.segments.get(number)
        if info is None:
            info = self.segments[number] = SegmentInfo(number)
        return info

    def get(self, queue_id: str) -> MessageEntry:
        """The live message ``queue_id``; raises NoSuchMessage."""
        entry = self.messages.get(queue_id)
        if entry is None:
            raise NoSuchMessage(queue_id)
        return entry

    def add_message(self, entry: MessageEntry) -> bool:
        """Apply a MESSAGE record; False (and nothing changes) if the id is already live."""
        if entry.queue_id in self.messages:
            return False
        self.messages[entry.queue_id] = entry
        info = self.add_segment(entry.segment)
        info.live.add(entry.queue_id)
        self.add_segment(entry.status_segment).status_holders.add(entry.queue_id)
        return True

    def set_statuses(
        self, queue_id: str, statuses: tuple[RecipientStatus, ...], segment: int
    ) -> MessageEntry | None:
        """Apply a STATUS record written in ``segment``; None if the message is not live.

        A record whose recipient count does not match the envelope raises ValueError.
        """
        entry = self.messages.get(queue_id)
        if entry is None:
            return None
        if len(statuses) != len(entry.envelope.recipients):
            raise ValueError(
                f"status of {queue_id} has {len(statuses)} recipients, "
                f"the envelope {len(entry.envelope.recipients)}"
            )
        self.segments[entry.status_segment].status_holders.discard(queue_id)
        entry.statuses = statuses
        entry.status_segment = segment
        self.add_segment(segment).status_holders.add(queue_id)
        return entry

    def remove(self, queue_id: str, segment: int) -> MessageEntry | None:
        """Apply a DONE record written in ``segment``; None if the message is not live."""
        entry = self.messages.pop(queue_id, None)
        if entry is None:
            return None
        self.segments[entry.segment].live.discard(queue_id)
        self.segments[entry.status_segment].status_holders.discard(queue_id)
        if segment != entry.segment:
            self.add_segment(segment).tombstones[queue_id] = entry.segment
        return entry

    def move_tombstone(self, queue_id: str, source: int, segment: int) -> None:
        """Note that the DONE record of ``queue_id`` in ``source`` was copied into ``segment``."""
        source_info = self.segments.get(source)
        if source_info is None:
            return
        message_segment = source_info.tombstones.pop(queue_id, None)
        needed = message_segment is not None and message_segment in self.segments
        if needed and message_segment != segment:
            assert message_segment is not None
            self.add_segment(segment).tombstones[queue_id] = message_segment

    def reclaimable(self, active: int) -> list[int]:
        """Segments other than the active one that hold no live message, oldest first."""
        return sorted(n for n, info in self.segments.items() if n != active and not info.live)

    def checkpoint_plan(self, number: int) -> CheckpointPlan:
        """What must be copied forward before segment ``number`` is deleted."""
        info = self.segments[number]
        if info.live:
            raise ValueError(f"segment {number} still holds live messages")
        tombstones = tuple(
            (qid, msg_seg)
            for qid, msg_seg in sorted(info.tombstones.items())
            if msg_seg in self.segments and msg_seg != number
        )
        return CheckpointPlan(number, tuple(sorted(info.status_holders)), tombstones)

    def is_reclaim_ready(self, number: int) -> bool:
        """True when nothing in segment ``number`` still needs copying forward."""
        info = self.segments.get(number)
        if info is None or info.live or info.status_holders:
            return False
        return not any(
            msg_seg in self.segments and msg_seg != number for msg_seg in info.tombstones.values()
        )

    def drop_segment(self, number: int) -> None:
        """Forget segment ``number`` once its file is gone."""
        info = self.segments.pop(number)
        if info.live or info.status_holders:
            raise AssertionError(f"segment {number} dropped while it still mattered")

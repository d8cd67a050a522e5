"""What the deliverer holds in memory while it works on a message: claims and outcomes.

The queue reports a recipient as due until its new state is durable, so the deliverer
must remember which recipients it is already working on, or every wake-up would start
them again.  A *claim* does that: a scan claims each due recipient it takes on, and the
claim is released only once the recipient's new state has been written (or, when the
deliverer stops, once it has been decided to write nothing).  A claim is never released
before its write is durable: a scan in between would deliver a second copy.

A :class:`MessageWork` is one scan's share of one message: the recipients it claimed,
their states as the deliverer knows them, and the failures held back until every
transaction of the message in this scan has ended, so that they go in one DSN.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from relay.envelope import Destination, Envelope, RecipientStatus
from relay.policy.dsn import DsnRecipient
from relay.reply import Reply

__all__ = ["Attempted", "Claims", "Key", "MessageWork", "Outcome", "Parked"]

Key = tuple[str, int]  # (queue id, recipient index)


@dataclass(frozen=True, slots=True)
class Attempted:
    """A recipient whose attempt ended with ``reply`` (an attempt is counted)."""

    reply: Reply
    destination: Destination | None


@dataclass(frozen=True, slots=True)
class Parked:
    """A recipient held back because its destination rests until ``until`` (not counted)."""

    until: float
    reason: Reply
    destination: Destination


Outcome = Attempted | Parked


@dataclass(eq=False)
class MessageWork:
    """One scan's share of one message."""

    queue_id: str
    envelope: Envelope
    statuses: list[RecipientStatus]
    claimed: set[int] = field(default_factory=set)
    routes: dict[int, Destination | None] = field(default_factory=dict)
    pending: int = 1  # jobs not yet recorded, plus the scan's own token
    holding: set[int] = field(default_factory=set)  # claims kept after a failed write
    failures: dict[int, tuple[DsnRecipient, RecipientStatus, Destination | None]] = field(
        default_factory=dict
    )


class Claims:
    """Which recipients are being worked on, by which work; and which messages were warned."""

    def __init__(self) -> None:
        self._owners: dict[Key, MessageWork] = {}
        self._works: dict[str, set[MessageWork]] = {}
        self.warned: set[str] = set()  # warned while a work for the message is active
        self._active = 0

    def __len__(self) -> int:
        """How many works are active."""
        return self._active

    def begin(self, work: MessageWork) -> None:
        """A scan starts working on ``work``."""
        self._works.setdefault(work.queue_id, set()).add(work)
        self._active += 1

    def claim(self, work: MessageWork, index: int) -> bool:
        """Claim a recipient for ``work``; False if some work already has it."""
        key = (work.queue_id, index)
        if key in self._owners:
            return False
        self._owners[key] = work
        work.claimed.add(index)
        return True

    def owner(self, key: Key) -> MessageWork | None:
        """The work holding ``key``, if any."""
        return self._owners.get(key)

    def release(self, work: MessageWork, indices: Iterable[int]) -> None:
        """Release claims of ``work`` (their states are durable, or nothing will be written)."""
        for index in list(indices):
            if index in work.claimed:
                work.claimed.discard(index)
                del self._owners[work.queue_id, index]

    def end(self, work: MessageWork) -> None:
        """``work`` is finished: release what it still holds (but ``holding``), forget it."""
        self.release(work, list(work.claimed - work.holding))
        works = self._works.get(work.queue_id)
        if works is not None and work in works:
            works.discard(work)
            self._active -= 1
            if not works:
                del self._works[work.queue_id]
                self.warned.discard(work.queue_id)

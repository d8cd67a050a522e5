"""The deliverer's view of the queue: which recipients are due, per destination, in memory.

Theory of operation
-------------------
Every recipient that is not final or held has a slot here, keyed by (queue id, index)
and filed under its :class:`~relay.envelope.Destination` (None when not routed yet):

* *ready*: PENDING, or DEFERRED with a next attempt already past.  Kept per destination,
  so the deliverer can open one session per destination and fill it.
* *waiting*: DEFERRED until a future time.  Kept in a heap by time; stale heap entries
  (the slot changed since) are skipped lazily and the heap is rebuilt when they pile up.

One timer, on an injected :class:`~twisted.internet.interfaces.IReactorTime`, is set for
the earliest waiting slot.  When it fires, every slot that has fallen due moves to
*ready* and ``on_due`` is called once; then the timer is set for the next one.  Nothing
polls, and nothing here reads a message's text or touches the disk.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relay.envelope import Destination, RecipientState, RecipientStatus

__all__ = ["DueIndex", "Key"]

Key = tuple[str, int]  # (queue id, recipient index)


@dataclass(slots=True)
class _Slot:
    destination: Destination | None
    due_at: float  # when it is (or was) due
    ready: bool


class DueIndex:
    """Recipients by destination and due time, with a timer for the next one to fall due."""

    def __init__(self, clock: IReactorTime, on_due: Callable[[], None]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._slots: dict[Key, _Slot] = {}
        self._ready: dict[Destination | None, set[Key]] = {}
        self._heap: list[tuple[float, str, int]] = []
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._stopped = False

    def __len__(self) -> int:
        """How many recipients are waiting or ready."""
        return len(self._slots)

    def set(
        self, queue_id: str, index: int, destination: Destination | None, status: RecipientStatus
    ) -> bool:
        """File one recipient under its new status; True if it is due now."""
        key = (queue_id, index)
        self._forget(key)
        state = status.state
        if state.is_final or state is RecipientState.HELD:
            return False
        now = self._clock.seconds()
        due_at = now
        if state is RecipientState.DEFERRED and status.next_attempt is not None:
            due_at = status.next_attempt
        ready = due_at <= now
        self._slots[key] = _Slot(destination, due_at, ready)
        if ready:
            self._ready.setdefault(destination, set()).add(key)
        else:
            heapq.heappush(self._heap, (due_at, queue_id, index))
            self._reschedule()
        return ready

    def discard_message(self, queue_id: str, count: int) -> None:
        """Forget recipients 0…count-1 of a message that left the queue."""
        for index in range(count):
            self._forget((queue_id, index))
        self._reschedule()

    def due(self, now: float) -> list[Key]:
        """Every recipient due at ``now``, oldest message first."""
        found = {key for keys in self._ready.values() for key in keys}
        found.update((qid, index) for _, qid, index in self._waiting_until(now))
        return sorted(found)

    def due_by_destination(self, now: float) -> dict[Destination | None, list[Key]]:
        """The same recipients grouped by destination, each group oldest first."""
        groups: dict[Destination | None, set[Key]] = {
            dest: set(keys) for dest, keys in self._ready.items() if keys
        }
        for _, qid, index in self._waiting_until(now):
            groups.setdefault(self._slots[qid, index].destination, set()).add((qid, index))
        return {dest: sorted(keys) for dest, keys in groups.items()}

    def next_due_time(self) -> float | None:
        """When the earliest waiting (deferred) recipient falls due, or None."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def stop(self) -> None:
        """Cancel the timer for good (the queue is closing)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    # --- internals ----------------------------------------------------------------------

    def _forget(self, key: Key) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None and slot.ready:
            keys = self._ready.get(slot.destination)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._ready[slot.destination]

    def _is_live(self, entry: tuple[float, str, int]) -> bool:
        due_at, qid, index = entry
        slot = self._slots.get((qid, index))
        return slot is not None and not slot.ready and slot.due_at == due_at

    def _drop_stale_top(self) -> None:
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._slots):
            self._heap = [e for e in self._heap if self._is_live(e)]
            heapq.heapify(self._heap)

    def _waiting_until(self, now: float) -> Iterator[tuple[float, str, int]]:
        """Live heap entries due at or before ``now``, without changing the heap."""
        stack = [0]
        heap = self._heap
        while stack:
            i = stack.pop()
            if i >= len(heap) or heap[i][0] > now:
                continue  # the heap property: nothing below it is earlier
            if self._is_live(heap[i]):
                yield heap[i]
            stack.extend((2 * i + 1, 2 * i + 2))

    def _reschedule(self) -> None:
        """Point the timer at the earliest waiting slot (or cancel it)."""
        when = self.next_due_time()
        if when == self._timer_at and self._timer is not None and self._timer.active():
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = when
        if when is not None and not self._stopped:
            delay = max(0.0, when - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._clock.seconds()
        moved = False
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._is_live(entry):
                continue
            _, qid, index = entry
            slot = self._slots[qid, index]
            slot.ready = True
            self._ready.setdefault(slot.destination, set()).add((qid, index))
            moved = True
        self._reschedule()
        if moved:
            self._on_due()

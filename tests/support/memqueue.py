"""An in-memory IQueue for Clock-driven deliverer tests: the whole interface, no disk.

It keeps the spool's promises that a deliverer can observe, so tests on it mean
something for the real one:

* a change is visible (in ``load``, ``due``…) only once its Deferred has fired; with
  ``latency`` set, every store/update fires that many seconds later on the clock (as a
  durable write does), otherwise at once;
* listeners are called when a message is stored due now, when an update or flush makes
  a recipient due now, and when a deferred recipient falls due (a timer on the clock,
  set for the earliest one): a deliverer never needs to poll it;
* ``update`` removes a message once every recipient is final;
* ``journal`` records every durable change in order (store, update, remove), so a test
  can check *when* things became durable relative to each other, and ``done`` keeps
  the final states of messages that left the queue.

``fail_stores`` / ``fail_updates`` make the next N stores/updates fail with SpoolError
(a full disk; ``store_error`` says which), to test what a caller does then.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from relay.envelope import Destination, Envelope, RecipientState, RecipientStatus
from relay.errors import SpoolError
from relay.interfaces import IHandoffStore, IMessage, IQueue
from relay.queue.payload import decode_envelope
from relay.queue.state import NoSuchMessage

from support.fakes import BytesMessage

_T = TypeVar("_T")


@dataclass
class _Entry:
    envelope: Envelope
    text: bytes
    statuses: list[RecipientStatus]


@implementer(IQueue, IHandoffStore)
class MemoryQueue:
    """A complete IQueue held in memory, driven by an IReactorTime."""

    def __init__(self, clock: IReactorTime, *, latency: float | None = None) -> None:
        self._clock = clock
        self._latency = latency
        self._messages: dict[str, _Entry] = {}
        self._listeners: list[Callable[[], object]] = []
        self._serial = 0
        self._timer: IDelayedCall | None = None
        self._waiting: list[tuple[float, str, int]] = []  # heap; stale entries skipped
        self.journal: list[tuple[Any, ...]] = []
        self.done: dict[str, tuple[Envelope, tuple[RecipientStatus, ...]]] = {}
        self.texts: dict[str, bytes] = {}  # every text ever stored, by id
        self.fail_stores = 0
        self.fail_updates = 0
        self.store_error: Exception = SpoolError("store failed (test)")

    # --- writing ----------------------------------------------------------------------------

    def store(
        self,
        envelope: Envelope,
        text: bytes,
        *,
        on_durable: Callable[[str], object] | None = None,
        envelope_json: bytes | None = None,
    ) -> Deferred[str]:
        """Keep a new message; fire with its id (sortable by arrival).

        ``envelope_json``, when given, must read back as ``envelope`` (checked here).

        ``on_durable`` is called just before the Deferred fires (the spool calls it from
        its writer thread, earlier; here "durable" and "fired" are the same moment)."""
        if self.fail_stores:
            self.fail_stores -= 1
            error = self.store_error
            return self._later(lambda: _raise(error))
        if envelope_json is not None and decode_envelope(envelope_json) != envelope:
            return self._later(lambda: _raise(ValueError("envelope_json is not the envelope")))
        self._serial += 1
        queue_id = f"{self._serial:014X}"

        def apply() -> str:
            statuses = [RecipientStatus() for _ in envelope.recipients]
            self._messages[queue_id] = _Entry(envelope, text, statuses)
            self.texts[queue_id] = text
            self.journal.append(("store", queue_id, envelope))
            if on_durable is not None:
                finish = on_durable(queue_id)
                if callable(finish):
                    finish()
            self._changed(due_now=True)
            return queue_id

        return self._later(apply)

    def update(self, queue_id: str, changes: Mapping[int, RecipientStatus]) -> Deferred[None]:
        """Record new states; remove the message once every recipient is final."""
        changes = dict(changes)
        if self.fail_updates:
            self.fail_updates -= 1
            return self._later(lambda: _raise(SpoolError("update failed (test)")))

        def apply() -> None:
            entry = self._get(queue_id)
            for index, status in changes.items():
                if not 0 <= index < len(entry.statuses):
                    raise IndexError(f"no recipient {index}")
                if not isinstance(status, RecipientStatus):
                    raise TypeError("not a RecipientStatus")
            for index, status in changes.items():
                entry.statuses[index] = status
                if status.state is RecipientState.DEFERRED and status.next_attempt is not None:
                    heapq.heappush(self._waiting, (status.next_attempt, queue_id, index))
            self.journal.append(("update", queue_id, dict(changes)))
            if all(s.state.is_final for s in entry.statuses):
                del self._messages[queue_id]
                self.done[queue_id] = (entry.envelope, tuple(entry.statuses))
                self.journal.append(("remove", queue_id, "final"))
            self._changed(due_now=any(_due(s, self._now()) for s in changes.values()))

        return self._later(apply)

    def remove(self, queue_id: str) -> Deferred[None]:
        """Delete a message whatever its state."""

        def apply() -> None:
            entry = self._get(queue_id)
            del self._messages[queue_id]
            self.done[queue_id] = (entry.envelope, tuple(entry.statuses))
            self.journal.append(("remove", queue_id, "removed"))
            self._changed(due_now=False)

        return self._later(apply)

    def hold(self, queue_id: str) -> Deferred[int]:
        """Put every recipient not yet final on hold."""
        return self._change(
            queue_id,
            lambda s, _: (
                replace(s, state=RecipientState.HELD)
                if not s.state.is_final and s.state is not RecipientState.HELD
                else None
            ),
        )

    def release(self, queue_id: str) -> Deferred[int]:
        """Take held recipients off hold: deferred until their next attempt, or due now."""
        now = self._now()

        def released(s: RecipientStatus, _: int) -> RecipientStatus | None:
            if s.state is not RecipientState.HELD:
                return None
            if s.next_attempt is not None and s.next_attempt > now and s.attempts > 0:
                return replace(s, state=RecipientState.DEFERRED)
            return replace(s, state=RecipientState.PENDING, next_attempt=None)

        return self._change(queue_id, released)

    def flush_message(self, queue_id: str, channel: str | None = None) -> Deferred[int]:
        """Make the message's deferred recipients (on ``channel``) due now."""
        if queue_id not in self._messages:
            return defer.fail(NoSuchMessage(queue_id))
        entry = self._messages[queue_id]
        wanted = {
            i
            for i, r in enumerate(entry.envelope.recipients)
            if channel is None or (r.destination is not None and r.destination.channel == channel)
        }
        return self._change(
            queue_id,
            lambda s, i: (
                replace(s, state=RecipientState.PENDING, next_attempt=None)
                if s.state is RecipientState.DEFERRED and i in wanted
                else None
            ),
        )

    def flush(
        self, queue_ids: Iterable[str] | None = None, channel: str | None = None
    ) -> Deferred[int]:
        """flush_message for each id (every message if None); fire with the total."""
        ids = sorted(self._messages) if queue_ids is None else list(queue_ids)
        flushes = [self.flush_message(q, channel) for q in ids if q in self._messages]
        d = defer.gatherResults(flushes, consumeErrors=True)
        return d.addCallback(sum)

    # --- reading ----------------------------------------------------------------------------

    def load(self, queue_id: str) -> Deferred[tuple[Envelope, Sequence[RecipientStatus]]]:
        """The envelope and the recipients' states."""
        try:
            entry = self._get(queue_id)
        except NoSuchMessage as e:
            return defer.fail(e)
        return defer.succeed((entry.envelope, tuple(entry.statuses)))

    def open_message(self, queue_id: str) -> IMessage:
        """The message, its text readable in chunks."""
        entry = self._get(queue_id)
        return BytesMessage(queue_id, entry.envelope, entry.text)

    def list_messages(self) -> Deferred[Sequence[str]]:
        """Every id, oldest first."""
        return defer.succeed(sorted(self._messages))

    def due(self, now: float) -> Deferred[Iterable[tuple[str, int]]]:
        """Every (id, index) due at ``now``, oldest first."""
        return defer.succeed(list(self._due(now)))

    def due_by_destination(
        self, now: float
    ) -> Deferred[Mapping[Destination | None, Sequence[tuple[str, int]]]]:
        """The due recipients grouped by destination, each group oldest first."""
        groups: dict[Destination | None, list[tuple[str, int]]] = {}
        for queue_id, index in self._due(now):
            destination = self._messages[queue_id].envelope.recipients[index].destination
            groups.setdefault(destination, []).append((queue_id, index))
        return defer.succeed(groups)

    def next_due_time(self) -> float | None:
        """When the earliest deferred recipient not yet due falls due, or None."""
        now = self._now()
        heap = self._waiting
        while heap and (heap[0][0] <= now or not self._waits(heap[0])):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _waits(self, item: tuple[float, str, int]) -> bool:
        when, queue_id, index = item
        entry = self._messages.get(queue_id)
        if entry is None:
            return False
        status = entry.statuses[index]
        return status.state is RecipientState.DEFERRED and status.next_attempt == when

    def add_listener(self, callback: object) -> None:
        """Call ``callback()`` when mail is stored or falls due."""
        if not callable(callback):
            raise TypeError("a listener must be callable")
        self._listeners.append(callback)

    def remove_listener(self, callback: object) -> None:
        """Stop calling ``callback``."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    # --- for tests --------------------------------------------------------------------------

    def statuses(self, queue_id: str) -> tuple[RecipientStatus, ...]:
        """A message's states, whether it is queued or done."""
        if queue_id in self._messages:
            return tuple(self._messages[queue_id].statuses)
        return self.done[queue_id][1]

    def envelope(self, queue_id: str) -> Envelope:
        """A message's envelope, whether it is queued or done."""
        if queue_id in self._messages:
            return self._messages[queue_id].envelope
        return self.done[queue_id][0]

    def queued(self) -> list[str]:
        """The ids queued now."""
        return sorted(self._messages)

    def stored(self) -> list[str]:
        """Every id ever stored, in order."""
        return [e[1] for e in self.journal if e[0] == "store"]

    # --- internals --------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.seconds()

    def _get(self, queue_id: str) -> _Entry:
        entry = self._messages.get(queue_id)
        if entry is None:
            raise NoSuchMessage(queue_id)
        return entry

    def _due(self, now: float) -> Iterable[tuple[str, int]]:
        for queue_id in sorted(self._messages):
            for index, status in enumerate(self._messages[queue_id].statuses):
                if _due(status, now):
                    yield queue_id, index

    def _change(
        self, queue_id: str, compute: Callable[[RecipientStatus, int], RecipientStatus | None]
    ) -> Deferred[int]:
        """Apply ``compute`` to each (state, index); write the states it changes."""
        try:
            entry = self._get(queue_id)
        except NoSuchMessage as e:
            return defer.fail(e)
        changes: dict[int, RecipientStatus] = {}
        for index, status in enumerate(entry.statuses):
            new = compute(status, index)
            if new is not None:
                changes[index] = new
        if not changes:
            return defer.succeed(0)
        return self.update(queue_id, changes).addCallback(lambda _: len(changes))

    def _later(self, apply: Callable[[], _T]) -> Deferred[_T]:
        """Run ``apply`` now, or after ``latency`` seconds: the change's durable moment."""
        if self._latency is None:
            return defer.maybeDeferred(apply)
        d: Deferred[_T] = Deferred()

        def fire() -> None:
            try:
                result = apply()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)

        self._clock.callLater(self._latency, fire)
        return d

    def _changed(self, *, due_now: bool) -> None:
        self._arm()
        if due_now:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _arm(self) -> None:
        """One timer, at the earliest deferred recipient still to fall due."""
        when = self.next_due_time()
        if self._timer is not None and self._timer.active():
            if when is not None and self._timer.getTime() == when:
                return
            self._timer.cancel()
        self._timer = None
        if when is not None:
            self._timer = self._clock.callLater(when - self._now(), self._fell_due)

    def _fell_due(self) -> None:
        self._timer = None
        self._arm()
        self._notify()


def _due(status: RecipientStatus, now: float) -> bool:
    if status.state is RecipientState.PENDING:
        return True
    return status.state is RecipientState.DEFERRED and (
        status.next_attempt is None or status.next_attempt <= now
    )


def _raise(error: Exception) -> Any:
    raise error

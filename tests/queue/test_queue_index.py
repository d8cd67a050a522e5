"""The due index: what is due per destination, and a timer that wakes when a deferral ends."""

from __future__ import annotations

from twisted.internet.task import Clock

from relay.envelope import Destination, RecipientState, RecipientStatus
from relay.queue.index import DueIndex

SMTP = Destination("smtp", "a.test")
PHONE = Destination("phone", "site-b")
PENDING = RecipientStatus(RecipientState.PENDING)


def _deferred(until: float) -> RecipientStatus:
    return RecipientStatus(RecipientState.DEFERRED, 1, until)


def _index() -> tuple[DueIndex, Clock, list[float]]:
    clock = Clock()
    wakes: list[float] = []
    return DueIndex(clock, lambda: wakes.append(clock.seconds())), clock, wakes


def test_pending_recipients_are_due_grouped_by_destination() -> None:
    """Pending recipients are due at once, grouped by (channel, destination), oldest first."""
    index, _, _ = _index()
    assert index.set("B", 0, SMTP, PENDING)
    assert index.set("A", 1, SMTP, PENDING)
    assert index.set("A", 0, PHONE, PENDING)
    assert index.set("C", 0, None, PENDING)
    assert index.due(0) == [("A", 0), ("A", 1), ("B", 0), ("C", 0)]
    assert index.due_by_destination(0) == {
        SMTP: [("A", 1), ("B", 0)],
        PHONE: [("A", 0)],
        None: [("C", 0)],
    }


def test_final_and_held_recipients_are_never_due() -> None:
    """Delivered, failed and held recipients leave the index."""
    index, _, _ = _index()
    index.set("A", 0, SMTP, PENDING)
    for state in (RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.HELD):
        index.set("A", 0, SMTP, RecipientStatus(state))
        assert index.due(1e12) == [] and len(index) == 0


def test_a_deferral_wakes_the_listener_exactly_when_it_falls_due() -> None:
    """The timer fires at the earliest next attempt, moves it to due and calls on_due once."""
    index, clock, wakes = _index()
    assert not index.set("A", 0, SMTP, _deferred(30.0))
    index.set("B", 0, SMTP, _deferred(10.0))
    assert index.next_due_time() == 10.0
    clock.advance(9.9)
    assert wakes == [] and index.due(clock.seconds()) == []
    clock.advance(0.1)
    assert wakes == [10.0]
    assert index.due(clock.seconds()) == [("B", 0)]
    assert index.next_due_time() == 30.0
    clock.advance(20)
    assert wakes == [10.0, 30.0]
    assert index.due(clock.seconds()) == [("A", 0), ("B", 0)]
    assert index.next_due_time() is None and not clock.getDelayedCalls()


def test_due_answers_for_a_time_ahead_without_waiting_for_the_timer() -> None:
    """due(now) counts deferrals that end by ``now`` even before the timer has run."""
    index, _, wakes = _index()
    index.set("A", 0, SMTP, _deferred(10.0))
    index.set("B", 0, SMTP, _deferred(20.0))
    assert index.due(15.0) == [("A", 0)]
    assert index.due_by_destination(25.0) == {SMTP: [("A", 0), ("B", 0)]}
    assert wakes == []


def test_a_changed_deferral_moves_the_timer() -> None:
    """Rescheduling or removing the earliest deferral re-points the single timer."""
    index, clock, wakes = _index()
    index.set("A", 0, SMTP, _deferred(10.0))
    index.set("A", 0, SMTP, _deferred(50.0))
    assert index.next_due_time() == 50.0
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert wakes == []
    index.discard_message("A", 1)
    assert index.next_due_time() is None and not clock.getDelayedCalls()


def test_a_deferral_already_past_is_due_at_once() -> None:
    """A deferred status whose time has passed is filed as due and reported as such."""
    index, clock, _ = _index()
    clock.advance(100)
    assert index.set("A", 0, SMTP, _deferred(50.0))
    assert index.due(clock.seconds()) == [("A", 0)]


def test_stale_heap_entries_do_not_pile_up() -> None:
    """Rescheduling one recipient many times keeps the heap bounded."""
    index, _, _ = _index()
    for i in range(1000):
        index.set("A", 0, SMTP, _deferred(1000.0 - i))
        index.next_due_time()
    assert len(index._heap) < 200
    assert index.next_due_time() == 1.0


def test_stop_cancels_the_timer() -> None:
    """Closing the queue leaves no timer behind."""
    index, clock, _ = _index()
    index.set("A", 0, SMTP, _deferred(10.0))
    index.stop()
    assert not clock.getDelayedCalls()


def test_a_stopped_index_never_sets_a_timer_again() -> None:
    """Changes applied while the queue closes do not leave a timer behind."""
    index, clock, _ = _index()
    index.stop()
    index.set("A", 0, SMTP, _deferred(10.0))
    assert not clock.getDelayedCalls()

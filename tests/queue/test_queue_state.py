"""The replayed log in memory, and above all what must be copied before a segment goes."""

from __future__ import annotations

from relay.envelope import RecipientState, RecipientStatus
from relay.queue.state import MessageEntry, SpoolState, initial_statuses

from support.queue_helpers import make_envelope

DELIVERED = RecipientStatus(RecipientState.DELIVERED, 1)
DEFERRED = RecipientStatus(RecipientState.DEFERRED, 1, 50.0)


def _entry(qid: str, segment: int, recipients: int = 2) -> MessageEntry:
    envelope = make_envelope(recipients)
    return MessageEntry(qid, envelope, 10, segment, 0, 0, 0, initial_statuses(envelope), segment)


def test_a_segment_with_a_live_message_is_not_reclaimable() -> None:
    """Only segments without live MESSAGE records are offered for deletion."""
    state = SpoolState()
    state.add_message(_entry("00000000000001", 1))
    state.add_segment(2)
    assert state.reclaimable(active=3) == [2]


def test_the_newest_status_of_an_older_live_message_must_be_copied_forward() -> None:
    """A segment holding the latest STATUS of a message in an older segment lists it."""
    state = SpoolState()
    state.add_message(_entry("00000000000001", 1))
    state.set_statuses("00000000000001", (DELIVERED, DEFERRED), 2)
    plan = state.checkpoint_plan(2)
    assert plan.statuses == ("00000000000001",)
    assert not state.is_reclaim_ready(2)
    state.set_statuses("00000000000001", (DELIVERED, DEFERRED), 3)  # the copy
    assert state.is_reclaim_ready(2)
    assert state.checkpoint_plan(2).statuses == ()


def test_a_superseded_status_needs_no_copy() -> None:
    """Once a later segment holds a newer status, the older one does not matter."""
    state = SpoolState()
    state.add_message(_entry("00000000000001", 1))
    state.set_statuses("00000000000001", (DELIVERED, DEFERRED), 2)
    state.set_statuses("00000000000001", (DELIVERED, DELIVERED), 3)
    assert state.is_reclaim_ready(2)


def test_a_tombstone_for_a_message_in_a_surviving_segment_must_be_copied() -> None:
    """Deleting a DONE record whose message record survives would resurrect the message."""
    state = SpoolState()
    state.add_message(_entry("00000000000001", 1))
    state.add_message(_entry("00000000000002", 1))  # keeps segment 1 alive
    state.remove("00000000000001", 2)
    plan = state.checkpoint_plan(2)
    assert plan.tombstones == (("00000000000001", 1),)
    state.move_tombstone("00000000000001", 2, 3)
    assert state.is_reclaim_ready(2)
    assert state.segments[3].tombstones == {"00000000000001": 1}


def test_a_tombstone_is_dropped_once_its_message_segment_is_gone() -> None:
    """When the message's own segment is deleted, its tombstone no longer matters."""
    state = SpoolState()
    state.add_message(_entry("00000000000001", 1))
    state.remove("00000000000001", 2)
    state.drop_segment(1)
    assert state.checkpoint_plan(2).tombstones == ()
    assert state.is_reclaim_ready(2)


def test_a_duplicate_message_record_is_refused() -> None:
    """A second MESSAGE record with a live id changes nothing."""
    state = SpoolState()
    assert state.add_message(_entry("00000000000001", 1))
    assert not state.add_message(_entry("00000000000001", 2))
    assert state.messages["00000000000001"].segment == 1

"""The ``clock`` fixture of tests/conftest.py fails a test that leaves timers pending."""

from __future__ import annotations

from twisted.internet.task import Clock

from support.clocks import pending_timers


def test_a_timer_left_behind_is_reported() -> None:
    """A call still scheduled is named with its time; once it ran nothing is left."""
    clock = Clock()
    clock.callLater(30, print, "never")
    assert pending_timers(clock) == [f"{print!r} at 30"]
    clock.advance(30)
    assert pending_timers(clock) == []


def test_a_cancelled_timer_is_not_left_behind() -> None:
    """Cancelling a call is cleaning up: nothing is reported."""
    clock = Clock()
    clock.callLater(5, print, "cancelled").cancel()
    assert pending_timers(clock) == []


def test_the_fixture_hands_out_a_fresh_clock(clock: Clock) -> None:
    """The fixture's Clock starts at zero with nothing scheduled."""
    assert clock.seconds() == 0 and pending_timers(clock) == []

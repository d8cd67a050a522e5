"""The check behind the ``clock`` fixture: a test leaves no timer pending on its Clock.

A timer still pending when a test ends is work the code under test scheduled and the
test never saw happen (a retry, a timeout, a flush): either the test stopped too early
to pin that behaviour, or the code forgot to cancel something when it was done.
"""

from __future__ import annotations

from twisted.internet.task import Clock

__all__ = ["pending_timers"]


def pending_timers(clock: Clock) -> list[str]:
    """What is still scheduled on ``clock`` (empty when the test cleaned up after itself)."""
    return [
        f"{call.func!r} at {call.getTime():g}" for call in clock.getDelayedCalls() if call.active()
    ]

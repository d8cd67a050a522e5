"""Forgetting the link's remembered ids: when, and with which time, on a task.Clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from relay.channels.phone.forgetting import IdForgetting, remember_for


def test_ids_are_forgotten_at_start_and_every_interval_after_twice_give_up_after(
    clock: Clock,
) -> None:
    """The service asks the store to forget what is older than twice give_up_after, at
    start and then every interval, carries on after a failed pass, and stops with the
    service."""
    clock.advance(1_000_000.0)
    asked: list[float] = []

    def forget(before: float) -> Deferred[int]:
        asked.append(before)
        return fail(OSError("disk")) if len(asked) == 2 else succeed(1)

    keep = remember_for(5 * 86400.0)
    assert keep == 10 * 86400.0
    service = IdForgetting(forget, keep, clock, interval=3600.0)
    service.startService()
    assert asked == [1_000_000.0 - keep]
    clock.advance(3600.0)
    clock.advance(3600.0)
    assert asked == [1_000_000.0 - keep + n * 3600.0 for n in range(3)]
    service.stopService()
    clock.advance(7200.0)
    assert len(asked) == 3

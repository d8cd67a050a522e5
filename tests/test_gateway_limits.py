"""Limits shared by all SMTP sessions: the text budget and the failed-AUTH throttle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from relay.gateway.limits import AuthThrottle, TextBudget


def test_budget_reserves_up_to_its_limit_and_no_further() -> None:
    """reserve() takes bytes while they fit, refuses (taking nothing) once they would not."""
    budget = TextBudget(100)
    assert budget.reserve(60)
    assert not budget.reserve(41)
    assert budget.used == 60
    assert budget.reserve(40)
    assert not budget.reserve(1)
    budget.release(100)
    assert budget.used == 0


def test_budget_refuses_to_release_more_than_it_holds() -> None:
    """Giving back bytes never taken is a bug, reported at once."""
    budget = TextBudget(100)
    budget.reserve(10)
    with pytest.raises(ValueError):
        budget.release(11)
    with pytest.raises(ValueError):
        TextBudget(0)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=60))
def test_budget_never_goes_over_or_below(operations: list[tuple[bool, int]]) -> None:
    """Whatever the mix of reservations and releases, 0 <= used <= limit."""
    budget = TextBudget(200)
    held: list[int] = []
    for reserve, size in operations:
        if reserve:
            if budget.reserve(size):
                held.append(size)
        elif held:
            budget.release(held.pop())
        assert 0 <= budget.used <= budget.limit
        assert budget.used == sum(held)


def test_throttle_blocks_after_max_failures_within_the_window() -> None:
    """max_failures within the window block the address; other addresses are not affected."""
    clock = Clock()
    throttle = AuthThrottle(clock, max_failures=3, window=60)
    for _ in range(2):
        throttle.failed("192.0.2.1")
        clock.advance(10)
    assert not throttle.blocked("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.blocked("192.0.2.1")
    assert throttle.failures("192.0.2.1") == 3
    assert not throttle.blocked("192.0.2.2")


def test_throttle_forgets_each_failure_after_the_window() -> None:
    """A failure stops counting window seconds after it happened (a sliding window)."""
    clock = Clock()
    throttle = AuthThrottle(clock, max_failures=2, window=60)
    throttle.failed("c")  # t=0
    clock.advance(30)
    throttle.failed("c")  # t=30
    assert throttle.blocked("c")
    clock.advance(30)  # t=60: the first is forgotten
    assert not throttle.blocked("c")
    assert throttle.failures("c") == 1
    clock.advance(30)
    assert throttle.failures("c") == 0


def test_throttle_keeps_a_bounded_number_of_addresses() -> None:
    """Past max_clients addresses, the ones that failed longest ago are forgotten first."""
    clock = Clock()
    throttle = AuthThrottle(clock, max_failures=1, window=600, max_clients=3)
    for n in range(3):
        throttle.failed(f"10.0.0.{n}")
        clock.advance(1)
    throttle.failed("10.0.0.0")  # fails again: now the most recent
    throttle.failed("10.0.0.3")  # one too many: 10.0.0.1 failed longest ago
    assert [throttle.blocked(f"10.0.0.{n}") for n in range(4)] == [True, False, True, True]

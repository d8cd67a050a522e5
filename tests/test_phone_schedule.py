"""When phone sites are called: the pure policy and the scheduler service on task.Clock."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relay.channels.phone import calls as calls_module
from relay.channels.phone.calllog import CallLog, CallRecord
from relay.channels.phone.calls import PhoneCalls
from relay.channels.phone.scheduler import CallScheduler
from relay.channels.phone.store import SpoolPhoneStore
from relay.config import PhoneSite, SerialTransport
from relay.policy.call_schedule import (
    DAY,
    CallPolicy,
    SiteState,
    in_window,
    next_call,
    next_window_start,
)
from relay.transport import TransportError

MIDNIGHT = 20000 * DAY  # a day's start, in epoch seconds (UTC)


def _record(site: str, result: str = "completed", direction: str = "out") -> CallRecord:
    return CallRecord(site, direction, 0.0, 1.0, result, "")


# --- the policy ------------------------------------------------------------------------------


def test_no_reason_no_call() -> None:
    """Without mail waiting and without a poll, no call is planned."""
    assert next_call(CallPolicy(), SiteState(MIDNIGHT), MIDNIGHT) is None


def test_mail_waiting_is_called_after_the_gathering_delay() -> None:
    """Mail waiting since T is called for at T + gather_delay, not before."""
    policy = CallPolicy(gather_delay=30)
    state = SiteState(MIDNIGHT, mail_since=MIDNIGHT + 5)
    assert next_call(policy, state, MIDNIGHT + 6) == MIDNIGHT + 35
    assert next_call(policy, state, MIDNIGHT + 100) == MIDNIGHT + 100  # overdue: now


def test_poll_interval_counts_from_the_last_call() -> None:
    """A poll interval calls at start, then that long after each call."""
    policy = CallPolicy(poll=3600)
    assert next_call(policy, SiteState(MIDNIGHT), MIDNIGHT) == MIDNIGHT
    state = SiteState(MIDNIGHT, last_call=MIDNIGHT + 10)
    assert next_call(policy, state, MIDNIGHT + 20) == MIDNIGHT + 3610


def test_poll_times_of_day() -> None:
    """Poll times call at the next listed time of day after the last call, wrapping."""
    policy = CallPolicy(poll_times=(2 * 3600, 14 * 3600))
    state = SiteState(MIDNIGHT, last_call=MIDNIGHT + 3 * 3600)
    assert next_call(policy, state, MIDNIGHT + 3 * 3600) == MIDNIGHT + 14 * 3600
    late = SiteState(MIDNIGHT, last_call=MIDNIGHT + 15 * 3600)
    assert next_call(policy, late, MIDNIGHT + 15 * 3600) == MIDNIGHT + DAY + 2 * 3600


def test_window_defers_a_call_to_its_opening() -> None:
    """Outside the call window a wanted call waits for the window to open."""
    policy = CallPolicy(call_window=(22 * 3600, 6 * 3600), gather_delay=0)
    state = SiteState(MIDNIGHT, mail_since=MIDNIGHT + 12 * 3600)
    assert next_call(policy, state, MIDNIGHT + 12 * 3600) == MIDNIGHT + 22 * 3600
    early = SiteState(MIDNIGHT, mail_since=MIDNIGHT + 3600)
    assert next_call(policy, early, MIDNIGHT + 3600) == MIDNIGHT + 3600  # inside (wraps)


def test_window_edges() -> None:
    """A window includes its start and excludes its end, also past midnight."""
    window = (22 * 3600, 6 * 3600)
    assert in_window(window, MIDNIGHT + 22 * 3600)
    assert not in_window(window, MIDNIGHT + 6 * 3600)
    assert in_window((3600, 7200), MIDNIGHT + 3600) and not in_window((3600, 7200), MIDNIGHT + 7200)
    assert next_window_start((3600, 7200), MIDNIGHT + 7200) == MIDNIGHT + DAY + 3600
    assert in_window(None, 12345.0)


def test_failures_back_off_exponentially_and_mark_the_site_down() -> None:
    """After failed calls the next call waits retry_min doubling up to retry_max."""
    policy = CallPolicy(gather_delay=0, retry_min=60, retry_max=600)
    delays = []
    for failures in range(1, 7):
        state = SiteState(MIDNIGHT, last_call=MIDNIGHT, failures=failures, mail_since=MIDNIGHT)
        assert state.down_until(policy) is not None
        when = next_call(policy, state, MIDNIGHT)
        assert when is not None
        delays.append(when - MIDNIGHT)
    assert delays == [60, 120, 240, 480, 600, 600]
    assert SiteState(MIDNIGHT, last_call=MIDNIGHT).down_until(policy) is None


# --- the service -------------------------------------------------------------------------------


class _Calls:
    """Records calls; each returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.placed: list[tuple[float, str]] = []
        self.pending: list[Deferred[CallRecord]] = []

    def __call__(self, clock: Clock, site: str) -> Deferred[CallRecord]:
        self.placed.append((clock.seconds(), site))
        d: Deferred[CallRecord] = Deferred()
        self.pending.append(d)
        return d


def _scheduler(
    policies: dict[str, CallPolicy], start: float = MIDNIGHT
) -> tuple[CallScheduler, Clock, _Calls]:
    clock = Clock()
    clock.advance(start)
    calls = _Calls()
    scheduler = CallScheduler(policies, lambda site: calls(clock, site), clock)
    scheduler.startService()
    return scheduler, clock, calls


def test_mail_gathers_then_one_call() -> None:
    """Several messages within the gathering delay make one call, at the delay's end."""
    scheduler, clock, calls = _scheduler({"b": CallPolicy(gather_delay=30)})
    scheduler.mail_waiting("b")
    clock.advance(10)
    scheduler.mail_waiting("b")
    clock.advance(19)
    assert calls.placed == []
    clock.advance(1)
    assert calls.placed == [(MIDNIGHT + 30, "b")]
    calls.pending[0].callback(_record("b"))
    clock.advance(3600)
    assert len(calls.placed) == 1  # the mail went: nothing more to call for


def test_failed_call_retries_with_backoff_and_success_resets() -> None:
    """A failed call is retried after retry_min, then twice that; a good call ends it."""
    scheduler, clock, calls = _scheduler(
        {"b": CallPolicy(gather_delay=0, retry_min=60, retry_max=600)}
    )
    scheduler.mail_waiting("b")
    clock.advance(0)
    calls.pending[-1].callback(_record("b", "no-connection"))
    assert scheduler.is_down("b")
    clock.advance(59)
    assert len(calls.placed) == 1
    clock.advance(1)
    assert len(calls.placed) == 2
    calls.pending[-1].callback(_record("b", "line-dropped"))
    clock.advance(119)
    assert len(calls.placed) == 2
    clock.advance(1)
    assert len(calls.placed) == 3
    calls.pending[-1].callback(_record("b"))
    assert not scheduler.is_down("b") and scheduler.next_call_time("b") is None


def test_a_site_calling_in_clears_its_waiting_mail() -> None:
    """A completed call the site made to us takes the mail: our planned call is dropped."""
    scheduler, clock, calls = _scheduler({"b": CallPolicy(gather_delay=300)})
    scheduler.mail_waiting("b")
    scheduler.call_ended(_record("b", direction="in"))
    clock.advance(3600)
    assert calls.placed == []


def test_window_holds_calls_until_it_opens() -> None:
    """Mail outside the call window is called for when the window opens."""
    scheduler, clock, calls = _scheduler(
        {"b": CallPolicy(gather_delay=0, call_window=(22 * 3600, 23 * 3600))}
    )
    scheduler.mail_waiting("b")
    clock.advance(22 * 3600 - 1)
    assert calls.placed == []
    clock.advance(1)
    assert calls.placed == [(MIDNIGHT + 22 * 3600, "b")]


def test_poll_calls_again_after_each_call() -> None:
    """A polled site is called at start and every poll interval after each call."""
    _, clock, calls = _scheduler({"b": CallPolicy(poll=600)})
    clock.advance(0)
    assert len(calls.placed) == 1
    calls.pending[-1].callback(_record("b"))
    clock.advance(599)
    assert len(calls.placed) == 1
    clock.advance(1)
    assert len(calls.placed) == 2


def test_no_second_call_while_one_runs_and_stop_cancels() -> None:
    """While a call runs no other starts for the site; stopping cancels the timers."""
    scheduler, clock, calls = _scheduler({"b": CallPolicy(poll=60, gather_delay=0)})
    clock.advance(0)
    scheduler.mail_waiting("b")
    clock.advance(3600)
    assert len(calls.placed) == 1
    calls.pending[-1].callback(_record("b"))
    scheduler.stopService()
    clock.advance(3600)
    assert len(calls.placed) == 1


def test_unknown_site_is_ignored() -> None:
    """Mail for a site this relay does not call (it calls in) plans nothing."""
    scheduler, clock, calls = _scheduler({})
    scheduler.mail_waiting("calls-in")
    scheduler.call_ended(_record("calls-in"))
    clock.advance(3600)
    assert calls.placed == []


# --- one call per serial port ------------------------------------------------------------------


class _Lines:
    """Stands in for :func:`relay.transport.place_call`: records each line opened and
    leaves it to the test to end the attempt."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, Deferred[object]]] = []

    def __call__(self, endpoint: object, plan: object, protocol: object, clock: object) -> object:
        d: Deferred[object] = Deferred()
        self.opened.append((endpoint.settings.device, d))
        return d


def test_sites_on_one_serial_port_are_called_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sites reached through the same serial device, both due at once, are called one
    at a time (the second when the first call has let go of the port), while a site on
    another device is called at once."""
    clock = Clock()
    clock.advance(MIDNIGHT)
    lines = _Lines()
    monkeypatch.setattr(calls_module, "place_call", lines)
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    sites = {
        name: PhoneSite(name, secret, SerialTransport(device))
        for name, device in (("a", "/dev/ttyS0"), ("b", "/dev/ttyS0"), ("c", "/dev/ttyS1"))
    }
    log = cast(CallLog, SimpleNamespace(append=lambda record: succeed(None)))
    call_store = SimpleNamespace(release=lambda site: 0)
    store = cast(SpoolPhoneStore, SimpleNamespace(for_call=lambda: call_store))
    phone_calls = PhoneCalls("hub", sites, {n: b"s" for n in sites}, store, log, clock)
    scheduler = CallScheduler(
        {name: CallPolicy(gather_delay=30) for name in sites}, phone_calls.call, clock
    )
    scheduler.startService()
    for name in sites:
        scheduler.mail_waiting(name)
    clock.advance(30)
    assert sorted(device for device, _ in lines.opened) == ["/dev/ttyS0", "/dev/ttyS1"]
    assert sorted(phone_calls.active) == ["a", "b", "c"]
    first = next(d for device, d in lines.opened if device == "/dev/ttyS0")
    first.errback(TransportError("the line is gone"))
    clock.advance(0)
    assert len(lines.opened) == 3 and lines.opened[2][0] == "/dev/ttyS0"
    assert sorted(phone_calls.active) == ["b", "c"]
    assert phone_calls.last["a"].result == "no-connection"
    assert scheduler.is_down("a") and not scheduler.is_down("b")
    scheduler.stopService()

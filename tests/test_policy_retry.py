"""Tests for relay.policy.retry: backoff, jitter, lifetime, warnings, dispositions, dead hosts."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.envelope import Destination
from relay.policy.retry import (
    EXPIRED_STATUS,
    JITTER,
    DeadHosts,
    Disposition,
    backoff_delay,
    decide,
    disposition,
    expired_reply,
    is_expired,
    jittered,
    next_attempt,
    should_warn,
)
from relay.reply import Action, Reply, ReplyCode

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class Settings:
    retry_min: float = 5 * MINUTE
    retry_max: float = 70 * MINUTE


SETTINGS = Settings()
SMTP_MX = Destination("smtp", "mx.example.test")
PHONE = Destination("phone", "site-b")


def test_backoff_sequence_doubles_then_caps() -> None:
    """With 5m/70m the nominal delays are 5m, 10m, 20m, 40m, then 70m for ever."""
    delays = [backoff_delay(n, 5 * MINUTE, 70 * MINUTE) for n in range(1, 8)]
    assert delays == [m * MINUTE for m in (5, 10, 20, 40, 70, 70, 70)]


def test_backoff_treats_zero_attempts_as_first() -> None:
    """A count below one (no attempt recorded yet) waits the first delay, not less."""
    assert backoff_delay(0, 5 * MINUTE, 70 * MINUTE) == 5 * MINUTE
    assert backoff_delay(-3, 5 * MINUTE, 70 * MINUTE) == 5 * MINUTE


def test_backoff_survives_huge_attempt_counts() -> None:
    """An absurd attempt count still gives the cap, without overflowing."""
    assert backoff_delay(10**9, 5 * MINUTE, 70 * MINUTE) == 70 * MINUTE


def test_next_attempt_sequence_within_jitter() -> None:
    """Each scheduled retry lies within ±10 % of the nominal delay after ``now``."""
    rng = random.Random(4)
    reply = Reply(ReplyCode.AGN)
    for attempts, minutes in enumerate((5, 10, 20, 40, 70, 70), start=1):
        when = next_attempt(1000.0, attempts, reply, SETTINGS, rng)
        nominal = minutes * MINUTE
        assert nominal * (1 - JITTER) <= when - 1000.0 <= nominal * (1 + JITTER)


def test_next_attempt_is_reproducible_with_a_seed() -> None:
    """The same seed gives the same schedule, so tests and replays are deterministic."""
    a = [next_attempt(0.0, n, None, SETTINGS, random.Random(7)) for n in range(1, 6)]
    b = [next_attempt(0.0, n, None, SETTINGS, random.Random(7)) for n in range(1, 6)]
    assert a == b


def test_jitter_actually_spreads_retries() -> None:
    """Jitter moves delays apart, so one outage's deferrals do not return together."""
    rng = random.Random(1)
    values = {jittered(600.0, rng) for _ in range(50)}
    assert len(values) > 40
    assert min(values) < 600.0 < max(values)


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_jitter_bounds_hold_for_any_seed(attempts: int, seed: int) -> None:
    """Whatever the seed and count, a retry is between 90 % of retry_min and 110 % of retry_max."""
    when = next_attempt(0.0, attempts, None, SETTINGS, random.Random(seed))
    assert SETTINGS.retry_min * (1 - JITTER) <= when <= SETTINGS.retry_max * (1 + JITTER)


@pytest.mark.parametrize("code", [ReplyCode.MOK, ReplyCode.USER, ReplyCode.AOK])
def test_next_attempt_refuses_non_temporary_replies(code: ReplyCode) -> None:
    """Scheduling a retry for a delivered or bounced recipient is a caller's defect."""
    with pytest.raises(ValueError, match="not temporary"):
        next_attempt(0.0, 1, Reply(code), SETTINGS, random.Random(0))


def test_is_expired_at_the_lifetime() -> None:
    """A message expires once it has been queued for give_up_after, not a second before."""
    assert not is_expired(1000.0, 1000.0 + 5 * DAY - 1, 5 * DAY)
    assert is_expired(1000.0, 1000.0 + 5 * DAY, 5 * DAY)


def test_should_warn_once_after_warn_after() -> None:
    """The delay warning is due after warn_after, and only if not sent before."""
    assert not should_warn(0.0, 4 * HOUR - 1, 4 * HOUR, already_warned=False)
    assert should_warn(0.0, 4 * HOUR, 4 * HOUR, already_warned=False)
    assert not should_warn(0.0, 4 * HOUR, 4 * HOUR, already_warned=True)
    assert not should_warn(0.0, 3 * DAY, 4 * HOUR, already_warned=True)


def test_should_warn_zero_means_never() -> None:
    """A warn_after of zero turns delay warnings off."""
    assert not should_warn(0.0, 10 * DAY, 0.0, already_warned=False)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ReplyCode.MOK, Disposition.DELIVERED),
        (ReplyCode.OK, Disposition.DELIVERED),
        (ReplyCode.AGN, Disposition.DEFER),
        (ReplyCode.LOCK, Disposition.DEFER),
        (ReplyCode.FSPC, Disposition.DEFER),
        (ReplyCode.TIME, Disposition.DEFER_HOST_DEAD),
        (ReplyCode.DHST, Disposition.DEFER_HOST_DEAD),
        (ReplyCode.NS, Disposition.DEFER_HOST_DEAD),
        (ReplyCode.PROT, Disposition.DEFER_HOST_DEAD),
        (ReplyCode.USER, Disposition.BOUNCE),
        (ReplyCode.QUOT, Disposition.BOUNCE),
        (ReplyCode.FSIZ, Disposition.BOUNCE),
        (ReplyCode.NDEL, Disposition.BOUNCE),
    ],
)
def test_disposition_follows_the_reply_table(code: ReplyCode, expected: Disposition) -> None:
    """Within the lifetime a reply's disposition is exactly what its action says."""
    assert disposition(Reply(code), arrival=0.0, now=60.0, give_up_after=DAY) is expected


@pytest.mark.parametrize("code", list(ReplyCode))
def test_every_final_reply_has_a_disposition(code: ReplyCode) -> None:
    """Every reply but AOK maps to a disposition; AOK is refused as not final."""
    if code.action is Action.TEXT_FOLLOWS:
        with pytest.raises(ValueError, match="not a final reply"):
            decide(Reply(code), arrival=0.0, now=0.0, give_up_after=DAY)
    else:
        assert decide(Reply(code), arrival=0.0, now=0.0, give_up_after=DAY).reply == Reply(code)


def test_temporary_failure_past_lifetime_bounces_as_expired() -> None:
    """A temporary failure after give_up_after bounces with 4.4.7 and quotes the last reply."""
    last = Reply(ReplyCode.DHST, "connection refused", 421, "4.4.1")
    decision = decide(last, arrival=0.0, now=5 * DAY, give_up_after=5 * DAY)
    assert decision.disposition is Disposition.BOUNCE
    assert decision.expired
    assert decision.reply.effective_enhanced == EXPIRED_STATUS
    assert decision.reply.description.startswith("delivery time expired")
    assert "421 4.4.1 connection refused" in decision.reply.description


def test_permanent_failure_past_lifetime_keeps_its_reply() -> None:
    """A permanent failure is reported as itself, even after the lifetime."""
    last = Reply(ReplyCode.USER)
    decision = decide(last, arrival=0.0, now=9 * DAY, give_up_after=5 * DAY)
    assert decision.disposition is Disposition.BOUNCE
    assert not decision.expired
    assert decision.reply == last


def test_success_past_lifetime_is_delivered() -> None:
    """A delivery that succeeds late is still a delivery."""
    late = decide(Reply(ReplyCode.MOK), arrival=0.0, now=9 * DAY, give_up_after=5 * DAY)
    assert late.disposition is Disposition.DELIVERED


def test_expired_reply_without_a_last_reply() -> None:
    """A recipient that never got a reply expires with a plain 4.4.7 timeout reply."""
    reply = expired_reply(None)
    assert reply.code is ReplyCode.TIME
    assert reply.smtp_line() == "451 4.4.7 delivery time expired"


def test_expired_reply_is_idempotent() -> None:
    """Expiring an already expired reply does not nest the quotation."""
    once = expired_reply(Reply(ReplyCode.AGN, "greylisted"))
    assert expired_reply(once) == once


def test_dead_hosts_mark_and_expire() -> None:
    """A host-dead reply rests its destination for the delay, then it is alive again."""
    dead = DeadHosts(600.0)
    assert dead.note(SMTP_MX, Reply(ReplyCode.DHST), now=1000.0)
    assert dead.is_dead(SMTP_MX, 1000.0)
    assert dead.is_dead(SMTP_MX, 1599.0)
    assert not dead.is_dead(SMTP_MX, 1600.0)
    assert dead.dead_until(SMTP_MX) == 1600.0
    assert not dead.is_dead(PHONE, 1000.0)


@pytest.mark.parametrize("code", [ReplyCode.AGN, ReplyCode.LOCK, ReplyCode.USER, ReplyCode.MOK])
def test_dead_hosts_ignore_other_replies(code: ReplyCode) -> None:
    """Only connection-level failures mark a destination dead; per-address ones do not."""
    dead = DeadHosts(600.0)
    assert not dead.note(SMTP_MX, Reply(code), now=0.0)
    assert not dead.is_dead(SMTP_MX, 0.0)
    assert dead.dead_until(SMTP_MX) is None


def test_dead_hosts_never_shorten_a_rest() -> None:
    """Marking a resting destination again extends its rest but never shortens it."""
    dead = DeadHosts(600.0)
    dead.mark_dead(SMTP_MX, 0.0, delay=3600.0)
    assert dead.mark_dead(SMTP_MX, 100.0) == 3600.0
    assert dead.mark_dead(SMTP_MX, 3500.0) == 4100.0


def test_dead_hosts_revive() -> None:
    """Reviving a destination (a delivery worked, or a flush) ends its rest at once."""
    dead = DeadHosts(600.0)
    dead.mark_dead(PHONE, 0.0)
    dead.revive(PHONE)
    dead.revive(SMTP_MX)
    assert not dead.is_dead(PHONE, 1.0)
    assert dead.dead_until(PHONE) is None


def test_dead_hosts_expire_forgets_finished_rests() -> None:
    """expire() drops the destinations whose rest is over and keeps the others."""
    dead = DeadHosts(600.0)
    dead.mark_dead(PHONE, 0.0)
    dead.mark_dead(SMTP_MX, 500.0)
    dead.expire(700.0)
    assert len(dead) == 1
    assert dead.dead_until(PHONE) is None
    assert dead.dead_until(SMTP_MX) == 1100.0


def test_dead_hosts_refuse_negative_delay() -> None:
    """A negative rest is a configuration defect, refused at once."""
    with pytest.raises(ValueError, match="negative"):
        DeadHosts(-1.0)

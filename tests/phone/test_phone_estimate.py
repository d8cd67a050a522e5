"""The link's estimators alone: round trip and timeout, damage and frame size, rate."""

from __future__ import annotations

import pytest

from relay.sansio.phone.estimate import (
    INITIAL_RTO,
    MIN_PROBE,
    MIN_RTO,
    DamageEstimate,
    DeliveryRate,
    RoundTrip,
    best_frame_data,
)
from relay.sansio.phone.frame import FRAME_OVERHEAD


def test_round_trip_follows_rfc_6298() -> None:
    """First sample: srtt = r, rttvar = r/2; then the 1/8 and 1/4 gains; RTO >= 1 s."""
    rtt = RoundTrip()
    assert rtt.rto == INITIAL_RTO and rtt.srtt is None and rtt.probe_delay() is None
    rtt.sample(2.0, 60.0, clean=True)
    assert (rtt.srtt, rtt.rttvar, rtt.rto) == (2.0, 1.0, 6.0)
    rtt.sample(1.0, 60.0, clean=False)
    assert rtt.rttvar == pytest.approx(0.75 * 1.0 + 0.25 * 1.0)
    assert rtt.srtt == pytest.approx(0.875 * 2.0 + 0.125 * 1.0)
    assert rtt.rto == pytest.approx(rtt.srtt + 4 * rtt.rttvar)
    for _ in range(50):
        rtt.sample(0.05, 60.0, clean=True)
    assert rtt.rto == MIN_RTO
    assert rtt.probe_delay() == pytest.approx(max(2 * rtt.srtt, MIN_PROBE))


def test_timeout_doubles_up_to_its_ceiling() -> None:
    """Each expiry doubles the timeout, never past the ceiling given."""
    rtt = RoundTrip()
    rtt.back_off(10.0)
    rtt.back_off(10.0)
    assert rtt.rto == 10.0


def test_min_rtt_comes_only_from_clean_samples() -> None:
    """A round trip that may include queueing never becomes the line's own round trip."""
    rtt = RoundTrip()
    rtt.sample(0.1, 60.0, clean=False)
    assert rtt.min_rtt is None
    rtt.sample(0.4, 60.0, clean=True)
    rtt.sample(0.3, 60.0, clean=True)
    rtt.sample(0.2, 60.0, clean=False)
    assert rtt.min_rtt == 0.3


@pytest.mark.parametrize(
    ("loss_per_byte", "low", "high"),
    [(0.0, 4096, 4096), (8e-6, 1000, 1500), (8e-5, 300, 500), (8e-4, 100, 160)],
)
def test_best_frame_data_by_damage_rate(loss_per_byte: float, low: int, high: int) -> None:
    """Largest on a clean line; a few hundred bytes at a bit error rate of 1e-5."""
    assert low <= best_frame_data(loss_per_byte, 64, 4096) <= high


def test_best_frame_data_is_the_optimum() -> None:
    """No other size moves more data per line byte at that damage rate."""
    q = 8e-5
    best = best_frame_data(q, 16, 16384)

    def goodput(size: int) -> float:
        return size / (size + FRAME_OVERHEAD) * (1 - q) ** (size + FRAME_OVERHEAD)

    assert all(goodput(best) >= goodput(size) - 1e-9 for size in range(16, 4096, 7))


def test_damage_estimate_shrinks_on_losses_and_grows_when_clean() -> None:
    """Losses per byte sent pick the frame size; clean bytes sent bring it back up."""
    damage = DamageEstimate()
    start = damage.frame_data(64, 4096)
    assert 64 < start < 4096  # an assumed loss until the line shows itself
    for _ in range(100):
        damage.sent(2000)
    assert damage.frame_data(64, 4096) == 4096
    for _ in range(20):
        damage.sent(400)
        damage.lost()
    assert damage.frame_data(64, 4096) < 200
    for _ in range(400):
        damage.sent(4000)
    assert damage.frame_data(64, 4096) == 4096


def measured() -> tuple[RoundTrip, DeliveryRate]:
    """A round trip with one clean 100 ms sample, and a fresh delivery rate."""
    rtt = RoundTrip()
    rtt.sample(0.1, 60.0, clean=True)
    return rtt, DeliveryRate(0.0)


def flight(
    rtt: RoundTrip, rate: DeliveryRate, sent_at: float, acked_at: float, count: int, **kw: bool
) -> None:
    """One frame sent on an idle line at ``sent_at``, ``count`` bytes acked at ``acked_at``."""
    state = rate.on_send(sent_at, line_idle=True)
    rate.on_delivered(count, acked_at)
    rate.sample(state, sent_at, acked_at, app_limited=kw.get("app_limited", False), round_trip=rtt)


def test_delivery_rate_from_acknowledged_bytes() -> None:
    """Bytes delivered over the time since a frame was sent give the line's rate."""
    rtt, rate = measured()
    flight(rtt, rate, 0.0, 1.0, 11_520)
    assert rate.best == pytest.approx(11_520)


def test_app_limited_samples_do_not_lower_the_rate() -> None:
    """A sender with nothing to send delivers slowly; that is not the line's rate."""
    rtt, rate = measured()
    flight(rtt, rate, 0.0, 1.0, 10_000)
    flight(rtt, rate, 1.0, 3.0, 100, app_limited=True)
    assert rate.best == pytest.approx(10_000)


def test_bytes_arriving_teach_the_rate() -> None:
    """What arrives from the peer per second raises the best rate (never lowers it)."""
    rtt, rate = measured()
    flight(rtt, rate, 0.0, 1.0, 1000)
    rate.on_received(11_000, 1.0)
    assert rate.best == pytest.approx(11_000)
    rate.on_received(11_100, 2.0)
    assert rate.best == pytest.approx(11_000)


def test_start_up_ends_when_the_rate_stops_growing() -> None:
    """Three round trips without a quarter more rate end the start-up phase."""
    rtt, rate = measured()
    now = 0.0
    while rate.starting and now < 10:
        state = rate.on_send(now, line_idle=False)
        now += 0.5
        rate.on_delivered(5000, now)
        rate.sample(state, now - 0.5, now, app_limited=False, round_trip=rtt)
    assert not rate.starting
    assert now < 5

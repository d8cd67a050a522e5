"""The line emulator's pure parts: the per-direction schedule and the bit-error model."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from support.linemodel import BitFlipper, Direction, byte_time

RATE = 10240  # one byte is 1/1024 s: every time below is exact in binary floating point
TICK = byte_time(RATE) / 4


def _hamming(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def _reference_arrivals(bursts: list[tuple[float, bytes]], latency: float) -> list[float]:
    """Arrival time of every byte, simulated one byte at a time."""
    arrivals: list[float] = []
    line_free = -math.inf
    for at, data in bursts:
        for _ in data:
            line_free = max(at, line_free) + byte_time(RATE)
            arrivals.append(line_free + latency)
    return arrivals


@st.composite
def _bursts(draw: st.DrawFn) -> list[tuple[float, bytes]]:
    """Chunks entering the line at non-decreasing times on a grid of quarter byte times."""
    gaps = draw(st.lists(st.integers(0, 60), min_size=1, max_size=12))
    at = 0
    bursts = []
    for gap in gaps:
        at += gap
        bursts.append((at * TICK, draw(st.binary(min_size=1, max_size=20))))
    return bursts


@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    seed=st.integers(0, 2**32),
    ber=st.sampled_from([0.0, 1e-3, 0.05, 0.5]),
)
def test_bit_flips_do_not_depend_on_chunking(
    data: bytes, cuts: list[int], seed: int, ber: float
) -> None:
    """The same seed flips the same bits whether the stream comes whole or in pieces."""
    whole = BitFlipper(ber, seed)
    expected = whole.apply(data)
    pieces = BitFlipper(ber, seed)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    got = b"".join(pieces.apply(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert got == expected
    assert pieces.flipped == whole.flipped == _hamming(data, expected)


@given(data=st.binary(max_size=200), seed=st.integers(0, 2**32))
def test_no_errors_at_ber_zero(data: bytes, seed: int) -> None:
    """A bit-error rate of zero passes every byte unchanged."""
    flipper = BitFlipper(0.0, seed)
    assert flipper.apply(data) == data
    assert flipper.flipped == 0


@pytest.mark.parametrize(("ber", "seed"), [(1e-5, 1), (1e-4, 2), (1e-3, 3)])
def test_flipped_bits_match_the_rate(ber: float, seed: int) -> None:
    """Over many bits the count of flips lies within four standard deviations of n * ber."""
    flipper = BitFlipper(ber, seed)
    size = 1 << 20
    received = flipper.apply(bytes(size))
    bits = size * 8
    expected = bits * ber
    sigma = math.sqrt(bits * ber * (1 - ber))
    assert abs(flipper.flipped - expected) <= 4 * sigma
    assert flipper.flipped == sum(bin(byte).count("1") for byte in received)


def test_bad_parameters_are_refused() -> None:
    """A rate, bit-error rate or latency out of range is an error when the model is made."""
    with pytest.raises(ValueError):
        byte_time(0)
    with pytest.raises(ValueError):
        BitFlipper(1.0, 1)
    with pytest.raises(ValueError):
        BitFlipper(-0.1, 1)
    with pytest.raises(ValueError):
        Direction(RATE, -1.0, BitFlipper(0.0, 1))


@given(
    bursts=_bursts(),
    latency_ticks=st.integers(0, 40),
    polls=st.lists(st.integers(0, 2000), max_size=20),
)
def test_bytes_arrive_when_a_byte_at_a_time_line_says(
    bursts: list[tuple[float, bytes]], latency_ticks: int, polls: list[int]
) -> None:
    """A byte arrives a byte time after the one ahead (or after it entered), plus latency."""
    latency = latency_ticks * TICK
    direction = Direction(RATE, latency, BitFlipper(0.0, 1))
    arrivals = _reference_arrivals(bursts, latency)
    for at, data in bursts:
        direction.accept(data, at)
    sent = b"".join(data for _, data in bursts)
    got = b""
    for now in [*sorted(p * TICK for p in polls), arrivals[-1]]:
        got += direction.take_due(now)
        assert len(got) == sum(1 for t in arrivals if t <= now)
    assert got == sent
    assert direction.next_arrival() is None
    assert direction.in_flight == 0


@given(bursts=_bursts(), polls=st.lists(st.integers(0, 2000), min_size=1, max_size=20))
def test_next_arrival_is_the_next_byte(bursts: list[tuple[float, bytes]], polls: list[int]) -> None:
    """``next_arrival`` names the time the first byte not yet taken reaches the far end."""
    direction = Direction(RATE, 0.0, BitFlipper(0.0, 1))
    arrivals = _reference_arrivals(bursts, 0.0)
    taken = 0
    for at, data in bursts:
        direction.accept(data, at)
    for now in sorted(p * TICK for p in polls):
        taken += len(direction.take_due(now))
        expected = arrivals[taken] if taken < len(arrivals) else None
        assert direction.next_arrival() == expected


@given(bursts=_bursts(), poll=st.integers(0, 2000))
def test_unsent_counts_bytes_still_in_the_transmitter(
    bursts: list[tuple[float, bytes]], poll: int
) -> None:
    """``unsent`` is the number of bytes whose last bit has not left the sender yet."""
    latency = 7 * TICK
    direction = Direction(RATE, latency, BitFlipper(0.0, 1))
    for at, data in bursts:
        direction.accept(data, at)
    now = poll * TICK
    departures = [t - latency for t in _reference_arrivals(bursts, latency)]
    assume(now >= bursts[-1][0])  # only the past is known to the model
    assert direction.unsent(now) == sum(1 for t in departures if t > now)


@given(bursts=_bursts(), limits=st.lists(st.integers(0, 30), min_size=1, max_size=30))
def test_a_limit_delivers_a_prefix(bursts: list[tuple[float, bytes]], limits: list[int]) -> None:
    """With a limit, ``take_due`` hands out at most that many bytes and keeps the rest in order."""
    direction = Direction(RATE, 0.0, BitFlipper(0.0, 1))
    for at, data in bursts:
        direction.accept(data, at)
    end = _reference_arrivals(bursts, 0.0)[-1]
    got = b""
    for limit in limits:
        piece = direction.take_due(end, limit)
        assert len(piece) <= limit
        got += piece
    got += direction.take_due(end)
    assert got == b"".join(data for _, data in bursts)
    assert direction.delivered == len(got)


def test_a_burst_is_paced_from_its_start() -> None:
    """A late poll does not delay later bytes: arrivals are reckoned from the burst start."""
    direction = Direction(RATE, 0.5, BitFlipper(0.0, 1))
    direction.accept(b"x" * 100, 10.0)
    assert direction.take_due(10.5) == b""
    late = 10.5 + 60 * byte_time(RATE) + TICK  # a poll that woke up late
    assert len(direction.take_due(late)) == 60
    assert direction.next_arrival() == 10.5 + 61 * byte_time(RATE)
    assert direction.discard() == 40
    assert direction.next_arrival() is None

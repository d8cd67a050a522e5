"""What the link's sender measures: round trip and timeout, damage rate, delivery rate.

Each estimator is fed measurements and asked for a number; none knows frames or
segments, so each can be reasoned about (and tested) alone.

* :class:`RoundTrip`: the smoothed round trip and retransmission timeout of RFC 6298
  (with the shortest round trip seen, for the flight limit).
* :class:`DamageEstimate`: the chance that a byte sent is hit, from losses per byte
  sent, and the frame size that moves most data at that chance.
* :class:`DeliveryRate`: the best recent rate at which the line carries the stream, from
  delivery-rate samples as BBR takes them (draft-cheng-iccrg-delivery-rate-estimation)
  and from the rate at which bytes arrive from the peer; and whether the sender is still
  starting up (the rate still growing).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from relay.sansio.phone.frame import FRAME_OVERHEAD

__all__ = [
    "INITIAL_RTO",
    "LINE_RATE_INTERVAL",
    "LOSS_HALF_LIFE",
    "LOSS_PRIOR",
    "LOSS_PRIOR_EVENTS",
    "LOSS_PRIOR_HALF_LIFE",
    "MIN_PROBE",
    "MIN_RTO",
    "RATE_MEMORY",
    "DamageEstimate",
    "DeliveryRate",
    "RoundTrip",
    "SendState",
    "best_frame_data",
]

INITIAL_RTO: Final = 3.0
"""Retransmission timeout before any round trip was measured (slow lines: be patient)."""

MIN_RTO: Final = 1.0
"""The smallest retransmission timeout (RFC 6298, 2.4)."""

MIN_PROBE: Final = 0.1
"""The shortest wait before probing for a lost last frame (twice the round trip, usually)."""

LOSS_HALF_LIFE: Final = 32 * 1024
"""Bytes sent after which a loss counts half as much in the damage estimate."""

LOSS_PRIOR: Final = 32 * 1024
"""Bytes sent that the damage estimate starts from, with :data:`LOSS_PRIOR_EVENTS` losses."""

LOSS_PRIOR_EVENTS: Final = 1.0
"""Losses assumed before any was seen: start at a middling frame size, not the largest."""

LOSS_PRIOR_HALF_LIFE: Final = 16 * 1024
"""Bytes sent after which the assumed losses count half: a clean line soon gets big frames."""

LINE_RATE_INTERVAL: Final = 1.0
"""Seconds over which bytes received are counted for a rate sample."""

RATE_MEMORY: Final = 10.0
"""Seconds a delivery-rate sample counts towards the best recent rate."""


class RoundTrip:
    """Round-trip samples in, a retransmission timeout out (RFC 6298, section 2).

    Samples come only from frames sent once (Karn); ``ceiling`` bounds the timeout
    however often it is doubled.
    """

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt: float | None = None
        self.base_rto = INITIAL_RTO  # the timeout the samples give, before any doubling
        self.rto = INITIAL_RTO

    def sample(self, rtt: float, ceiling: float, *, clean: bool) -> None:
        """Take one measured round trip; ``clean`` if the frame went out on an idle line.

        Only clean samples count for :attr:`min_rtt`, the line's own round trip: any
        other may include time spent behind frames queued before it, or behind the
        peer's data that its acknowledgement rode on, and a flight limit grown from
        that would deepen the very queues it measured.
        """
        if clean and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2.0
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.base_rto = max(MIN_RTO, self.srtt + max(0.01, 4.0 * self.rttvar))
        self.rto = min(ceiling, self.base_rto)

    def back_off(self, ceiling: float) -> None:
        """The timeout fired: wait twice as long next time (RFC 6298, 5.5)."""
        self.rto = min(self.rto * 2.0, ceiling)

    def probe_delay(self) -> float | None:
        """How long the last frame's acknowledgement may take before a probe; None
        before any round trip was measured (the timeout covers that case)."""
        return None if self.srtt is None else max(2.0 * self.srtt, MIN_PROBE)


def best_frame_data(loss_per_byte: float, low: int, high: int) -> int:
    """The data size that moves most data per line byte when each byte may be hit.

    Maximises ``size / (size + h) * (1 - q) ** (size + h)`` (``h`` the frame overhead,
    ``q`` the loss per byte), whose optimum for small ``q`` solves
    ``size * (size + h) = h / q``.
    """
    if loss_per_byte <= 0.0:
        return high
    h = FRAME_OVERHEAD
    best = (-h + math.sqrt(h * h + 4.0 * h / loss_per_byte)) / 2.0
    return max(low, min(high, int(best)))


class DamageEstimate:
    """Losses per byte sent, both decaying as more is sent, plus a fading assumed loss.

    A run of consecutive frames lost is one loss for the caller to report: a line gone
    quiet for a while says nothing of how often a byte is hit.
    """

    def __init__(self) -> None:
        self._events = 0.0
        self._assumed = LOSS_PRIOR_EVENTS
        self._bytes = float(LOSS_PRIOR)

    @property
    def loss_per_byte(self) -> float:
        """The estimated chance that a byte sent is hit."""
        return (self._events + self._assumed) / self._bytes

    def sent(self, wire_bytes: int) -> None:
        """A frame of ``wire_bytes`` went out."""
        decay = 0.5 ** (wire_bytes / LOSS_HALF_LIFE)
        self._bytes = self._bytes * decay + wire_bytes
        self._events *= decay
        self._assumed *= 0.5 ** (wire_bytes / LOSS_PRIOR_HALF_LIFE)

    def lost(self) -> None:
        """A frame (or a run of consecutive frames) was lost."""
        self._events += 1.0

    def frame_data(self, low: int, high: int) -> int:
        """The best data size per frame now, within ``low`` and ``high``."""
        return best_frame_data(self.loss_per_byte, low, high)


@dataclass(frozen=True, slots=True)
class SendState:
    """What a frame remembers of the delivery count when it was sent."""

    delivered: int
    delivered_at: float
    first_sent_at: float


class DeliveryRate:
    """The best recent rate the line carried (bytes a second); start-up detection."""

    def __init__(self, now: float) -> None:
        self._delivered = 0
        self._delivered_at = now
        self._first_sent_at = now
        self._samples: deque[tuple[float, float]] = deque()
        self._mark_at = now
        self._mark_bytes = 0
        self.starting = True
        self._round_ends = now
        self._growth_mark = 0.0
        self._flat_rounds = 0

    @property
    def best(self) -> float | None:
        """The highest rate sampled within :data:`RATE_MEMORY` seconds, if any."""
        return max((rate for _, rate in self._samples), default=None)

    def on_send(self, now: float, *, line_idle: bool) -> SendState:
        """A frame is sent; ``line_idle``: nothing else was in flight."""
        if line_idle:
            # Do not count the pause as slowness.
            self._delivered_at = self._first_sent_at = now
        return SendState(self._delivered, self._delivered_at, self._first_sent_at)

    def on_delivered(self, count: int, now: float) -> None:
        """The peer acknowledged ``count`` more bytes (cumulatively or selectively)."""
        self._delivered += count
        self._delivered_at = now

    def sample(
        self,
        sent: SendState,
        sent_at: float,
        now: float,
        *,
        app_limited: bool,
        round_trip: RoundTrip,
    ) -> None:
        """Rate over the flight of the newest acknowledged frame sent once.

        Over the longer of the sending and the acknowledging of those bytes: either
        alone can be squeezed (a burst sent at once, acknowledgements bunched up); and
        not over less than a round trip, where bunched acknowledgements mislead.
        """
        self._first_sent_at = sent_at
        elapsed = max(now - sent.delivered_at, sent_at - sent.first_sent_at)
        if elapsed <= 0.0 or elapsed < (round_trip.min_rtt or 0.0):
            return
        rate = (self._delivered - sent.delivered) / elapsed
        self._forget(now)
        best = self.best or 0.0
        if app_limited and rate < best:
            return  # the sender had nothing more to send: this says little of the line
        self._samples.append((now, rate))
        if self.starting and now >= self._round_ends:
            # Starting up ends once the best rate grew by less than a quarter in three
            # round trips running: the line is full (BBR's test).
            self._round_ends = now + (round_trip.srtt or elapsed)
            if max(rate, best) >= 1.25 * self._growth_mark:
                self._growth_mark = max(rate, best)
                self._flat_rounds = 0
            else:
                self._flat_rounds += 1
                self.starting = self._flat_rounds < 3

    def on_received(self, total_bytes: int, now: float) -> None:
        """Bytes arrived from the peer (``total_bytes`` so far): a rate the line carries.

        With data both ways each end's round trip includes the other's queue, and a
        limit from delivery rates alone lets the end with the lower estimate starve
        while the other keeps its queue full.  Serial lines carry the same rate both
        ways, so the busier direction teaches the quieter one.
        """
        elapsed = now - self._mark_at
        if elapsed < LINE_RATE_INTERVAL:
            return
        rate = (total_bytes - self._mark_bytes) / elapsed
        self._forget(now)
        best = self.best
        if best is not None and rate > best:
            self._samples.append((now, rate))
        self._mark_at = now
        self._mark_bytes = total_bytes

    def _forget(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - RATE_MEMORY:
            self._samples.popleft()

"""Two links over an in-memory line with a fake clock: the lossy line the tests fuzz.

A :class:`Line` direction serialises bytes at ``rate`` bytes a second (a byte leaves
only when the ones before it have), delivers them ``latency`` seconds later, and on the
way damages them as :class:`Conditions` say: bit flips at a bit-error rate, pieces lost,
cut short, delivered twice or late (overtaking later ones), noise inserted, nothing
delivered for a while (``quiet``) or ever again (``silent_after``).  All chance comes
from one seeded :class:`random.Random`, so a run is a pure function of its seed.

:func:`simulate` plays both drivers: each end keeps at most ``tx_buffer`` bytes waiting
for its line (asking :meth:`Link.data_to_send` for more only when there is room, as a
producer-aware Twisted driver does), calls ``tick`` at ``next_deadline``, and takes every
event out as it comes.  Time jumps from one thing to the next (an arrival, a deadline,
room in a transmit buffer), so a simulated minute costs what its events cost.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relay.sansio.phone.link import Link, LinkDead, LinkParams, RecordReceived

LINE_RATE = 11_520.0
"""115 200 bit/s with a start and a stop bit per byte."""


@dataclass(frozen=True)
class Conditions:
    """What the line does to the bytes on it (the same both ways)."""

    rate: float = LINE_RATE
    latency: float = 0.0
    ber: float = 0.0
    drop: float = 0.0
    truncate: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.5
    noise: float = 0.0
    piece: int = 128
    tx_buffer: int = 256
    silent_after: float = math.inf
    quiet: tuple[float, float] | None = None


Tamper = Callable[[str, int, bytes], bytes]
"""``tamper(direction, index, chunk)``: what the line carries instead of a driver's write.

``direction`` is ``"a>b"`` or ``"b>a"``, ``index`` counts that direction's writes from 0
(with a transmit buffer smaller than a frame, each write is one frame)."""


class Line:
    """One direction of the line: serialisation, latency and damage."""

    def __init__(
        self,
        conditions: Conditions,
        rng: random.Random,
        name: str = "",
        tamper: Tamper | None = None,
    ) -> None:
        self.conditions = conditions
        self.rng = rng
        self.name = name
        self.tamper = tamper
        self.writes: list[tuple[float, bytes]] = []
        self.busy_until = 0.0
        self.in_flight: list[tuple[float, int, bytes]] = []
        self._order = 0
        self.bits_flipped = 0
        self.bytes_sent = 0

    def queued(self, now: float) -> float:
        """Bytes still waiting to be serialised at ``now``."""
        return max(0.0, self.busy_until - now) * self.conditions.rate

    def room_at(self) -> float:
        """When the transmit buffer next has room for more."""
        return self.busy_until - self.conditions.tx_buffer / self.conditions.rate

    def send(self, data: bytes, now: float) -> None:
        """Put ``data`` on the line behind what is already there."""
        cond = self.conditions
        self.writes.append((now, data))
        if self.tamper is not None:
            data = self.tamper(self.name, len(self.writes) - 1, data)
        self.bytes_sent += len(data)
        start = max(now, self.busy_until)
        for offset in range(0, len(data), cond.piece):
            piece = data[offset : offset + cond.piece]
            start += len(piece) / cond.rate
            self._deliver_at(start + cond.latency, piece)
        self.busy_until = start

    def _deliver_at(self, when: float, piece: bytes) -> None:
        cond, rng = self.conditions, self.rng
        if when >= cond.silent_after:
            return
        if cond.quiet is not None and cond.quiet[0] <= when < cond.quiet[1]:
            return
        if cond.drop and rng.random() < cond.drop:
            return
        if cond.truncate and rng.random() < cond.truncate:
            piece = piece[: rng.randrange(len(piece))]
            if not piece:
                return  # an empty read would mean end of file to the link
        if cond.ber:
            piece = self._flip(piece)
        if cond.noise and rng.random() < cond.noise:
            piece = piece + rng.randbytes(rng.randrange(1, 40))
        if cond.reorder and rng.random() < cond.reorder:
            when += rng.random() * cond.reorder_delay
        copies = 2 if cond.duplicate and rng.random() < cond.duplicate else 1
        for _ in range(copies):
            self._order += 1
            heapq.heappush(self.in_flight, (when, self._order, piece))

    def _flip(self, piece: bytes) -> bytes:
        """Flip each bit with probability ``ber`` (skipping geometrically between hits)."""
        ber, rng = self.conditions.ber, self.rng
        bits = len(piece) * 8
        position = -1
        damaged: bytearray | None = None
        log_keep = math.log1p(-ber)
        while True:
            position += 1 + int(math.log1p(-rng.random()) / log_keep)
            if position >= bits:
                break
            if damaged is None:
                damaged = bytearray(piece)
            damaged[position // 8] ^= 1 << (position % 8)
            self.bits_flipped += 1
        return piece if damaged is None else bytes(damaged)

    def next_arrival(self) -> float:
        """When the next piece arrives (inf if none is on its way)."""
        return self.in_flight[0][0] if self.in_flight else math.inf

    def arrivals(self, now: float) -> list[bytes]:
        """The pieces that have arrived by ``now``, in arrival order."""
        out = []
        while self.in_flight and self.in_flight[0][0] <= now:
            out.append(heapq.heappop(self.in_flight)[2])
        return out


@dataclass
class End:
    """One end of the call: its link, what it has to send, what it got."""

    link: Link
    to_send: list[bytes]
    received: list[bytes] = field(default_factory=list)
    dead: LinkDead | None = None
    done_at: float | None = None

    def drain(self) -> None:
        """Take every event the link has."""
        while (event := self.link.next_event()) is not None:
            if isinstance(event, RecordReceived):
                self.received.append(event.record)
            else:
                self.dead = event


@dataclass
class Outcome:
    """What a simulated call did."""

    a: End
    b: End
    a_to_b: Line
    b_to_a: Line
    finished_at: float


def simulate(
    records_a: Sequence[bytes],
    records_b: Sequence[bytes],
    conditions: Conditions,
    *,
    seed: int = 0,
    params: LinkParams | None = None,
    time_limit: float = 3600.0,
    feed_all_at_once: bool = True,
    tamper: Tamper | None = None,
    run_to_limit: bool = False,
    hello: bool = False,
) -> Outcome:
    """Run a call until every record arrived both ways and was acknowledged, or both ends
    reported :class:`LinkDead`, or ``time_limit`` (simulated seconds) passed (only the
    last with ``run_to_limit``).

    With ``feed_all_at_once`` every record is given to ``send_record`` at the start;
    otherwise each end keeps at most two windows queued (as the session does with
    ``queued_bytes``).  With ``hello`` each end's first record is held back until it
    received the peer's first record, as a session's handshake does: the first round
    trips are then measured on an empty line.
    """
    params = params or LinkParams()
    rng = random.Random(seed)
    a = End(Link(params, 0.0), list(records_a))
    b = End(Link(params, 0.0), list(records_b))
    lines = {
        id(a): Line(conditions, rng, "a>b", tamper),
        id(b): Line(conditions, rng, "b>a", tamper),
    }
    peers = {id(a): b, id(b): a}
    pending = {id(a): 0, id(b): 0}
    expected = {id(a): len(records_b), id(b): len(records_a)}
    now = 0.0

    def feed(end: End) -> None:
        index = pending[id(end)]
        if hello and index == 1 and not end.received:
            return
        while index < len(end.to_send) and not end.link.dead:
            if hello and index == 1 and not end.received:
                break
            if not feed_all_at_once and end.link.queued_bytes > 2 * params.window:
                break
            end.link.send_record(end.to_send[index])
            index += 1
        pending[id(end)] = index

    def finished() -> bool:
        if a.dead and b.dead:
            return True
        return all(
            len(end.received) == expected[id(end)]
            and pending[id(end)] == len(end.to_send)
            and end.link.idle
            for end in (a, b)
        )

    stalls = 0
    while now < time_limit:
        for end in (a, b):
            incoming = lines[id(peers[id(end)])].arrivals(now)
            for data in incoming:
                end.link.receive_data(data, now)
            end.drain()
            if end.done_at is None and len(end.received) == expected[id(end)]:
                end.done_at = now
        for end in (a, b):
            feed(end)
            end.link.tick(now)
            line = lines[id(end)]
            while True:
                room = max(0, math.ceil(conditions.tx_buffer - line.queued(now)))
                data = end.link.data_to_send(now, max_bytes=room)
                if data:
                    line.send(data, now)
                if not data or not room:
                    break
            end.drain()
        if finished() and not run_to_limit:
            break
        candidates = [lines[id(end)].next_arrival() for end in (a, b)]
        for end in (a, b):
            deadline = end.link.next_deadline()
            if deadline is not None:
                candidates.append(deadline)
            line = lines[id(end)]
            if line.queued(now) >= conditions.tx_buffer:
                candidates.append(line.room_at() + 1e-9)
        upcoming = min(candidates)
        if upcoming <= now:
            stalls += 1
            assert stalls < 10_000, "the simulation stopped moving"
            upcoming = now + 1e-6
        else:
            stalls = 0
        now = upcoming
    return Outcome(a, b, lines[id(a)], lines[id(b)], now)

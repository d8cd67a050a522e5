"""Two phone session engines back to back in memory, with virtual time and a line model.

Each end is a session, its link and a :class:`~relay.phone.call.CallHandler` over a
store; :func:`run_call` moves the bytes each end writes to the other through a line
(perfect by default, or any :class:`Line` that delays, damages or drops), advances the
virtual clock to the next deadline or arrival when nothing else can happen, and stops
when both calls have ended.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.address import parse_forward_path, parse_reverse_path
from relay.envelope import Envelope, Recipient, Submitter
from relay.interfaces import IPhoneStore
from relay.phone.call import CallHandler
from relay.sansio.phone.accounting import CallSummary
from relay.sansio.phone.link import Link, LinkParams
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import PhoneSession, SessionOptions

from support.phone.link_harness import Conditions
from support.phone.link_harness import Line as RateLine
from support.phone.memstore import MemoryPhoneStore
from support.phone.plainlink import PlainLink, PlainParams

SECRET = bytes(range(32))
HUB, SITE = "hub-a", "site-b"


def envelope(*recipients: str, sender: str = "<alice@hub.example>") -> Envelope:
    """A spool envelope from ``sender`` to ``recipients``."""
    return Envelope(
        parse_reverse_path(sender),
        tuple(Recipient(parse_forward_path(r)) for r in recipients or ("<bob@site.example>",)),
        1_700_000_000.0,
        Submitter("ESMTP"),
    )


def new_link(now: float) -> tuple[Any, Any]:
    """The default: a perfect record link."""
    params = PlainParams()
    return PlainLink(params, now), params


def real_link(now: float) -> tuple[Link, LinkParams]:
    """A real link with the default parameters, as a driver makes one."""
    params = LinkParams()
    return Link(params, now), params


@dataclass
class End:
    """One end of a call."""

    session: PhoneSession
    handler: CallHandler
    store: Any
    link: Any
    seen: list[object]  # every event the session gave, in order

    @property
    def summary(self) -> CallSummary | None:
        return self.handler.summary


def make_end(
    role: Role,
    store: IPhoneStore | MemoryPhoneStore,
    *,
    now: float = 0.0,
    secrets: dict[str, bytes] | None = None,
    name: str | None = None,
    peer: str | None = None,
    options: SessionOptions | None = None,
    link_factory: Callable[[float], tuple[Any, Any]] = new_link,
    nonce: bytes | None = None,
    site_options: dict[str, SessionOptions] | None = None,
) -> End:
    """A caller (hub-a calling site-b) or an answerer (site-b), sharing SECRET."""
    if name is None:
        name = HUB if role is Role.CALLER else SITE
    if peer is None and role is Role.CALLER:
        peer = SITE
    if secrets is None:
        secrets = {SITE: SECRET} if role is Role.CALLER else {HUB: SECRET}
    link, params = link_factory(now)
    session = PhoneSession(
        link=link,
        link_params=params,
        role=role,
        local_name=name,
        secrets=secrets.get,
        nonce=nonce or (b"C" if role is Role.CALLER else b"A") * 32,
        now=now,
        peer_name=peer,
        options=options,
        site_options=site_options.get if site_options is not None else None,
    )
    seen: list[object] = []
    handler = CallHandler(session, store, lambda: None, seen.append)  # type: ignore[arg-type]
    return End(session, handler, store, link, seen)


class Line:
    """A perfect line: what is written arrives at once.  Subclasses model worse ones."""

    def carry(self, direction: int, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """What arrives at the far end, and when, for ``data`` written at ``now``."""
        return [(now, data)]

    def room(self, direction: int, now: float) -> int:
        """How many bytes an end may write now (its transmit buffer's free space)."""
        return 4096

    def next_room(self, direction: int) -> float:
        """When an end whose buffer is full may write again."""
        return math.inf

    def dropped(self, now: float) -> bool:
        """True once the line is cut (both ends then see the end of the stream)."""
        return False


@dataclass
class CutLine(Line):
    """A perfect line cut after ``limit`` bytes (both directions together)."""

    limit: int
    carried: int = 0

    def carry(self, direction: int, data: bytes, now: float) -> list[tuple[float, bytes]]:
        room = max(0, self.limit - self.carried)
        self.carried += len(data)
        return [(now, data[:room])] if room else []

    def dropped(self, now: float) -> bool:
        return self.carried >= self.limit


class LossyLine(Line):
    """The link tests' line model (serialisation at a rate, latency, flips, losses,
    truncation, duplication, reordering, noise), both ways from one seed, optionally cut
    after ``cut_after`` bytes written in all."""

    def __init__(self, conditions: Conditions, seed: int, cut_after: float = math.inf) -> None:
        rng = random.Random(seed)
        self.conditions = conditions
        self.lines = (RateLine(conditions, rng), RateLine(conditions, rng))
        self.cut_after = cut_after
        self.written = 0

    def carry(self, direction: int, data: bytes, now: float) -> list[tuple[float, bytes]]:
        room = self.cut_after - self.written
        self.written += len(data)
        line = self.lines[direction]
        if room > 0:
            line.send(data if room >= len(data) else data[: int(room)], now)
        out = [(when, piece) for when, _, piece in line.in_flight]
        line.in_flight.clear()
        return out

    def room(self, direction: int, now: float) -> int:
        return max(0, math.ceil(self.conditions.tx_buffer - self.lines[direction].queued(now)))

    def next_room(self, direction: int) -> float:
        return self.lines[direction].room_at() + 1e-9

    def dropped(self, now: float) -> bool:
        return self.written >= self.cut_after


@dataclass
class Trace:
    """What :func:`run_call` saw: the bytes each end wrote, and when the call ended."""

    written: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    end_time: float = 0.0


class Stuck(AssertionError):
    """Neither end can move and no deadline is set: the engines wait for each other."""


def run_call(
    a: End, b: End, line: Line | None = None, now: float = 0.0, max_steps: int = 200_000
) -> Trace:
    """Run the call between ``a`` and ``b`` to its end (both :class:`CallEnded`)."""
    line = line or Line()
    trace = Trace()
    ends = (a, b)
    in_flight: list[tuple[float, int, int, bytes]] = []  # (arrival, seq, to, data)
    seq = itertools.count()
    cut = False
    for end in ends:
        end.handler.handle_events()
    for _ in range(max_steps):
        if all(e.session.ended for e in ends):
            trace.end_time = now
            return trace
        moved = False
        while in_flight and in_flight[0][0] <= now:
            _, _, to, piece = heapq.heappop(in_flight)
            moved = True
            if piece and not ends[to].session.ended:
                ends[to].session.receive_data(piece, now)
                ends[to].handler.handle_events()
        for index, end in enumerate(ends):
            if end.session.ended or cut:
                continue
            room = line.room(index, now)
            if not room:
                continue
            data = end.session.data_to_send(now, room)
            end.handler.handle_events()
            if data:
                moved = True
                trace.written[index] += data
                for when, piece in line.carry(index, data, now):
                    heapq.heappush(in_flight, (when, next(seq), 1 - index, piece))
        if not cut and line.dropped(now) and not in_flight:
            cut = True
            for end in ends:
                if not end.session.ended:
                    end.session.receive_data(b"", now)
                    end.handler.handle_events()
            moved = True
        if moved or all(e.session.ended for e in ends):
            continue
        for end in ends:
            deadline = end.session.next_deadline()
            if deadline is not None and deadline <= now:
                end.session.tick(now)
                end.handler.handle_events()
        times = [t for e in ends if (t := e.session.next_deadline()) is not None]
        if in_flight:
            times.append(in_flight[0][0])
        for index, end in enumerate(ends):
            if not end.session.ended and not cut and not line.room(index, now):
                times.append(line.next_room(index))
        future = [t for t in times if t > now]
        if all(e.session.ended for e in ends):
            continue
        if not future:
            if any(t <= now for t in times):
                continue  # something is due now that could not run: try again
            raise Stuck(f"no deadline; states {[e.session.state for e in ends]}")
        now = min(future)
    raise Stuck("too many steps")

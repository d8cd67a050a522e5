"""A reliable, ordered, full-duplex record transport over frames, without I/O.

Theory of operation
-------------------
Each direction is a byte stream.  :meth:`Link.send_record` appends the record to the
outgoing stream behind its length (a LEB128 varint); the receiver cuts the stream back
into records (:class:`RecordReceived`), refusing any longer than its ``max_record``.
Frames (:mod:`relay.sansio.phone.frame`) carry pieces of the stream; a frame's ``seq``
is the stream offset of its first byte (mod 2**24; both ends keep exact offsets and
read the 24-bit value as the one nearest to what they expect, which a window of at
most 4 MiB keeps unambiguous).  Record and frame
boundaries are independent: small records share a frame, large ones span many.

Frame kinds (:class:`FrameKind`, the low five bits of the frame's kind byte; kinds this
version does not know are skipped):

* ``DATA``: stream bytes at offset ``seq``.  Flags (:class:`FrameFlag`): ``ACK_BLOCK``,
  an ack block (below) comes first, so acknowledgements ride on data; ``PUSH``, nothing
  more was queued behind this frame (or it is a resend), so acknowledge it at once;
  ``NACK``, the ack block names damaged frames.
* ``ACK``: an acknowledgement alone (flag ``NACK`` as above); ``seq`` is the cumulative
  ack and the payload the rest of the block.  It is also the keepalive.

An **ack block** is the cumulative ack (the offset of the first byte the receiver does
not have, 3 bytes; only on data frames), a count, and that many pairs of varints
(skip, length): the ranges the receiver holds beyond the cumulative ack, each relative
to the end of the one before (selective acknowledgement, as many ranges as fit in
:data:`SACK_LIMIT` bytes, lowest first; the count's high bit says some were left out).
With the ``NACK`` flag it ends with a count and the offsets (from the cumulative ack)
of frames that arrived damaged: their headers passed their check, so the receiver
knows which frames to ask for at once.  A data frame thus costs
:data:`~relay.sansio.phone.frame.FRAME_OVERHEAD` bytes, four more when it carries an
acknowledgement and no gap.

**Sender.**  The stream bytes not yet acknowledged cumulatively are kept; what has been
sent of them is a list of segments (one per frame sent), each remembering when it was
last sent and in which order.  New data goes out while the window (``params.window``
bytes beyond the cumulative ack) and the flight limit (below) have room for a whole
frame.  A segment is known lost when the peer names it damaged, or when a segment sent
*after* it has been acknowledged while it has not (the line does not reorder, so the
later one overtaking it means this one was damaged): it is resent at once, before any
new data, without waiting for a timer (the idea of RACK, RFC 8985; not beyond the last
range listed when some were left out).  Only segments nobody has acknowledged are resent.
A retransmission timer (RFC 6298: smoothed round trip plus four deviations, at least
a second, doubled on each expiry; samples only from frames sent once, per Karn)
covers the rest, and a probe after two round trips resends the last frame of a burst,
which has no later frame to show it lost.  The timer restarts whenever something new
is acknowledged, so frames that queued behind a full transmit buffer do not fire it
while acknowledgements still flow; when it fires it resends only the oldest frame,
unless nothing at all was heard for a whole timeout (the line went quiet).  An
acknowledged frame that was sent more than once may have arrived as any of its copies,
so it is evidence only against frames last sent before its first copy.  The estimators (round trip,
damage, delivery rate) live in :mod:`relay.sansio.phone.estimate`.

**Flight limit.**  The driver's transport, the kernel's tty buffer and a modem can
together hold many seconds of a slow line.  Whatever sits there delays the frames and
acknowledgements behind it: with data both ways, each end's acknowledgements wait
behind its own queue, and a resend behind everything queued before it.  So the bytes
in flight (sent, neither acknowledged nor known lost) are limited to what the line
carries in a second or two round trips, from the best recent delivery rate (measured
as BBR does) and the rate at which bytes arrive from the peer; while starting up (until
that rate stops growing) at least :data:`INITIAL_FLIGHT`.  The line rate itself is
never configured.

**Frame size.**  The sender estimates the chance ``q`` that a byte is hit from frames
declared lost per byte sent (a run of consecutive losses counts once, since a line gone
quiet says nothing of damage; see :class:`~relay.sansio.phone.estimate.DamageEstimate`)
and picks the data size that maximises
``size / (size + overhead) * (1 - q) ** (size + overhead)``: the largest allowed on a
clean line, a few hundred bytes at a bit error rate of 1e-5, within
``min_frame_payload`` and ``max_frame_payload``.  Lost segments are resent at the
current size, split evenly if need be.

**Receiver.**  Bytes in order are delivered at once; bytes beyond a gap are held
(at most ``params.window`` bytes beyond the cumulative ack; more is dropped and
resent by the peer).  An acknowledgement is owed after new data.  It goes at once, alone
if no data frame is leaving, when the data was out of order, filled a gap, was a
duplicate (the peer must learn of a gap quickly, or that its acknowledgement was lost)
or was pushed.  Otherwise it waits up to :data:`ACK_DELAY` (or a quarter window of
data), then rides on the next data frame, or goes alone if no data is ready: one
acknowledgement covers many frames, and with data both ways almost none go alone.
Records delivered but not yet taken by :meth:`Link.next_event` count against the window
too, so a reader that falls behind holds back the peer instead of growing memory.

**Liveness.**  After ``keepalive`` seconds without sending anything, the link sends an
``ACK``.  No good frame for ``dead_after`` seconds, or data outstanding with nothing
new acknowledged for ``dead_after`` seconds, is :class:`LinkDead`; so is end of file
(``receive_data(b"")``) and a peer that breaks the protocol (a record over
``max_record``, a malformed ack block, an acknowledgement of data never sent).  Nothing
received ever raises.

The driver calls :meth:`Link.data_to_send` after :meth:`Link.receive_data`, after
:meth:`Link.send_record`, when its transport can take more bytes, and at
:meth:`Link.next_deadline`.  It should pass ``max_bytes`` so that little waits in its
transmit buffer (a frame or two): what waits there delays the acknowledgements that
ride on data, and what was handed out cannot be resized to the line's damage.
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Final

from relay.sansio.phone.errors import LocalPhoneError, PhoneProtocolError
from relay.sansio.phone.estimate import (
    INITIAL_RTO,
    DamageEstimate,
    DeliveryRate,
    RoundTrip,
    SendState,
)
from relay.sansio.phone.frame import (
    MAX_PAYLOAD,
    SEQ_MODULUS,
    Frame,
    FrameDecoder,
    encode_frame,
)

__all__ = [
    "ACK_DELAY",
    "FLIGHT_TIME",
    "INITIAL_FLIGHT",
    "MAX_FRAME_DATA",
    "MAX_NACKS",
    "MAX_RTO",
    "SACK_LIMIT",
    "FrameFlag",
    "FrameKind",
    "Link",
    "LinkDead",
    "LinkEvent",
    "LinkParams",
    "LinkStats",
    "RecordReceived",
    "decode_varint",
    "encode_varint",
    "unwrap_seq",
]

MAX_FRAME_DATA: Final = 16 * 1024
"""The largest ``max_frame_payload`` a link accepts."""

SACK_LIMIT: Final = 256
"""The most bytes of (skip, length) pairs in one ack block."""

_CUM_SIZE: Final = 3  # the cumulative ack at the head of a data frame's ack block
_ACK_BLOCK_MAX: Final = _CUM_SIZE + 1 + SACK_LIMIT + 1 + 5 * 8
assert MAX_FRAME_DATA + _ACK_BLOCK_MAX <= MAX_PAYLOAD

ACK_DELAY: Final = 0.05
"""Seconds an acknowledgement of in-order data may wait, to cover more data at once."""


INITIAL_FLIGHT: Final = 16 * 1024
"""Bytes in flight while starting up (until the measured rate stops growing): a first
delivery-rate sample (one frame over a whole round trip) is far below the line's rate,
and a limit from it would idle a long line while it grows."""

FLIGHT_TIME: Final = 1.0
"""Seconds of line the flight limit allows at least (see ``Link._flight_limit``)."""


MAX_RTO: Final = 30.0
"""The largest retransmission timeout, however often it was doubled (and at most a
quarter of ``dead_after``)."""


_MAX_WINDOW: Final = SEQ_MODULUS // 4
_MAX_RECORD: Final = (1 << 31) - 1


class FrameKind(enum.IntEnum):
    """What a frame carries (the low six bits of the frame's kind byte)."""

    DATA = 0x01
    ACK = 0x02


class FrameFlag(enum.IntFlag):
    """The three high bits of a frame's kind byte."""

    NACK = 0x20
    """The ack block ends with the offsets of frames that arrived damaged."""
    PUSH = 0x40
    """Data: nothing more was queued behind this frame: acknowledge it at once."""
    ACK_BLOCK = 0x80
    """Data: an ack block comes before the data."""


_KIND_MASK: Final = 0x1F
_MORE_RANGES: Final = 0x80  # in an ack block's range count: more ranges than listed
MAX_NACKS: Final = 8
"""The most damaged frames one acknowledgement asks for again."""


@dataclass(frozen=True)
class LinkParams:
    """The link's settings; both sides start from the defaults, then agree on others."""

    min_frame_payload: int = 64
    max_frame_payload: int = 4096
    window: int = 65536
    max_record: int = 1 << 20
    keepalive: float = 5.0
    dead_after: float = 60.0

    def __post_init__(self) -> None:
        if not 16 <= self.min_frame_payload <= self.max_frame_payload <= MAX_FRAME_DATA:
            raise LocalPhoneError(
                f"frame payload bounds must satisfy 16 <= min ({self.min_frame_payload})"
                f" <= max ({self.max_frame_payload}) <= {MAX_FRAME_DATA}"
            )
        if not self.max_frame_payload <= self.window <= _MAX_WINDOW:
            raise LocalPhoneError(
                f"window {self.window} must be between max_frame_payload and {_MAX_WINDOW}"
            )
        if not 0 <= self.max_record <= _MAX_RECORD:
            raise LocalPhoneError(f"max_record {self.max_record} out of range")
        if not 0 < self.keepalive < self.dead_after:
            raise LocalPhoneError(
                f"need 0 < keepalive ({self.keepalive}) < dead_after ({self.dead_after})"
            )


@dataclass(frozen=True)
class RecordReceived:
    """A whole record from the peer, in the order it was sent."""

    record: bytes


@dataclass(frozen=True)
class LinkDead:
    """The link is over: the line dropped, the peer fell silent or broke the protocol."""

    reason: str


LinkEvent = RecordReceived | LinkDead


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link, for the call's accounting.

    ``payload_bytes_sent`` counts record bytes given to :meth:`Link.send_record`,
    ``payload_bytes_received`` record bytes delivered; ``wire_*`` every byte on the
    line (frames, resends, acknowledgements and, received, noise).
    """

    wire_bytes_sent: int
    wire_bytes_received: int
    payload_bytes_sent: int
    payload_bytes_received: int
    frames_sent: int
    frames_resent: int
    frames_damaged: int
    rtt: float | None
    bytes_resent: int = 0
    garbage_bytes: int = 0
    frame_payload: int = 0
    rto: float = INITIAL_RTO


def encode_varint(value: int) -> bytes:
    """``value`` as LEB128: seven bits a byte, low bits first, high bit = more follows."""
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Read a LEB128 value of at most five bytes at ``pos``; return it and the next pos."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= len(data):
            raise PhoneProtocolError("ack block cut short inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise PhoneProtocolError("number longer than five bytes in an ack block")


def unwrap_seq(wire: int, near: int) -> int:
    """The stream offset whose low 24 bits are ``wire`` nearest to ``near``."""
    delta = (wire - near) % SEQ_MODULUS
    if delta >= SEQ_MODULUS // 2:
        delta -= SEQ_MODULUS
    return near + delta


class _RecordReader:
    """Cuts the in-order stream into records; raises on a length over ``max_record``."""

    def __init__(self, max_record: int) -> None:
        self.max_record = max_record
        self._length: int | None = None
        self._prefix = 0
        self._shift = 0
        self._body = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of the record being put together."""
        return len(self._body)

    def feed(self, data: bytes) -> list[bytes]:
        records: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if self._length is None:
                byte = data[pos]
                pos += 1
                self._prefix |= (byte & 0x7F) << self._shift
                self._shift += 7
                if byte & 0x80:
                    if self._shift >= 35:
                        raise PhoneProtocolError("record length prefix longer than five bytes")
                    continue
                length, self._prefix, self._shift = self._prefix, 0, 0
                if length > self.max_record:
                    raise PhoneProtocolError(
                        f"peer sent a record of {length} bytes, more than {self.max_record}"
                    )
                self._length = length
            take = min(self._length - len(self._body), size - pos)
            self._body += data[pos : pos + take]
            pos += take
            if len(self._body) == self._length:
                records.append(bytes(self._body))
                self._body.clear()
                self._length = None
        return records


class _Segment:
    """One frame's worth of the outgoing stream, as last sent."""

    __slots__ = (
        "app_limited",
        "clean",
        "end",
        "first_xmit",
        "lost",
        "resent",
        "sacked",
        "send_state",
        "sent_at",
        "start",
        "xmit",
    )

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.xmit = 0
        self.sent_at = 0.0
        self.resent = False
        self.sacked = False
        self.lost = False
        self.first_xmit = 0  # order of its first sending (pieces of a split share it)
        self.send_state = SendState(0, 0.0, 0.0)  # for a delivery-rate sample
        self.app_limited = False
        self.clean = False  # sent when nothing else was in flight


class Link:
    """One end of the link; see the module's theory of operation."""

    def __init__(self, params: LinkParams, now: float) -> None:
        self._params = params
        self._decoder = FrameDecoder()
        self._events: deque[LinkEvent] = deque()
        self._dead = False
        # Sending.
        self._out = bytearray()
        self._snd_una = 0
        self._snd_nxt = 0
        self._segments: list[_Segment] = []
        self._xmit = 0
        self._delivered_xmit = 0
        self._round_trip = RoundTrip()
        self._rate = DeliveryRate(now)
        self._damage = DamageEstimate()
        self._rto_deadline: float | None = None
        self._probe_deadline: float | None = None
        self._progress_at = now
        self._last_sent = now
        self._frame_data = self._damage.frame_data(
            params.min_frame_payload, params.max_frame_payload
        )
        # Receiving.
        self._rcv_nxt = 0
        self._held: list[tuple[int, bytes]] = []
        self._reader = _RecordReader(params.max_record)
        self._undelivered = 0
        self._ack_owed = False
        self._ack_now = False
        self._ack_owed_since = now
        self._nacks: list[int] = []  # starts of frames that arrived damaged
        self._bytes_unacked = 0
        self._last_heard = now
        self._ticked_at = -math.inf
        # Accounting.
        self._wire_sent = 0
        self._wire_received = 0
        self._payload_sent = 0
        self._payload_received = 0
        self._frames_sent = 0
        self._frames_resent = 0
        self._bytes_resent = 0

    # -- the API -------------------------------------------------------------------

    @property
    def params(self) -> LinkParams:
        """The settings in force."""
        return self._params

    @property
    def dead(self) -> bool:
        """True once :class:`LinkDead` was queued: nothing more goes out or comes in."""
        return self._dead

    @property
    def queued_bytes(self) -> int:
        """Stream bytes (records and their length prefixes) not yet acknowledged."""
        return len(self._out)

    @property
    def unsent_bytes(self) -> int:
        """Stream bytes queued and never sent yet: what a record queued now waits behind."""
        return self._snd_una + len(self._out) - self._snd_nxt

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing in flight: the peer acknowledged everything we sent."""
        return not self._out

    @property
    def settled(self) -> bool:
        """Idle, and no acknowledgement owed to the peer (none waiting to be sent): a
        session may hang up once both ends are settled, without lingering."""
        return self.idle and not self._ack_owed

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the incoming side: held beyond a gap, a record being put
        together, records not yet taken, and the frame decoder's.  Bounded by twice
        ``window + max_record`` plus one frame, whatever the peer sends."""
        held = sum(len(data) for _, data in self._held)
        return held + self._reader.buffered + self._undelivered + self._decoder.buffered

    def reconfigure(self, params: LinkParams) -> None:
        """Switch to the settings both sides agreed on (data in flight is kept)."""
        self._params = params
        self._reader.max_record = params.max_record
        self._adapt_frame_size()

    def send_record(self, record: bytes) -> None:
        """Queue ``record`` for reliable, in-order delivery to the peer."""
        if self._dead:
            raise LocalPhoneError("send_record on a dead link")
        if len(record) > self._params.max_record:
            raise LocalPhoneError(
                f"record of {len(record)} bytes is over max_record {self._params.max_record}"
            )
        self._out += encode_varint(len(record))
        self._out += record
        self._payload_sent += len(record)

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes from the line; ``b""`` means the line dropped.  Never raises."""
        if self._dead:
            return
        if not data:
            self._die("line dropped")
            return
        self._wire_received += len(data)
        self._rate.on_received(self._wire_received, now)
        for frame in self._decoder.feed(data):
            try:
                self._on_frame(frame, now)
            except PhoneProtocolError as error:
                self._die(error.reason)
            if self._dead:
                return
        for damaged in self._decoder.take_damaged():
            if damaged.kind & _KIND_MASK == FrameKind.DATA:
                self._on_damaged(unwrap_seq(damaged.seq, self._rcv_nxt), now)

    def next_event(self) -> LinkEvent | None:
        """The next record (or the link's death); None when there is nothing more yet."""
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, RecordReceived):
            self._undelivered -= len(event.record)
        return event

    def next_deadline(self) -> float | None:
        """When :meth:`tick` (or :meth:`data_to_send`) must run next; None once dead."""
        if self._dead:
            return None
        params = self._params
        deadlines = [self._last_heard + params.dead_after]
        # What only data_to_send can do (an acknowledgement or keepalive due) is a
        # deadline until tick has run at or after it: a driver whose transport is full
        # calls data_to_send when it drains, and must not be woken again meanwhile.
        wake_ups = [self._last_sent + params.keepalive, self._ack_alone_due()]
        deadlines += [t for t in wake_ups if t is not None and t > self._ticked_at]
        if self._rto_deadline is not None:
            deadlines.append(self._rto_deadline)
        if self._probe_deadline is not None:
            deadlines.append(self._probe_deadline)
        if self._segments:
            deadlines.append(self._progress_at + params.dead_after)
        return min(deadlines)

    def tick(self, now: float) -> None:
        """Run the timers: dead peer, retransmission timeout, tail probe."""
        if self._dead:
            return
        self._ticked_at = max(self._ticked_at, now)
        params = self._params
        if now - self._last_heard >= params.dead_after:
            self._die(f"nothing heard from the peer for {params.dead_after:g} s")
            return
        if self._segments and now - self._progress_at >= params.dead_after:
            self._die(f"the peer acknowledged nothing for {params.dead_after:g} s")
            return
        if self._rto_deadline is not None and now >= self._rto_deadline:
            # Heard nothing at all for a whole timeout: the line went quiet and took
            # everything with it.  Otherwise the oldest frame alone is a guess (its
            # acknowledgement may only be queued behind the peer's data).
            outage = now - self._last_heard >= self._round_trip.rto
            run = False
            for segment in self._segments:
                if not (segment.sacked or segment.lost):
                    segment.lost = True
                    if not run:
                        self._note_loss()
                    run = True
                    if not outage:
                        break
                else:
                    run = False
            # The peer still talking shows the line works: no point waiting ever longer
            # (a serial line has no congestion to back off from), so twice the timeout
            # the round trips give is as far as it goes then.
            ceiling = self._max_rto()
            if not outage:
                ceiling = min(ceiling, 2.0 * self._round_trip.base_rto)
            self._round_trip.back_off(ceiling)
            self._rto_deadline = now + self._round_trip.rto
        if self._probe_deadline is not None and now >= self._probe_deadline:
            self._probe_deadline = None
            for segment in reversed(self._segments):
                if not segment.sacked:
                    segment.lost = True
                    break

    def data_to_send(self, now: float, max_bytes: int | None = None) -> bytes:
        """Frames to put on the line now.

        Resends come first, then new data while the window has room; frames are added
        while the output is shorter than ``max_bytes`` (so it may pass it by less than
        a frame).  An acknowledgement or keepalive that is due is added even beyond
        ``max_bytes``: it is small, and holding it back would stall the peer.
        """
        self.tick(now)
        if self._dead:
            return b""
        budget = math.inf if max_bytes is None else max_bytes
        out: list[bytes] = []
        size = 0
        index = 0
        flight = self._in_flight()  # kept up to date here: counting is linear
        while size < budget:
            index = self._next_lost(index)
            if index < 0:
                break
            segment = self._resendable(index)
            size += self._transmit(segment, now, out, clean=not flight)
            flight += segment.end - segment.start
            index += 1
        while size < budget and (length := self._next_new_length(flight)):
            segment = _Segment(self._snd_nxt, self._snd_nxt + length)
            if not self._segments:
                self._progress_at = now
            self._segments.append(segment)
            self._snd_nxt = segment.end
            size += self._transmit(segment, now, out, clean=not flight)
            flight += length
        ack_due = self._ack_alone_due()
        keepalive_due = not out and now >= self._last_sent + self._params.keepalive
        if (ack_due is not None and now >= ack_due) or keepalive_due:
            out.append(self._ack_frame())
        if not out:
            return b""
        data = b"".join(out)
        self._last_sent = now
        self._wire_sent += len(data)
        self._frames_sent += len(out)
        return data

    def stats(self) -> LinkStats:
        """The link's counters so far."""
        return LinkStats(
            wire_bytes_sent=self._wire_sent,
            wire_bytes_received=self._wire_received,
            payload_bytes_sent=self._payload_sent,
            payload_bytes_received=self._payload_received,
            frames_sent=self._frames_sent,
            frames_resent=self._frames_resent,
            frames_damaged=self._decoder.bad_checksums + self._decoder.bad_headers,
            rtt=self._round_trip.srtt,
            bytes_resent=self._bytes_resent,
            garbage_bytes=self._decoder.garbage_bytes,
            frame_payload=self._frame_data,
            rto=self._round_trip.rto,
        )

    # -- sending -------------------------------------------------------------------

    def _next_new_length(self, flight: int | None = None) -> int:
        """How much new data the next frame carries; 0 if none, or the window or the
        flight limit has no room for a whole frame (slivers would waste the line on
        headers).  ``flight``: the bytes in flight, if the caller knows."""
        waiting = len(self._out) - (self._snd_nxt - self._snd_una)
        length = min(self._frame_data, waiting)
        if not length:
            return 0
        room = self._snd_una + self._params.window - self._snd_nxt
        if flight is None:
            flight = self._in_flight()
        room = min(room, self._flight_limit() - flight)
        return length if length <= room else 0

    def _next_lost(self, index: int) -> int:
        segments = self._segments
        for position in range(index, len(segments)):
            if segments[position].lost:
                return position
        return -1

    def _resendable(self, index: int) -> _Segment:
        """The lost segment at ``index``, cut to the current frame size, marked resent."""
        segment = self._segments[index]
        length = segment.end - segment.start
        if length > self._frame_data * 5 // 4:
            # Split what was lost into even pieces near the current size, not a full
            # piece and a sliver.
            pieces = -(-length // self._frame_data)
            rest = _Segment(segment.start + -(-length // pieces), segment.end)
            rest.lost = True
            rest.resent = True
            rest.first_xmit = segment.first_xmit
            segment.end = rest.start
            self._segments.insert(index + 1, rest)
        segment.lost = False
        segment.resent = True
        self._frames_resent += 1
        self._bytes_resent += segment.end - segment.start
        return segment

    def _transmit(self, segment: _Segment, now: float, out: list[bytes], *, clean: bool) -> int:
        """Frame ``segment`` into ``out``; ``clean``: nothing else is in flight."""
        base = self._snd_una
        data = bytes(self._out[segment.start - base : segment.end - base])
        kind = FrameKind.DATA | (FrameFlag.PUSH if segment.resent else 0)
        if segment.end == base + len(self._out):
            kind |= FrameFlag.PUSH
        ack_due = self._ack_due()
        if ack_due is not None and now >= ack_due:
            cum = (self._rcv_nxt % SEQ_MODULUS).to_bytes(_CUM_SIZE, "big")
            block, flags = self._ack_block()
            data = cum + block + data
            kind |= FrameFlag.ACK_BLOCK | flags
        wire = encode_frame(Frame(kind, segment.start % SEQ_MODULUS, data))
        out.append(wire)
        segment.clean = clean
        segment.send_state = self._rate.on_send(now, line_idle=clean)
        segment.app_limited = bool(kind & FrameFlag.PUSH)
        self._xmit += 1
        segment.xmit = self._xmit
        segment.first_xmit = segment.first_xmit or self._xmit
        segment.sent_at = now
        if self._rto_deadline is None:
            self._rto_deadline = now + self._round_trip.rto
        if kind & FrameFlag.PUSH:
            self._arm_probe(now)
        self._damage.sent(len(wire))
        self._adapt_frame_size()
        return len(wire)

    def _ack_due(self) -> float | None:
        """When an acknowledgement must go out alone if no data carries it first."""
        if not self._ack_owed:
            return None
        if self._ack_now or self._bytes_unacked >= self._params.window // 4:
            return self._ack_owed_since
        return self._ack_owed_since + ACK_DELAY

    def _ack_alone_due(self) -> float | None:
        """When an acknowledgement must go in a frame of its own.

        News of a gap goes at once.  An acknowledgement of in-order data waits for the
        next data frame if data is ready (the driver asks again when its transmit buffer
        has room): alone it would take a frame's overhead, and queue behind that frame
        anyway.
        """
        due = self._ack_due()
        if due is None or self._ack_now:
            return due
        if self._next_new_length() or self._next_lost(0) >= 0:
            return None
        return due

    def _ack_frame(self) -> bytes:
        block, flags = self._ack_block()
        return encode_frame(Frame(FrameKind.ACK | flags, self._rcv_nxt % SEQ_MODULUS, block))

    def _ack_sent(self) -> None:
        self._nacks.clear()
        self._ack_owed = False
        self._ack_now = False
        self._bytes_unacked = 0

    def _ack_block(self) -> tuple[bytes, FrameFlag]:
        """The acknowledgement now owed, after the cumulative ack, with its flag; the
        acknowledgement is then no longer owed."""
        block = self._sack_block()
        flags = FrameFlag(0)
        nacks = [start - self._rcv_nxt for start in self._nacks if start >= self._rcv_nxt]
        if nacks:
            block += bytes([len(nacks)]) + b"".join(map(encode_varint, nacks))
            flags = FrameFlag.NACK
        self._ack_sent()
        return block, flags

    def _sack_block(self) -> bytes:
        """Count and (skip, length) pairs of the ranges held beyond the cumulative ack."""
        pairs = bytearray()
        count = 0
        previous = self._rcv_nxt
        run_start = run_end = -1
        ranges: list[tuple[int, int]] = []
        for start, data in self._held:
            if start == run_end:
                run_end += len(data)
                continue
            if run_end >= 0:
                ranges.append((run_start, run_end))
            run_start, run_end = start, start + len(data)
        if run_end >= 0:
            ranges.append((run_start, run_end))
        for start, end in ranges:
            pair = encode_varint(start - previous) + encode_varint(end - start)
            if len(pairs) + len(pair) > SACK_LIMIT or count == _MORE_RANGES - 1:
                count |= _MORE_RANGES
                break
            pairs += pair
            count += 1
            previous = end
        return bytes([count]) + bytes(pairs)

    # -- receiving -----------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float) -> None:
        kind = frame.kind & _KIND_MASK
        nack = bool(frame.kind & FrameFlag.NACK)
        if kind == FrameKind.ACK:
            cum = unwrap_seq(frame.seq, self._snd_una)
            ranges, more, nacks, _ = self._read_ack_block(frame.payload, 0, cum, nack=nack)
            self._on_ack(cum, ranges, more, nacks, now)
        elif kind == FrameKind.DATA:
            payload = frame.payload
            if frame.kind & FrameFlag.ACK_BLOCK:
                if len(payload) < _CUM_SIZE:
                    raise PhoneProtocolError("data frame too short for its ack block")
                cum_wire = int.from_bytes(payload[:_CUM_SIZE], "big")
                cum = unwrap_seq(cum_wire, self._snd_una)
                ranges, more, nacks, pos = self._read_ack_block(payload, _CUM_SIZE, cum, nack=nack)
                self._on_ack(cum, ranges, more, nacks, now)
                payload = payload[pos:]
            self._on_data(frame.seq, payload, now, push=bool(frame.kind & FrameFlag.PUSH))
        else:
            return  # a kind from a later version: skip it
        self._last_heard = now

    def _read_ack_block(
        self, payload: bytes, pos: int, cum: int, *, nack: bool
    ) -> tuple[list[tuple[int, int]], bool, list[int], int]:
        """Ranges held, whether more were left out, starts of damaged frames, and where
        the block ends."""
        if pos >= len(payload):
            raise PhoneProtocolError("ack block without its range count")
        count = payload[pos] & ~_MORE_RANGES
        more = bool(payload[pos] & _MORE_RANGES)
        pos += 1
        ranges: list[tuple[int, int]] = []
        previous = cum
        for _ in range(count):
            skip, pos = decode_varint(payload, pos)
            length, pos = decode_varint(payload, pos)
            start = previous + skip
            previous = start + length
            ranges.append((start, previous))
        nacks: list[int] = []
        if nack:
            if pos >= len(payload):
                raise PhoneProtocolError("ack block without its count of damaged frames")
            count = payload[pos]
            pos += 1
            for _ in range(count):
                offset, pos = decode_varint(payload, pos)
                nacks.append(cum + offset)
        return ranges, more, nacks, pos

    def _on_ack(
        self,
        cum: int,
        ranges: list[tuple[int, int]],
        more: bool,
        nacks: list[int],
        now: float,
    ) -> None:
        if cum < self._snd_una:
            return  # older than one already seen
        if cum > self._snd_nxt or (ranges and ranges[-1][1] > self._snd_nxt):
            raise PhoneProtocolError("peer acknowledged data that was never sent")
        self._on_nacks(nacks)
        segments = self._segments
        newly: list[_Segment] = []  # acknowledged by this ack and not before
        delivered = 0
        if cum > self._snd_una:
            done = 0
            while done < len(segments) and segments[done].end <= cum:
                if not segments[done].sacked:
                    newly.append(segments[done])
                done += 1
            del segments[:done]
            if segments and segments[0].start < cum:
                if not segments[0].sacked:
                    delivered += cum - segments[0].start
                segments[0].start = cum
            del self._out[: cum - self._snd_una]
            self._snd_una = cum
        index = 0
        for start, end in ranges:
            while index < len(segments) and segments[index].end <= start:
                index += 1
            while index < len(segments) and segments[index].end <= end:
                segment = segments[index]
                if segment.start >= start and not segment.sacked:
                    segment.sacked = True
                    segment.lost = False
                    newly.append(segment)
                index += 1
        if not (newly or delivered):
            return
        delivered += sum(segment.end - segment.start for segment in newly)
        # Which copy of a resent frame arrived is unknown (an earlier one may still have
        # been on its way), so a frame counts as sent when first sent: the evidence
        # against frames last sent before it.  Samples come from frames sent once (Karn).
        self._progress_at = now
        self._rate.on_delivered(delivered, now)
        evidence = max(segment.first_xmit for segment in newly) if newly else 0
        self._delivered_xmit = max(self._delivered_xmit, evidence)
        sampled = max(
            (seg for seg in newly if not seg.resent), key=lambda seg: seg.xmit, default=None
        )
        if sampled is not None:
            self._rate.sample(
                sampled.send_state,
                sampled.sent_at,
                now,
                app_limited=sampled.app_limited,
                round_trip=self._round_trip,
            )
            self._round_trip.sample(now - sampled.sent_at, self._max_rto(), clean=sampled.clean)
        # With ranges left out, what lies beyond the last one listed may be held.
        known = ranges[-1][1] if more and ranges else (cum if more else None)
        run = False
        for segment in segments:
            if known is not None and segment.end > known:
                break
            if not (segment.sacked or segment.lost) and segment.xmit < self._delivered_xmit:
                segment.lost = True
                if not run:
                    self._note_loss()
                run = True
            else:
                run = False
        outstanding = any(not segment.sacked for segment in segments)
        self._rto_deadline = now + self._round_trip.rto if outstanding else None
        self._probe_deadline = None
        if outstanding and self._snd_nxt == self._snd_una + len(self._out):
            self._arm_probe(now)

    def _on_nacks(self, starts: list[int]) -> None:
        """The peer got the frames starting at ``starts`` damaged: resend them now."""
        segments = self._segments
        for start in starts:
            index = bisect_right(segments, start, key=lambda segment: segment.start) - 1
            if index < 0 or segments[index].start != start:
                continue  # resent in other pieces since, or a header damaged unseen
            segment = segments[index]
            if not (segment.sacked or segment.lost):
                segment.lost = True
                self._note_loss()

    def _arm_probe(self, now: float) -> None:
        """Resend the last frame if its acknowledgement is late: the tail has no later
        frame whose acknowledgement would show it lost, and the timeout is long."""
        delay = self._round_trip.probe_delay()
        if delay is not None:
            self._probe_deadline = now + delay

    def _flight_limit(self) -> int:
        """How many bytes may be in flight (sent, neither acknowledged nor known lost).

        What the line carries in :data:`FLIGHT_TIME` or in two of its shortest round
        trips (whichever is longer), at the best recent delivery rate: enough to keep it
        busy, while what waits in the driver's transport, the kernel or a modem stays
        bounded, so that acknowledgements riding behind it and resent frames are not
        held up for seconds.  The shortest round trip of a frame sent on an idle line is
        used (usually from the handshake, before queues formed): a round trip that
        includes the peer's own queue would let both ends' queues feed each other.  At least
        :data:`INITIAL_FLIGHT` while starting up: the first samples (a frame over a
        whole round trip) are far below the line's rate.
        """
        window = self._params.window
        floor = INITIAL_FLIGHT if self._rate.starting else 4 * self._frame_data
        rate, min_rtt = self._rate.best, self._round_trip.min_rtt
        if rate is None:
            return min(window, floor)
        span = FLIGHT_TIME if min_rtt is None else max(FLIGHT_TIME, 2.0 * min_rtt + ACK_DELAY)
        limit = rate * span + 2 * self._frame_data
        return min(window, max(floor, int(limit)))

    def _in_flight(self) -> int:
        return sum(
            segment.end - segment.start
            for segment in self._segments
            if not (segment.sacked or segment.lost)
        )

    def _max_rto(self) -> float:
        """The timeout's ceiling: a few tries fit in ``dead_after`` however long the wait.

        A serial line has no congestion to back off from: losses are noise, and the
        doubling only guards against a timeout that was too short.
        """
        return min(MAX_RTO, self._params.dead_after / 4.0)

    def _note_loss(self) -> None:
        """Count a loss for the damage estimate (the callers count a run of consecutive
        frames lost once: a line gone quiet says nothing of how often bytes are hit)."""
        self._damage.lost()
        self._adapt_frame_size()

    def _adapt_frame_size(self) -> None:
        params = self._params
        self._frame_data = self._damage.frame_data(
            params.min_frame_payload, params.max_frame_payload
        )

    def _on_data(self, seq: int, data: bytes, now: float, *, push: bool) -> None:
        if not data:
            return
        start = unwrap_seq(seq, self._rcv_nxt)
        end = start + len(data)
        window_end = self._rcv_nxt + self._params.window
        if end <= self._rcv_nxt:
            self._owe_ack(now, 0, at_once=True)  # a duplicate: our acknowledgement was lost
            return
        if start >= window_end or self._undelivered >= self._params.window:
            return  # no room: the peer will send it again
        if end > window_end:
            data = data[: window_end - start]
        if start > self._rcv_nxt:
            self._hold(start, data)
            self._owe_ack(now, len(data), at_once=True)  # out of order: report the gap now
            return
        self._deliver(data[self._rcv_nxt - start :])
        filled = False
        while self._held and self._held[0][0] <= self._rcv_nxt:
            held_start, held = self._held.pop(0)
            filled = True
            if held_start + len(held) > self._rcv_nxt:
                self._deliver(held[self._rcv_nxt - held_start :])
        self._owe_ack(now, len(data), at_once=filled or push)

    def _on_damaged(self, start: int, now: float) -> None:
        """A frame starting at ``start`` arrived damaged: ask for it at once."""
        if not self._rcv_nxt <= start < self._rcv_nxt + self._params.window:
            return
        index = bisect_right(self._held, start, key=lambda piece: piece[0]) - 1
        if index >= 0 and start < self._held[index][0] + len(self._held[index][1]):
            return  # held already
        if start not in self._nacks and len(self._nacks) < MAX_NACKS:
            self._nacks.append(start)
            self._owe_ack(now, 0, at_once=True)

    def _hold(self, start: int, data: bytes) -> None:
        """Keep the bytes of ``data`` (at ``start``, beyond a gap) not held yet."""
        held = self._held
        end = start + len(data)
        index = bisect_right(held, start, key=lambda piece: piece[0])
        position = start
        if index:
            before_start, before = held[index - 1]
            position = max(position, before_start + len(before))
        pieces: list[tuple[int, bytes]] = []
        while position < end:
            if index < len(held) and held[index][0] < end:
                next_start, next_data = held[index]
                if next_start > position:
                    pieces.append((position, data[position - start : next_start - start]))
                position = max(position, next_start + len(next_data))
                index += 1
            else:
                pieces.append((position, data[position - start :]))
                position = end
        for piece in pieces:
            held.insert(bisect_right(held, piece[0], key=lambda p: p[0]), piece)

    def _deliver(self, data: bytes) -> None:
        self._rcv_nxt += len(data)
        for record in self._reader.feed(data):
            self._events.append(RecordReceived(record))
            self._undelivered += len(record)
            self._payload_received += len(record)

    def _owe_ack(self, now: float, size: int, *, at_once: bool) -> None:
        if not self._ack_owed:
            self._ack_owed = True
            self._ack_owed_since = now
        self._ack_now = self._ack_now or at_once
        self._bytes_unacked += size

    def _die(self, reason: str) -> None:
        if self._dead:
            return
        self._dead = True
        self._events.append(LinkDead(reason))
        self._out.clear()
        self._segments.clear()
        self._held.clear()
        self._rto_deadline = None
        self._probe_deadline = None

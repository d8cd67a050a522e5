"""The pure parts of the line emulator: when each byte arrives, and which bits flip.

Theory of operation.  A serial line carries one direction's bytes one after another at
the bit rate (10 line bits per byte: start, 8 data, stop), so each direction is a FIFO:
a byte that enters while the line is busy waits for the bytes ahead of it.  A byte is
delivered at the far end ``latency`` seconds after its last bit left.  Times are
computed from the start of a *burst* (the moment the line went from idle to busy) as
``start + n * byte_time`` for the burst's n-th byte, never by adding up waits, so a late
wake-up of the process moving the bytes does not push every later byte back.

Bit errors hit the 8 data bits of each byte independently with probability ``ber``.
The gaps between flipped bits are drawn from a geometric distribution by a seeded
generator, and the position in the stream is carried across calls, so which bits flip
depends only on the seed and the stream position, never on how the stream was chunked.

Nothing here reads a clock or touches a file descriptor: ``now`` is passed in.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

BITS_PER_BYTE = 10  # start bit, 8 data bits, stop bit
DATA_BITS = 8


def byte_time(rate: int) -> float:
    """Seconds one byte occupies a line of ``rate`` bit/s."""
    if rate <= 0:
        raise ValueError(f"bit rate must be positive, not {rate}")
    return BITS_PER_BYTE / rate


class BitFlipper:
    """Flips data bits of a byte stream at a bit-error rate, reproducibly from a seed."""

    def __init__(self, ber: float, seed: int | str) -> None:
        if not 0.0 <= ber < 1.0:
            raise ValueError(f"bit-error rate must be in [0, 1), not {ber}")
        self.ber = ber
        self._random = random.Random(seed)
        self._position = 0  # data bits of the stream seen so far
        self._next_error = self._draw_gap()  # stream bit index of the next flip
        self.flipped = 0

    def _draw_gap(self) -> float:
        """Bits from here to the next flipped one (geometric); infinity without errors."""
        if self.ber == 0.0:
            return math.inf
        uniform = 1.0 - self._random.random()  # in (0, 1]
        return math.floor(math.log(uniform) / math.log1p(-self.ber))

    def apply(self, data: bytes) -> bytes:
        """``data`` as it arrives after the line's bit errors."""
        end = self._position + len(data) * DATA_BITS
        if self._next_error >= end:
            self._position = end
            return data
        damaged = bytearray(data)
        while self._next_error < end:
            offset = int(self._next_error) - self._position
            damaged[offset // DATA_BITS] ^= 1 << (offset % DATA_BITS)
            self.flipped += 1
            self._next_error += 1 + self._draw_gap()
        self._position = end
        return bytes(damaged)


@dataclass
class _Chunk:
    """Bytes that entered the line together; ``first`` is the burst index of data[0]."""

    data: bytes
    burst_start: float
    first: int


class Direction:
    """One direction of the line: a FIFO at the bit rate followed by a fixed latency."""

    def __init__(self, rate: int, latency: float, flipper: BitFlipper) -> None:
        if latency < 0:
            raise ValueError(f"latency must not be negative, not {latency}")
        self.byte_time = byte_time(rate)
        self.latency = latency
        self.flipper = flipper
        self._chunks: deque[_Chunk] = deque()
        self._burst_start = -math.inf
        self._burst_bytes = 0  # bytes scheduled in the current burst
        self.accepted = 0  # bytes that entered the line
        self.delivered = 0  # bytes handed out by ``take_due``

    def _line_free(self) -> float:
        """When the last scheduled byte's last bit leaves the sender."""
        return self._burst_start + self._burst_bytes * self.byte_time

    def accept(self, data: bytes, now: float) -> None:
        """``data`` enters the line at ``now`` behind whatever is still being sent."""
        if not data:
            return
        if now >= self._line_free():  # the line was idle: a new burst starts now
            self._burst_start = now
            self._burst_bytes = 0
        self._chunks.append(_Chunk(self.flipper.apply(data), self._burst_start, self._burst_bytes))
        self._burst_bytes += len(data)
        self.accepted += len(data)

    def unsent(self, now: float) -> int:
        """Bytes accepted whose last bit has not left the sender by ``now`` (the UART's queue)."""
        left = self._line_free() - now
        if left <= 0:
            return 0
        return min(self._burst_bytes, math.ceil(left / self.byte_time - 1e-9))

    def arrival(self, burst_start: float, index: int) -> float:
        """When the burst's ``index``-th byte (0-based) reaches the far end."""
        return burst_start + (index + 1) * self.byte_time + self.latency

    def next_arrival(self) -> float | None:
        """When the next byte not yet taken reaches the far end, or None when none is left."""
        if not self._chunks:
            return None
        head = self._chunks[0]
        return self.arrival(head.burst_start, head.first)

    def take_due(self, now: float, limit: int | None = None) -> bytes:
        """The bytes that have reached the far end by ``now`` (at most ``limit``), in order."""
        out: list[bytes] = []
        room = math.inf if limit is None else limit
        while self._chunks and room > 0:
            head = self._chunks[0]
            elapsed = now - self.latency - head.burst_start
            arrived = math.floor(elapsed / self.byte_time + 1e-9) - head.first
            count = int(min(arrived, len(head.data), room))
            if count <= 0:
                break
            out.append(head.data[:count])
            room -= count
            if count == len(head.data):
                self._chunks.popleft()
            else:
                self._chunks[0] = _Chunk(head.data[count:], head.burst_start, head.first + count)
                break
        taken = b"".join(out)
        self.delivered += len(taken)
        return taken

    def discard(self) -> int:
        """Forget everything in flight (the line dropped); returns how many bytes were lost."""
        lost = sum(len(chunk.data) for chunk in self._chunks)
        self._chunks.clear()
        return lost

    @property
    def in_flight(self) -> int:
        """Bytes accepted and not yet taken."""
        return self.accepted - self.delivered

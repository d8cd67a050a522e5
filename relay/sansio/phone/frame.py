"""Frames on an 8-bit byte stream: a marker, a checked header, the payload, a CRC-32.

Theory of operation
-------------------
A serial line delivers a stream of bytes with nothing to say where a packet starts, and
with whatever else shares the line: modem result codes, a login prompt, noise that
flipped or dropped bytes.  A frame is::

    +------+------+--------+-----+--------+---------------------+--------+
    |  F5  | kind | length | seq | hcheck | payload (whitened)  | CRC-32 |
    |  1   |  1   |   2    |  3  |   2    |      length         |   4    |
    +------+------+--------+-----+--------+---------------------+--------+

all integers big-endian, :data:`FRAME_OVERHEAD` bytes around the payload (every byte
counts: at a bit error rate of 1e-5 the best frames carry only a few hundred bytes).

* The **marker** ``F5`` is a byte that never occurs in UTF-8 or ASCII text, so chatter
  and prompts cannot look like the start of a frame.  It is not escaped inside
  payloads: stuffing costs line capacity on exactly the data that needs it most
  (compressed or encrypted text, where every value is equally likely).
* ``seq`` has :data:`SEQ_BITS` bits; the link reads it as the value nearest to the one
  it expects, which its window keeps unambiguous.
* The **header check** is CRC-16/CCITT over kind, length and seq.  A frame whose length
  was damaged is recognised as soon as its header is in, and the decoder looks for the
  next marker one byte further on, instead of waiting out a length that never was.  A
  random marker inside garbage (one byte in 256) passes the header check once in
  65 536 tries.
* The **CRC-32** covers the header and the payload as sent by the peer, so any damage
  the header check let through is still caught.  A frame that fails it is dropped and
  the search for a marker resumes one byte after the failed one: if the damage was a
  truncation, the next frame starts inside what was taken for this one's payload.
* **Whitening.**  Searching inside a damaged frame's payload is safe only if the payload
  cannot hold a valid frame of its own, and it could: a record may carry a captured
  trace of this very protocol.  So the payload is XORed with a fixed pseudo-random
  keystream starting at ``seq`` (mod 65 536) before it goes out.  Whitening costs no
  bytes, a frame tucked inside a record no longer appears on the wire, and random-looking
  data stays random-looking.  It is not secrecy (the keystream is public).

A frame whose header passed its check but whose CRC-32 failed was really sent (a random
header passes once in 65 536), so its header is kept for the link to ask for it again at
once (:meth:`FrameDecoder.take_damaged`): the quickest news of a loss there is, and the
only one for the last frame of a burst.

``kind`` and ``seq`` mean nothing here; the link (:mod:`relay.sansio.phone.link`) gives
them their meaning.  :class:`FrameDecoder` never raises on input, skips and counts what
is not a frame, and holds at most one frame's worth of bytes (:attr:`FrameDecoder.limit`)
whatever it is fed.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FRAME_OVERHEAD",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "SEQ_BITS",
    "SEQ_MODULUS",
    "SYNC",
    "DamagedHeader",
    "Frame",
    "FrameDecoder",
    "encode_frame",
]

SYNC: Final = b"\xf5"
"""The marker before every frame: a byte that is never part of UTF-8 text."""

SEQ_BITS: Final = 24
SEQ_MODULUS: Final = 1 << SEQ_BITS
"""Frames carry ``seq`` modulo this."""

_HEADER: Final = struct.Struct(">BHHB")  # kind, length, seq (high 16 bits, low 8 bits)
_HCHECK: Final = struct.Struct(">H")
_CRC: Final = struct.Struct(">I")

HEADER_SIZE: Final = len(SYNC) + _HEADER.size + _HCHECK.size
"""Marker, kind, length, seq and header check: the bytes before the payload."""

FRAME_OVERHEAD: Final = HEADER_SIZE + _CRC.size
"""Bytes a frame adds to its payload."""

MAX_PAYLOAD: Final = 16 * 1024 + 512
"""The largest payload any frame may carry: the link's largest data plus its ack block.

A protocol constant rather than a setting, so that a decoder accepts a peer's frames
before the two sides have agreed on anything, and so that a damaged length that slipped
past the header check can make the decoder wait for at most this many bytes.
"""

_KEYSTREAM_SPAN: Final = 1 << 16
_KEYSTREAM: Final = hashlib.shake_128(b"relay phone frame whitening").digest(
    _KEYSTREAM_SPAN + MAX_PAYLOAD
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as the link sees it: a kind, a 32-bit sequence field and the payload."""

    kind: int
    seq: int
    payload: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.kind <= 0xFF:
            raise ValueError(f"frame kind {self.kind} is not a byte")
        if not 0 <= self.seq < SEQ_MODULUS:
            raise ValueError(f"frame seq {self.seq} does not fit {SEQ_BITS} bits")
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"frame payload of {len(self.payload)} bytes > {MAX_PAYLOAD}")


@dataclass(frozen=True, slots=True)
class DamagedHeader:
    """The header of a frame that arrived damaged (its header checked, its CRC did not)."""

    kind: int
    seq: int
    length: int


_DAMAGED_KEPT: Final = 64


def _whiten(payload: bytes | bytearray, seq: int) -> bytes:
    """XOR ``payload`` with the keystream from ``seq``; its own inverse."""
    size = len(payload)
    if not size:
        return b""
    start = seq % _KEYSTREAM_SPAN
    key = int.from_bytes(_KEYSTREAM[start : start + size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


def _header(kind: int, length: int, seq: int) -> bytes:
    fields = _HEADER.pack(kind, length, seq >> 8, seq & 0xFF)
    return fields + _HCHECK.pack(binascii.crc_hqx(fields, 0xFFFF))


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``: marker, checked header, whitened payload, CRC-32."""
    header = _header(frame.kind, len(frame.payload), frame.seq)
    crc = zlib.crc32(frame.payload, zlib.crc32(header))
    return b"".join((SYNC, header, _whiten(frame.payload, frame.seq), _CRC.pack(crc)))


class FrameDecoder:
    """Finds frames in a byte stream; skips and counts everything else; never raises.

    Counters, for the link's statistics: :attr:`garbage_bytes` (bytes that were not part
    of a good frame, damaged frames included), :attr:`bad_headers` (markers followed by a
    header that failed its check: line noise, or a frame whose header was hit) and
    :attr:`bad_checksums` (frames whose header was good and whose CRC-32 was not).
    """

    limit: Final = HEADER_SIZE + MAX_PAYLOAD + _CRC.size
    """The most bytes the decoder holds between calls: one frame's worth."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._damaged: list[DamagedHeader] = []
        self.garbage_bytes = 0
        self.bad_headers = 0
        self.bad_checksums = 0

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame (at most :attr:`limit`)."""
        return len(self._buffer)

    def take_damaged(self) -> list[DamagedHeader]:
        """The headers of damaged frames since the last call (the latest few), in order."""
        damaged, self._damaged = self._damaged, []
        return damaged

    def feed(self, data: bytes) -> list[Frame]:
        """Take bytes from the line; return the good frames they completed, in order."""
        frames: list[Frame] = []
        view = memoryview(data)
        for start in range(0, len(view), self.limit):
            self._buffer += view[start : start + self.limit]
            self._scan(frames)
        return frames

    def _skip(self, count: int) -> None:
        self.garbage_bytes += count
        del self._buffer[:count]

    def _scan(self, frames: list[Frame]) -> None:
        buffer = self._buffer
        while buffer:
            found = buffer.find(SYNC)
            if found < 0:
                # Keep a trailing first marker byte: its second byte may come next.
                self._skip(len(buffer) - (buffer[-1] == SYNC[0]))
                return
            if found:
                self._skip(found)
            if len(buffer) < HEADER_SIZE:
                return
            fields = buffer[len(SYNC) : HEADER_SIZE - _HCHECK.size]
            kind, length, seq_high, seq_low = _HEADER.unpack(fields)
            seq = seq_high << 8 | seq_low
            (check,) = _HCHECK.unpack_from(buffer, HEADER_SIZE - _HCHECK.size)
            if check != binascii.crc_hqx(fields, 0xFFFF) or length > MAX_PAYLOAD:
                self.bad_headers += 1
                self._skip(1)
                continue
            end = HEADER_SIZE + length + _CRC.size
            if len(buffer) < end:
                return
            payload = _whiten(buffer[HEADER_SIZE : HEADER_SIZE + length], seq)
            header = buffer[len(SYNC) : HEADER_SIZE]
            (crc,) = _CRC.unpack_from(buffer, end - _CRC.size)
            if crc != zlib.crc32(payload, zlib.crc32(header)):
                self.bad_checksums += 1
                self._damaged.append(DamagedHeader(kind, seq, length))
                del self._damaged[:-_DAMAGED_KEPT]
                self._skip(1)
                continue
            frames.append(Frame(kind, seq, payload))
            del buffer[:end]

"""The framing of the spool's log: how records are cut out of a segment file.

Theory of operation
-------------------
A segment is a plain sequence of records, each a fixed 20-byte header and a payload::

    magic   4 bytes  b"\\x89RQ1"  (a high byte first, like PNG, so text tools see binary)
    type    1 byte   RecordType
    flags   1 byte   0 (reserved)
    spare   2 bytes  0 (reserved)
    length  4 bytes  payload length, big-endian
    crc     4 bytes  CRC-32 (zlib) of the payload
    hcrc    4 bytes  CRC-32 of the 16 bytes before it

The header has a checksum of its own so that a reader can tell a damaged *payload*
(the header is sound, so its length is true and the next record starts right after it)
from a damaged *header* (the length cannot be trusted, so nothing after it in the segment
can be found safely).  Recovery quarantines the first and skips it; for the second it
quarantines the rest of the segment.

Decoding never raises, whatever the bytes: :func:`read_at` answers a :class:`Record`, a
:class:`Damage` or a :class:`Truncated`, and :func:`scan` walks a buffer with it.  The
payloads' meaning lives in :mod:`relay.queue.payload`; this module only frames bytes.
"""

from __future__ import annotations

import enum
import mmap
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "Damage",
    "Record",
    "RecordType",
    "ScanResult",
    "Truncated",
    "encode",
    "encode_parts",
    "find_next_record",
    "payload_of",
    "read_at",
    "scan",
]

MAGIC = b"\x89RQ1"
_HEADER = struct.Struct(">4sBBHII")  # magic, type, flags, spare, length, payload crc
_HCRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _HCRC.size  # 20
MAX_PAYLOAD = (1 << 31) - 1  # a plausible length; anything larger is a damaged header

Buffer = bytes | bytearray | memoryview


class RecordType(enum.IntEnum):
    """What a record says; the payload formats are in :mod:`relay.queue.payload`."""

    MESSAGE = 1  # a new message: queue id, envelope, text
    STATUS = 2  # the full recipient states of one message
    DONE = 3  # the message is gone (all recipients final, or removed)


@dataclass(frozen=True, slots=True)
class Record:
    """A sound record found at ``offset``: its type and where its payload lies."""

    type: int
    offset: int
    length: int
    crc: int

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the buffer."""
        return self.offset + HEADER_SIZE

    @property
    def end(self) -> int:
        """Where the next record starts."""
        return self.offset + HEADER_SIZE + self.length


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes at ``offset`` that are not a sound record.

    ``resume`` is where the next record starts when the header was sound (only the
    payload is bad), or None when the header itself is damaged and nothing after it
    can be trusted.
    """

    offset: int
    resume: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Truncated:
    """The buffer ends inside the record at ``offset`` (a torn tail, or a cut)."""

    offset: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What :func:`scan` found: the sound records in order, and why it stopped."""

    records: tuple[Record, ...]
    stop: Damage | Truncated | None  # None: the buffer ended exactly after a record
    damaged: tuple[Damage, ...]  # damaged payloads that were skipped on the way


def encode(record_type: RecordType, payload: bytes) -> bytes:
    """One record as bytes, ready to append."""
    buffers, _ = encode_parts(record_type, [payload])
    return b"".join(buffers)


def encode_parts(record_type: RecordType, parts: Sequence[Buffer]) -> tuple[list[Buffer], int]:
    """One record as buffers (header first, so a big text is never copied) and its CRC."""
    length = 0
    crc = 0
    for part in parts:
        length += len(part)
        crc = zlib.crc32(part, crc)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload too large: {length} octets")
    head = _HEADER.pack(MAGIC, int(record_type), 0, 0, length, crc)
    return [head + _HCRC.pack(zlib.crc32(head)), *parts], crc


def read_at(buf: Buffer, offset: int) -> Record | Damage | Truncated | None:
    """The record at ``offset``: None at the exact end of ``buf``; never raises."""
    size = len(buf)
    if offset >= size:
        return None
    if offset + HEADER_SIZE > size:
        # Too short for a header: a torn tail unless what is there is already wrong.
        tail = bytes(buf[offset:size])
        if not MAGIC.startswith(tail[: len(MAGIC)]):
            return Damage(offset, None, "bad magic")
        return Truncated(offset)
    magic, rtype, flags, spare, length, crc = _HEADER.unpack_from(buf, offset)
    (hcrc,) = _HCRC.unpack_from(buf, offset + _HEADER.size)
    if magic != MAGIC:
        return Damage(offset, None, "bad magic")
    if zlib.crc32(buf[offset : offset + _HEADER.size]) != hcrc:
        return Damage(offset, None, "bad header checksum")
    if flags != 0 or spare != 0 or length > MAX_PAYLOAD:
        return Damage(offset, None, "bad header fields")
    end = offset + HEADER_SIZE + length
    if end > size:
        return Truncated(offset)
    if zlib.crc32(buf[offset + HEADER_SIZE : end]) != crc:
        return Damage(offset, end, "bad payload checksum")
    return Record(rtype, offset, length, crc)


def scan(buf: Buffer, start: int = 0) -> ScanResult:
    """Every sound record from ``start`` on, skipping damaged payloads, until it must stop.

    It stops at the end of the buffer, at a damaged header (nothing after it can be
    found) or at a record the buffer cuts short.
    """
    records: list[Record] = []
    damaged: list[Damage] = []
    offset = start
    while True:
        found = read_at(buf, offset)
        if found is None:
            return ScanResult(tuple(records), None, tuple(damaged))
        if isinstance(found, Record):
            records.append(found)
            offset = found.end
        elif isinstance(found, Damage) and found.resume is not None:
            damaged.append(found)
            offset = found.resume
        else:
            return ScanResult(tuple(records), found, tuple(damaged))


def _searchable(buf: Buffer) -> Any:
    """Something with ``find``: the buffer itself, or the object (an mmap of the whole
    segment, in recovery) a view covers, rather than a copy of up to a segment's size."""
    if isinstance(buf, bytes | bytearray):
        return buf
    owner = buf.obj
    if isinstance(owner, bytes | bytearray | mmap.mmap) and buf.nbytes == len(owner):
        return owner
    return bytes(buf)


def find_next_record(buf: Buffer, start: int) -> int | None:
    """The offset of the first sound record at or after ``start``, if any.

    Used only to tell a torn tail (nothing sound follows) from damage in the middle of
    the last segment; it never decides where records are.
    """
    data = _searchable(buf)
    position: int = data.find(MAGIC, start)
    while position != -1:
        if isinstance(read_at(data, position), Record):
            return position
        position = data.find(MAGIC, position + 1)
    return None


def payload_of(buf: Buffer, record: Record) -> Buffer:
    """The payload bytes of a sound record."""
    return buf[record.payload_offset : record.end]

"""The framing of the spool's log: how records are cut out of a segment file.

Theory of operation
-------------------
A segment is a plain sequence of records, each a fixed 24-byte header and a payload::

    magic   4 bytes  b"\\x89RQ2"  (a high byte first, like PNG, so text tools see binary)
    type    1 byte   RecordType
    flags   1 byte   0 (reserved)
    spare   2 bytes  0 (reserved)
    length  4 bytes  payload length, big-endian
    crc     4 bytes  CRC-32 (zlib) of the payload
    tag     8 bytes  keyed BLAKE2b of the 16 bytes before it, the segment number and
                     the record's offset in the segment

The header has a check of its own so that a reader can tell a damaged *payload* (the
header is sound, so its length is true and the next record starts right after it) from
a damaged *header* (its length cannot be trusted).  After a damaged header the reader
*resynchronises*: the next record is the first position after it where a sound header
starts (:func:`find_next_record`), and only the bytes in between are lost.

That is safe only because a sound header cannot be forged.  The tag is keyed with the
spool's secret random key (:mod:`relay.queue.key`), which never leaves the spool, so the
bytes of a message body (chosen by whoever sent the mail) are never taken for a record,
however they were crafted; and it covers the record's own position, so even a genuine
header of this spool copied elsewhere (into a body, or another segment) is not sound
there.  A forgery succeeds with a chance of 2**-64 per candidate position.

Segments written before the spool had a key (format ``\\x89RQ1``, a 20-byte header
whose last field is an unkeyed CRC-32 of the 16 bytes before it) are still read, with a
:class:`Framing` whose ``key`` is None.  Their headers could be forged by a body, so in
them there is no resynchronisation: a damaged header costs the rest of that segment,
which recovery sets aside in ``quarantine/``.

Decoding never raises, whatever the bytes: :func:`read_at` answers a :class:`Record`, a
:class:`Damage` or a :class:`Truncated`, and :func:`scan` walks a buffer with it.  The
payloads' meaning lives in :mod:`relay.queue.payload`; this module only frames bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import mmap
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "LEGACY_HEADER_SIZE",
    "LEGACY_MAGIC",
    "MAGIC",
    "MAX_PAYLOAD",
    "Damage",
    "Framing",
    "Record",
    "RecordType",
    "ScanResult",
    "Truncated",
    "checksum",
    "encode",
    "find_next_record",
    "payload_of",
    "read_at",
    "scan",
]

MAGIC = b"\x89RQ2"
LEGACY_MAGIC = b"\x89RQ1"
KEY_SIZE = 32  # octets of the spool's key
_FIELDS = struct.Struct(">4sBBHII")  # magic, type, flags, spare, length, payload crc
_POSITION = struct.Struct(">QQ")  # segment, offset: what the tag binds the header to
_TAG_SIZE = 8
_LEGACY_HCRC = struct.Struct(">I")
HEADER_SIZE = _FIELDS.size + _TAG_SIZE  # 24
LEGACY_HEADER_SIZE = _FIELDS.size + _LEGACY_HCRC.size  # 20
MAX_PAYLOAD = (1 << 31) - 1  # a plausible length; anything larger is a damaged header

Buffer = bytes | bytearray | memoryview


class RecordType(enum.IntEnum):
    """What a record says; the payload formats are in :mod:`relay.queue.payload`."""

    MESSAGE = 1  # a new message: queue id, envelope, text
    STATUS = 2  # the full recipient states of one message
    DONE = 3  # the message is gone (all recipients final, or removed)


@dataclass(frozen=True, slots=True)
class Framing:
    """How the headers of one segment are made and checked.

    ``key`` is the spool's key, or None for a segment written before the spool had one
    (legacy: unkeyed CRC headers, read but never written by the relay, and never
    resynchronised in).
    """

    key: bytes | None = field(repr=False)  # a secret: kept out of logs and tracebacks
    segment: int

    @property
    def magic(self) -> bytes:
        """The first four octets of every header."""
        return LEGACY_MAGIC if self.key is None else MAGIC

    @property
    def header_size(self) -> int:
        """Octets of a header."""
        return LEGACY_HEADER_SIZE if self.key is None else HEADER_SIZE

    @property
    def resynchronises(self) -> bool:
        """Whether a sound header can be trusted to be one the spool wrote, at its place."""
        return self.key is not None

    def header(self, record_type: int, length: int, crc: int, offset: int) -> bytes:
        """The header of a record whose payload has ``length`` octets and CRC ``crc``."""
        fields = _FIELDS.pack(self.magic, record_type, 0, 0, length, crc)
        return fields + self._check(fields, offset)

    def _check(self, fields: Buffer, offset: int) -> bytes:
        if self.key is None:
            return _LEGACY_HCRC.pack(zlib.crc32(fields))
        signed = bytes(fields) + _POSITION.pack(self.segment, offset)
        return hashlib.blake2b(signed, digest_size=_TAG_SIZE, key=self.key).digest()

    def header_sound(self, buf: Buffer, offset: int) -> bool:
        """Whether the header check at ``offset`` (a whole header is there) holds."""
        end = offset + _FIELDS.size
        check = self._check(buf[offset:end], offset)
        return hmac.compare_digest(check, bytes(buf[end : end + len(check)]))


@dataclass(frozen=True, slots=True)
class Record:
    """A sound record found at ``offset``: its type and where its payload lies."""

    type: int
    offset: int
    payload_offset: int
    length: int
    crc: int

    @property
    def end(self) -> int:
        """Where the next record starts."""
        return self.payload_offset + self.length


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes at ``offset`` that are not a sound record.

    ``resume`` is where the next record starts when the header was sound (only the
    payload is bad), or None when the header itself is damaged and its length cannot
    be trusted.
    """

    offset: int
    resume: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Truncated:
    """The buffer ends inside the record at ``offset`` (a torn tail, or a cut).

    ``header_sound``: the whole header is there and sound, only the payload is cut short
    (False when the buffer ends inside the header itself).
    """

    offset: int
    header_sound: bool = False


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What :func:`scan` found: the sound records in order, and why it stopped."""

    records: tuple[Record, ...]
    stop: Damage | Truncated | None  # None: the buffer ended exactly after a record
    damaged: tuple[Damage, ...]  # damaged ranges skipped on the way (resume: their end)


def checksum(parts: Sequence[Buffer]) -> tuple[int, int]:
    """The length and CRC-32 of a payload given as buffers; ValueError if too long."""
    length = 0
    crc = 0
    for part in parts:
        length += len(part)
        crc = zlib.crc32(part, crc)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload too large: {length} octets")
    return length, crc


def encode(framing: Framing, record_type: RecordType, payload: bytes, offset: int) -> bytes:
    """One record as bytes, to be written at ``offset`` of ``framing``'s segment."""
    length, crc = checksum([payload])
    return framing.header(int(record_type), length, crc, offset) + payload


def read_at(buf: Buffer, offset: int, framing: Framing) -> Record | Damage | Truncated | None:
    """The record at ``offset``: None at the exact end of ``buf``; never raises."""
    size = len(buf)
    if offset >= size:
        return None
    magic = framing.magic
    header_size = framing.header_size
    if offset + header_size > size:
        # Too short for a header: a torn tail unless what is there is already wrong.
        tail = bytes(buf[offset:size])
        if not magic.startswith(tail[: len(magic)]):
            return Damage(offset, None, "bad magic")
        return Truncated(offset)
    found, rtype, flags, spare, length, crc = _FIELDS.unpack_from(buf, offset)
    if found != magic:
        return Damage(offset, None, "bad magic")
    if flags != 0 or spare != 0 or length > MAX_PAYLOAD:
        return Damage(offset, None, "bad header fields")
    if not framing.header_sound(buf, offset):
        return Damage(offset, None, "bad header check")
    end = offset + header_size + length
    if end > size:
        return Truncated(offset, header_sound=True)
    if zlib.crc32(buf[offset + header_size : end]) != crc:
        return Damage(offset, end, "bad payload checksum")
    return Record(rtype, offset, offset + header_size, length, crc)


def scan(buf: Buffer, framing: Framing, start: int = 0) -> ScanResult:
    """Every sound record from ``start`` on, skipping damage where it can, until it must stop.

    A damaged payload under a sound header is skipped; after a damaged header the scan
    resynchronises at the next sound header if ``framing`` allows it.  It stops at the
    end of the buffer, at a record the buffer cuts short, or at a damaged header it
    cannot get past.
    """
    records: list[Record] = []
    damaged: list[Damage] = []
    offset = start
    while True:
        found = read_at(buf, offset, framing)
        if found is None:
            return ScanResult(tuple(records), None, tuple(damaged))
        if isinstance(found, Record):
            records.append(found)
            offset = found.end
            continue
        resume = found.resume if isinstance(found, Damage) else None
        if resume is None and isinstance(found, Damage) and framing.resynchronises:
            resume = find_next_record(buf, offset + 1, framing)
        if resume is None:
            return ScanResult(tuple(records), found, tuple(damaged))
        assert isinstance(found, Damage)
        damaged.append(Damage(offset, resume, found.reason))
        offset = resume


def _searchable(buf: Buffer) -> Any:
    """Something with ``find``: the buffer itself, or the object (an mmap of the whole
    segment, in recovery) a view covers, rather than a copy of up to a segment's size."""
    if isinstance(buf, bytes | bytearray):
        return buf
    owner = buf.obj
    if isinstance(owner, bytes | bytearray | mmap.mmap) and buf.nbytes == len(owner):
        return owner
    return bytes(buf)


def find_next_record(buf: Buffer, start: int, framing: Framing) -> int | None:
    """The offset of the first sound header at or after ``start``, if any.

    For a keyed segment this is where resynchronisation resumes: a sound header is one
    the spool wrote at that very place, so its record (or its damaged payload) is real.
    For a legacy segment it asks for a whole sound record, and it only tells a torn
    tail (nothing sound follows) from damage in the middle of the last segment.
    """
    data = _searchable(buf)
    magic = framing.magic
    position: int = data.find(magic, start)
    while position != -1:
        found = read_at(data, position, framing)
        if isinstance(found, Record) or (
            framing.resynchronises and isinstance(found, Damage | Truncated) and _header_ok(found)
        ):
            return position
        position = data.find(magic, position + 1)
    return None


def _header_ok(found: Damage | Truncated) -> bool:
    """A read that got past the header check: a bad payload, or a payload cut short."""
    if isinstance(found, Truncated):
        return found.header_sound
    return found.resume is not None


def payload_of(buf: Buffer, record: Record) -> Buffer:
    """The payload bytes of a sound record."""
    return buf[record.payload_offset : record.end]

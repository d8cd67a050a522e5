"""The log's framing: records in, records out, and nothing but clean answers for garbage."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given
from hypothesis import strategies as st

from relay.queue.record import (
    HEADER_SIZE,
    MAGIC,
    Damage,
    Record,
    RecordType,
    Truncated,
    encode,
    find_next_record,
    payload_of,
    read_at,
    scan,
)

record_types = st.sampled_from(list(RecordType))
records = st.lists(st.tuples(record_types, st.binary(max_size=300)), max_size=12)


def _stream(items: list[tuple[RecordType, bytes]]) -> tuple[bytes, list[int]]:
    data = b""
    ends = []
    for rtype, payload in items:
        data += encode(rtype, payload)
        ends.append(len(data))
    return data, ends


@given(records)
def test_encoded_records_decode_to_the_same_types_and_payloads(
    items: list[tuple[RecordType, bytes]],
) -> None:
    """Every record written comes back, in order, with its type and payload."""
    data, _ = _stream(items)
    result = scan(data)
    assert result.stop is None and not result.damaged
    assert [(r.type, bytes(payload_of(data, r))) for r in result.records] == items


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=2100))
def test_any_bytes_give_a_clean_answer_never_an_exception(data: bytes, start: int) -> None:
    """Arbitrary bytes decode to records, a damage report or a truncation, never a raise."""
    result = scan(data, start)
    for record in result.records:
        assert record.end <= len(data)
    assert result.stop is None or isinstance(result.stop, Damage | Truncated)
    assert isinstance(read_at(data, start), Record | Damage | Truncated | type(None))
    find_next_record(data, start)


@given(records, st.data())
def test_a_stream_cut_anywhere_keeps_every_complete_record_before_the_cut(
    items: list[tuple[RecordType, bytes]], data: st.DataObject
) -> None:
    """Cutting a valid stream at any position recovers exactly the records that end before it."""
    stream, ends = _stream(items)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    result = scan(stream[:cut])
    complete = [e for e in ends if e <= cut]
    assert [r.end for r in result.records] == complete
    if cut not in ([0, *ends]):
        assert isinstance(result.stop, Truncated | Damage)


@given(records, st.data())
def test_a_flipped_bit_is_always_detected(
    items: list[tuple[RecordType, bytes]], data: st.DataObject
) -> None:
    """Any single bit flipped in a stream stops or damages a record; nothing decodes wrongly."""
    stream, _ = _stream(items)
    if not stream:
        return
    position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    damaged = bytearray(stream)
    damaged[position] ^= 1 << bit
    result = scan(bytes(damaged))
    assert result.stop is not None or result.damaged
    good = {(r.offset, r.type, bytes(payload_of(stream, r))) for r in scan(stream).records}
    for record in result.records:
        assert (record.offset, record.type, bytes(payload_of(damaged, record))) in good


def test_a_damaged_payload_is_skipped_and_the_next_record_still_read() -> None:
    """A bad payload checksum under a sound header is reported and scanning resumes after it."""
    first = bytearray(encode(RecordType.STATUS, b"first"))
    first[-1] ^= 0xFF
    stream = bytes(first) + encode(RecordType.DONE, b"second")
    result = scan(stream)
    assert [r.type for r in result.records] == [RecordType.DONE]
    assert result.damaged[0].reason == "bad payload checksum"
    assert result.stop is None


def test_a_damaged_header_stops_the_scan() -> None:
    """A header whose own checksum fails cannot be trusted for a length, so scanning stops."""
    first = bytearray(encode(RecordType.STATUS, b"first"))
    first[9] ^= 0x01  # inside the length field
    stream = bytes(first) + encode(RecordType.DONE, b"second")
    result = scan(stream)
    assert result.records == ()
    assert isinstance(result.stop, Damage) and result.stop.resume is None


def test_a_forged_length_with_a_matching_header_crc_is_refused_if_implausible() -> None:
    """A header claiming more than MAX_PAYLOAD octets is damage, even with a valid checksum."""
    head = struct.pack(">4sBBHII", MAGIC, 1, 0, 0, 0xFFFFFFFF, 0)
    data = head + struct.pack(">I", zlib.crc32(head))
    found = read_at(data, 0)
    assert isinstance(found, Damage) and found.reason == "bad header fields"


def test_header_size_is_the_documented_twenty_octets() -> None:
    """The on-disk header is 20 octets, as docs/spool.md describes."""
    assert HEADER_SIZE == 20
    assert len(encode(RecordType.DONE, b"")) == 20

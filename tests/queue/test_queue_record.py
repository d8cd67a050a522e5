"""The log's framing: records in, records out, and nothing but clean answers for garbage."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given
from hypothesis import strategies as st

from relay.queue.record import (
    HEADER_SIZE,
    KEY_SIZE,
    LEGACY_HEADER_SIZE,
    LEGACY_MAGIC,
    MAGIC,
    Damage,
    Framing,
    Record,
    RecordType,
    Truncated,
    encode,
    find_next_record,
    payload_of,
    read_at,
    scan,
)

KEY = bytes(range(KEY_SIZE))
KEYED = Framing(KEY, 7)
LEGACY = Framing(None, 7)

record_types = st.sampled_from(list(RecordType))
records = st.lists(st.tuples(record_types, st.binary(max_size=300)), max_size=12)
framings = st.sampled_from([KEYED, LEGACY])


def _stream(
    items: list[tuple[RecordType, bytes]], framing: Framing = KEYED
) -> tuple[bytes, list[int]]:
    """The records framed one after another from offset 0; and where each ends."""
    data = b""
    ends = []
    for rtype, payload in items:
        data += encode(framing, rtype, payload, len(data))
        ends.append(len(data))
    return data, ends


def _legacy_header(rtype: int, payload: bytes) -> bytes:
    """A header in the pre-key format, built by hand as an attacker (or an old relay) would."""
    head = struct.pack(">4sBBHII", LEGACY_MAGIC, rtype, 0, 0, len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head))


@given(records, framings)
def test_encoded_records_decode_to_the_same_types_and_payloads(
    items: list[tuple[RecordType, bytes]], framing: Framing
) -> None:
    """Every record written comes back, in order, with its type and payload."""
    data, _ = _stream(items, framing)
    result = scan(data, framing)
    assert result.stop is None and not result.damaged
    assert [(r.type, bytes(payload_of(data, r))) for r in result.records] == items


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=2100), framings)
def test_any_bytes_give_a_clean_answer_never_an_exception(
    data: bytes, start: int, framing: Framing
) -> None:
    """Arbitrary bytes decode to records, a damage report or a truncation, never a raise."""
    result = scan(data, framing, start)
    for record in result.records:
        assert record.end <= len(data)
    assert result.stop is None or isinstance(result.stop, Damage | Truncated)
    assert isinstance(read_at(data, start, framing), Record | Damage | Truncated | type(None))
    find_next_record(data, start, framing)


@given(records, framings, st.data())
def test_a_stream_cut_anywhere_keeps_every_complete_record_before_the_cut(
    items: list[tuple[RecordType, bytes]], framing: Framing, data: st.DataObject
) -> None:
    """Cutting a valid stream at any position recovers exactly the records that end before it."""
    stream, ends = _stream(items, framing)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    result = scan(stream[:cut], framing)
    complete = [e for e in ends if e <= cut]
    assert [r.end for r in result.records] == complete
    if cut not in ([0, *ends]):
        assert isinstance(result.stop, Truncated | Damage)


@given(records, st.data())
def test_a_flipped_bit_costs_only_the_record_it_is_in(
    items: list[tuple[RecordType, bytes]], data: st.DataObject
) -> None:
    """Any single bit flipped in a keyed stream damages one record; every other one is found."""
    stream, _ = _stream(items)
    if not stream:
        return
    position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    damaged = bytearray(stream)
    damaged[position] ^= 1 << bit
    result = scan(bytes(damaged), KEYED)
    assert result.stop is not None or result.damaged
    good = {(r.offset, r.type, bytes(payload_of(stream, r))) for r in scan(stream, KEYED).records}
    found = {(r.offset, r.type, bytes(payload_of(damaged, r))) for r in result.records}
    untouched = {
        item for item in good if not item[0] <= position < item[0] + HEADER_SIZE + len(item[2])
    }
    assert untouched <= found <= good
    assert len(found) == len(good) - 1


@given(records, st.data())
def test_a_flipped_bit_in_a_legacy_stream_never_decodes_wrongly(
    items: list[tuple[RecordType, bytes]], data: st.DataObject
) -> None:
    """Any single bit flipped in a legacy stream stops or damages a record, never misleads."""
    stream, _ = _stream(items, LEGACY)
    if not stream:
        return
    position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    damaged = bytearray(stream)
    damaged[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    result = scan(bytes(damaged), LEGACY)
    assert result.stop is not None or result.damaged
    good = {(r.offset, r.type, bytes(payload_of(stream, r))) for r in scan(stream, LEGACY).records}
    for record in result.records:
        assert (record.offset, record.type, bytes(payload_of(damaged, record))) in good


def test_a_damaged_payload_is_skipped_and_the_next_record_still_read() -> None:
    """A bad payload checksum under a sound header is reported and scanning resumes after it."""
    stream = bytearray(_stream([(RecordType.STATUS, b"first"), (RecordType.DONE, b"second")])[0])
    stream[HEADER_SIZE + 2] ^= 0xFF
    result = scan(bytes(stream), KEYED)
    assert [r.type for r in result.records] == [RecordType.DONE]
    assert result.damaged[0].reason == "bad payload checksum"
    assert result.stop is None


def test_a_damaged_header_is_resynchronised_past_in_a_keyed_stream() -> None:
    """After a header that fails its check, the scan resumes at the next sound header."""
    stream, ends = _stream([(RecordType.STATUS, b"first"), (RecordType.DONE, b"second")])
    damaged = bytearray(stream)
    damaged[9] ^= 0x01  # inside the length field
    result = scan(bytes(damaged), KEYED)
    assert [(r.offset, r.type) for r in result.records] == [(ends[0], RecordType.DONE)]
    assert result.damaged == (Damage(0, ends[0], "bad header check"),)
    assert result.stop is None


def test_a_damaged_header_stops_a_legacy_scan() -> None:
    """A legacy header cannot be told from a forgery, so scanning stops at a damaged one."""
    stream = bytearray(
        _stream([(RecordType.STATUS, b"first"), (RecordType.DONE, b"second")], LEGACY)[0]
    )
    stream[9] ^= 0x01
    result = scan(bytes(stream), LEGACY)
    assert result.records == ()
    assert isinstance(result.stop, Damage) and result.stop.resume is None


def test_a_header_with_the_right_crc_but_no_key_is_not_a_record() -> None:
    """A header an attacker can compute (CRC, or a tag with a guessed key) is never sound."""
    payload = b"forged"
    for forged in (
        _legacy_header(1, payload) + payload,
        encode(Framing(bytes(KEY_SIZE), 7), RecordType.MESSAGE, payload, 0),
        encode(Framing(None, 7), RecordType.MESSAGE, payload, 0),
    ):
        assert not isinstance(read_at(forged, 0, KEYED), Record)
        assert find_next_record(forged, 0, KEYED) is None


def test_a_genuine_header_is_sound_only_where_it_was_written() -> None:
    """A header copied to another offset or another segment is not sound there."""
    record = encode(KEYED, RecordType.DONE, b"x", 0)
    assert isinstance(read_at(record, 0, KEYED), Record)
    moved = b"\0" * 8 + record
    assert find_next_record(moved, 0, KEYED) is None
    assert not isinstance(read_at(record, 0, Framing(KEY, 8)), Record)


def test_a_forged_length_with_a_matching_legacy_crc_is_refused_if_implausible() -> None:
    """A legacy header claiming more than MAX_PAYLOAD octets is damage, whatever its check."""
    head = struct.pack(">4sBBHII", LEGACY_MAGIC, 1, 0, 0, 0xFFFFFFFF, 0)
    data = head + struct.pack(">I", zlib.crc32(head))
    found = read_at(data, 0, LEGACY)
    assert isinstance(found, Damage) and found.reason == "bad header fields"


def test_header_sizes_are_the_documented_ones() -> None:
    """Keyed headers are 24 octets and legacy ones 20, as docs/spool.md describes."""
    assert (HEADER_SIZE, LEGACY_HEADER_SIZE) == (24, 20)
    assert len(encode(KEYED, RecordType.DONE, b"", 0)) == 24
    assert len(encode(LEGACY, RecordType.DONE, b"", 0)) == 20
    assert encode(KEYED, RecordType.DONE, b"", 0).startswith(MAGIC)


def test_the_key_never_shows_in_a_repr() -> None:
    """A framing printed in a log line or a traceback does not give the spool's key away."""
    assert KEY.hex() not in repr(KEYED) and repr(KEY) not in repr(KEYED)

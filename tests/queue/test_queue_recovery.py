"""Recovery at start: torn tails cut, damage quarantined and counted, the rest always loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from relay.envelope import RecipientState, RecipientStatus
from relay.errors import SpoolError
from relay.queue.key import SpoolKey, open_key
from relay.queue.layout import SpoolLayout
from relay.queue.payload import (
    encode_done,
    encode_envelope,
    encode_message_prefix,
    encode_status,
)
from relay.queue.record import Framing, RecordType, encode
from relay.queue.recovery import recover

from queue_helpers import make_envelope, open_queue, read_all, scan_segment

Item = tuple[RecordType, bytes]


def _qid(n: int) -> str:
    return f"{n:014X}"


def _message(n: int, text: bytes = b"text", recipients: int = 1) -> Item:
    envelope = encode_envelope(make_envelope(recipients, arrival=1000.0 + n))
    return RecordType.MESSAGE, encode_message_prefix(_qid(n), envelope) + text


class _Segment:
    """A segment's bytes framed with the spool's key, and where each record starts."""

    def __init__(self, key: SpoolKey | None, number: int, *items: Item) -> None:
        framing = Framing(None, number) if key is None else key.framing(number)
        self.data = bytearray()
        self.starts: list[int] = []
        for rtype, payload in items:
            self.starts.append(len(self.data))
            self.data += encode(framing, rtype, payload, len(self.data))

    def record(self, index: int) -> tuple[int, int]:
        """The (start, end) of record ``index``."""
        ends = [*self.starts[1:], len(self.data)]
        return self.starts[index], ends[index]


def _spool(root: Path, *segments: list[Item]) -> tuple[SpoolLayout, list[_Segment]]:
    """A keyed spool whose segments 1, 2… hold ``segments`` (not yet written to disk)."""
    layout = SpoolLayout(root)
    layout.make_dirs()
    key = open_key(layout)
    return layout, [_Segment(key, n, *items) for n, items in enumerate(segments, start=1)]


def _write(layout: SpoolLayout, segments: list[_Segment]) -> None:
    for number, segment in enumerate(segments, start=1):
        layout.segment_path(number).write_bytes(bytes(segment.data))


def _write_segments(root: Path, *segments: list[Item]) -> SpoolLayout:
    layout, built = _spool(root, *segments)
    _write(layout, built)
    return layout


def _snapshot(layout: SpoolLayout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.log_dir.iterdir())}


class _Logged:
    """Collects the text of log events while in a with block."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format") or ""
        self.events.append(event)
        self.lines.append(fmt.format(**event) if fmt else "")

    def __enter__(self) -> _Logged:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def test_a_torn_tail_of_the_last_segment_is_cut_off(tmp_path: Path) -> None:
    """Half a record at the end of the last segment is truncated, not quarantined."""
    layout, [segment] = _spool(tmp_path, [_message(1), _message(2), _message(3, b"x" * 100)])
    whole = segment.starts[2]
    layout.segment_path(1).write_bytes(bytes(segment.data[:-40]))
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(2)]
    assert found.torn_tails == 1 and found.quarantined == []
    assert layout.segment_path(1).stat().st_size == whole == found.end_offset
    assert list(layout.quarantine_dir.iterdir()) == []


def test_a_read_only_look_changes_nothing(tmp_path: Path) -> None:
    """Recovery without repair reports a torn tail but leaves the file as it was."""
    layout, [segment] = _spool(tmp_path, [_message(1), _message(2)])
    data = bytes(segment.data[:-5])
    layout.segment_path(1).write_bytes(data)
    found = recover(layout, repair=False)
    assert found.torn_tails == 1
    assert layout.segment_path(1).read_bytes() == data


def test_the_last_segment_cut_at_any_position_keeps_every_whole_record(tmp_path: Path) -> None:
    """Whatever octet a crash stops at, every message written completely before it is loaded."""
    items = [_message(i, bytes([i]) * (37 * i)) for i in range(1, 7)]
    base, [segment] = _spool(tmp_path / "base", items)
    ends = [segment.record(i)[1] for i in range(len(items))]
    for cut in range(0, len(segment.data) + 1, 7):
        layout = SpoolLayout(tmp_path / str(cut))
        layout.make_dirs()
        shutil.copyfile(base.key_path, layout.key_path)
        layout.segment_path(1).write_bytes(bytes(segment.data[:cut]))
        found = recover(layout)
        assert len(found.state.messages) == sum(1 for e in ends if e <= cut)
        assert found.quarantined == []


def test_a_bad_checksum_in_an_older_segment_is_quarantined_and_the_rest_loads(
    tmp_path: Path,
) -> None:
    """A damaged record in an older segment goes to quarantine/ with a log line; others load."""
    layout, segments = _spool(tmp_path, [_message(1), _message(2), _message(3)], [_message(4)])
    start, end = segments[0].record(1)
    segments[0].data[end - 2] ^= 0x40
    _write(layout, segments)
    with _Logged() as logged:
        found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3), _qid(4)]
    [item] = found.quarantined
    assert (item.segment, item.offset, item.length) == (1, start, end - start)
    assert item.path is not None and item.path.read_bytes() == segments[0].data[start:end]
    assert item.path.name == (
        f"0000000001-{start:012d}-{end - start:012d}-bad-payload-checksum.bad"
    )
    assert any("quarantined" in line and "segment 1" in line for line in logged.lines)


@pytest.mark.parametrize("field", [0, 4, 5, 9, 13, 17, 23], ids=lambda f: f"octet{f}")
def test_a_flipped_header_octet_in_the_middle_costs_only_its_record(
    tmp_path: Path, field: int
) -> None:
    """A damaged header mid-segment quarantines exactly its record; every other message loads."""
    items = [_message(n, bytes([n]) * 50 * n) for n in range(1, 6)]
    layout, segments = _spool(tmp_path, items, [_message(6)])
    start, end = segments[0].record(2)
    original = bytes(segments[0].data)
    segments[0].data[start + field] ^= 0x01
    _write(layout, segments)
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(n) for n in (1, 2, 4, 5, 6)]
    [item] = found.quarantined
    assert (item.segment, item.offset, item.length) == (1, start, end - start)
    assert item.path is not None and item.path.read_bytes() == segments[0].data[start:end]
    assert layout.segment_path(1).read_bytes() == bytes(segments[0].data)  # nothing cut
    assert original[:start] + original[end:] == bytes(
        segments[0].data[:start] + segments[0].data[end:]
    )


def test_a_flipped_header_octet_in_the_last_segment_costs_only_its_record(tmp_path: Path) -> None:
    """In the segment being appended to, too, a damaged header is resynchronised past."""
    layout, [segment] = _spool(tmp_path, [_message(n) for n in range(1, 5)])
    start, end = segment.record(1)
    segment.data[start + 10] ^= 0x80
    _write(layout, [segment])
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3), _qid(4)]
    assert [(q.offset, q.length) for q in found.quarantined] == [(start, end - start)]
    assert found.end_offset == len(segment.data) and found.torn_tails == 0


def test_a_damaged_last_record_is_copied_before_it_is_cut(tmp_path: Path) -> None:
    """A damaged header with nothing after it may be acknowledged mail: quarantined, then cut."""
    layout, [segment] = _spool(tmp_path, [_message(1), _message(2)])
    start, end = segment.record(1)
    segment.data[start + 6] ^= 0x01
    _write(layout, [segment])
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1)]
    [item] = found.quarantined
    assert item.path is not None and item.path.read_bytes() == segment.data[start:end]
    assert "damaged-tail" in item.path.name
    assert layout.segment_path(1).stat().st_size == start == found.end_offset


def test_a_flipped_body_octet_costs_only_its_record(tmp_path: Path) -> None:
    """A damaged text is set aside byte for byte; the messages around it load."""
    layout, segments = _spool(tmp_path, [_message(n, b"body %d" % n * 40) for n in range(1, 5)])
    start, end = segments[0].record(2)
    segments[0].data[end - 30] ^= 0x10
    _write(layout, segments)
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(2), _qid(4)]
    [item] = found.quarantined
    assert item.path is not None and item.path.read_bytes() == segments[0].data[start:end]
    assert (item.offset, item.length) == (start, end - start)


def test_a_body_holding_forged_records_is_never_taken_for_records(tmp_path: Path) -> None:
    """Records a sender put in a body (CRC-checked, or with a guessed key) stay text."""
    forged_items = [_message(66, b"forged"), (RecordType.DONE, encode_done(_qid(1), "final"))]
    forged = b""
    for framing in (Framing(None, 1), Framing(bytes(32), 1)):
        for rtype, payload in forged_items:
            forged += b"\r\n" + encode(framing, rtype, payload, len(forged) + 2)
    layout, [segment] = _spool(
        tmp_path, [_message(1), _message(2, b"Subject: hi\r\n\r\n" + forged), _message(3)]
    )
    start, end = segment.record(1)
    segment.data[start + 2] ^= 0x01  # the magic: the header of the crafted message
    _write(layout, [segment])
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3)]
    assert [(q.offset, q.length) for q in found.quarantined] == [(start, end - start)]


def test_a_bad_header_in_a_legacy_segment_quarantines_the_rest_of_it(tmp_path: Path) -> None:
    """Unkeyed headers can be forged, so in a pre-key segment there is no resynchronising."""
    layout = SpoolLayout(tmp_path)
    layout.make_dirs()
    legacy = _Segment(None, 1, _message(1), _message(2), _message(3))
    start, _ = legacy.record(1)
    legacy.data[start + 5] ^= 0x01
    layout.segment_path(1).write_bytes(bytes(legacy.data))
    layout.segment_path(2).write_bytes(bytes(_Segment(None, 2, _message(4)).data))
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(4)]
    [item] = found.quarantined
    assert item.offset == start and item.length == len(legacy.data) - start
    assert "rest-of-segment" in str(item.path)
    assert layout.segment_path(1).read_bytes() == bytes(legacy.data)


def test_an_unreadable_envelope_is_quarantined(tmp_path: Path) -> None:
    """A record with a sound checksum but an envelope that does not parse is set aside."""
    nonsense = (RecordType.MESSAGE, encode_message_prefix(_qid(2), b'{"arrival": 1}') + b"t")
    layout = _write_segments(tmp_path, [_message(1), nonsense, _message(3)])
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3)]
    [item] = found.quarantined
    assert "unreadable-envelope" in str(item.path)


def test_a_status_that_does_not_fit_its_envelope_is_quarantined(tmp_path: Path) -> None:
    """A STATUS record with the wrong number of recipients leaves the earlier state in force."""
    status = (RecordType.STATUS, encode_status(_qid(1), (RecipientStatus(),) * 2))
    layout = _write_segments(tmp_path, [_message(1), status])
    found = recover(layout)
    assert found.state.messages[_qid(1)].statuses == (RecipientStatus(),)
    assert len(found.quarantined) == 1


def test_quarantine_happens_once(tmp_path: Path) -> None:
    """Recovering twice does not copy or count the same damage again."""
    layout, segments = _spool(tmp_path, [_message(1), _message(2)], [_message(3)])
    segments[0].data[segments[0].record(0)[1] - 1] ^= 0xFF
    _write(layout, segments)
    assert len(recover(layout).quarantined) == 1
    assert recover(layout).quarantined == []
    assert len(list(layout.quarantine_dir.iterdir())) == 1


def test_statuses_and_removals_replay_in_log_order(tmp_path: Path) -> None:
    """The newest STATUS record wins, and a DONE record removes its message."""
    deferred = RecipientStatus(RecipientState.DEFERRED, 2, 99.0)
    records = [
        _message(1, recipients=2),
        (RecordType.STATUS, encode_status(_qid(1), (RecipientStatus(),) * 2)),
        _message(2),
        (RecordType.DONE, encode_done(_qid(2), "final")),
    ]
    later = [(RecordType.STATUS, encode_status(_qid(1), (deferred, deferred)))]
    layout = _write_segments(tmp_path, records, later)
    found = recover(layout)
    assert list(found.state.messages) == [_qid(1)]
    assert found.state.messages[_qid(1)].statuses == (deferred, deferred)
    assert found.highest_id == _qid(2)


def test_temporary_files_are_removed(tmp_path: Path) -> None:
    """Leftovers of an interrupted durable write disappear at start."""
    layout = _write_segments(tmp_path, [_message(1)])
    (layout.quarantine_dir / ".x.bad.123.tmp").write_bytes(b"half")
    (layout.log_dir / "whatever.tmp").write_bytes(b"half")
    (layout.root / ".key.77.tmp").write_bytes(b"half")
    found = recover(layout)
    assert found.temp_files_removed == 3 and layout.temp_files() == []


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_garbage_segments_never_crash_recovery(tmp_path: Path, older: bytes, last: bytes) -> None:
    """Whatever the segment files contain, recovery returns; sound messages still load."""
    root = tmp_path / "spool"
    shutil.rmtree(root, ignore_errors=True)
    layout, segments = _spool(root, [_message(1)], [_message(9)])
    segments[0].data += older
    segments[1].data += last
    _write(layout, segments)
    found = recover(layout)
    assert _qid(1) in found.state.messages
    assert _qid(9) in found.state.messages
    repaired = scan_segment(root, 2)
    assert repaired.stop is None  # the tail was cut, or set aside and resynchronised past


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=4),
    st.data(),
)
def test_any_damaged_range_costs_only_the_records_it_touches(
    tmp_path: Path, sizes: list[int], per_segment: int, data: st.DataObject
) -> None:
    """Whatever range of one segment is overwritten, every record it misses loads, none raises."""
    root = tmp_path / "spool"
    shutil.rmtree(root, ignore_errors=True)
    items = [_message(n, bytes([n]) * size) for n, size in enumerate(sizes, start=1)]
    chunks = [items[i : i + per_segment] for i in range(0, len(items), per_segment)]
    layout, segments = _spool(root, *chunks)
    target = data.draw(st.integers(min_value=0, max_value=len(segments) - 1))
    segment = segments[target]
    start = data.draw(st.integers(min_value=0, max_value=len(segment.data) - 1))
    length = data.draw(st.integers(min_value=1, max_value=min(64, len(segment.data) - start)))
    noise = data.draw(st.binary(min_size=length, max_size=length))
    changed = {start + i for i in range(length) if noise[i] != segment.data[start + i]}
    segment.data[start : start + length] = noise
    _write(layout, segments)
    found = recover(layout)
    touched: list[tuple[int, int]] = []
    expected = set()
    for index, chunk in enumerate(chunks):
        for position in range(len(chunk)):
            first = sum(len(c) for c in chunks[:index]) + position + 1
            low, high = segments[index].record(position)
            if index == target and any(low <= c < high for c in changed):
                touched.append((low, high))
            else:
                expected.add(_qid(first))
    assert set(found.state.messages) == expected
    for item in found.quarantined:  # only the damaged records' bytes are set aside
        assert item.segment == target + 1
        assert any(
            low <= item.offset and item.offset + item.length <= high
            for low, high in _merged(touched)
        )
    assert found.torn_tails == 0


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ranges joined: a damaged header's region may run over a damaged neighbour."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and merged[-1][1] == low:
            merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


@pytest.mark.parametrize(
    ("segment", "where", "reason"),
    [
        (1, 9, "bad header check"),  # mid-segment: would be resynchronised past
        (1, -1, "bad payload checksum"),  # a damaged text: would be skipped
        (2, 3, "bad magic (damaged tail)"),  # the last record: would be cut
    ],
    ids=["header", "body", "tail"],
)
def test_an_unwritable_quarantine_refuses_to_open_and_leaves_the_segments_alone(
    read_only_quarantine: SpoolLayout, segment: int, where: int, reason: str
) -> None:
    """If damage cannot be copied aside, recovery raises one clear line and cuts nothing."""
    layout = read_only_quarantine
    key = open_key(layout)
    segments = [
        _Segment(key, 1, _message(1), _message(2), _message(3)),
        _Segment(key, 2, _message(4), _message(5)),
    ]
    start, end = segments[segment - 1].record(1)
    segments[segment - 1].data[start + where if where >= 0 else end + where] ^= 0x01
    _write(layout, segments)
    before = _snapshot(layout)
    with pytest.raises(SpoolError) as raised:
        recover(layout)
    message = str(raised.value)
    assert "\n" not in message
    assert f"segment {segment} at offset {start} ({reason})" in message
    assert "cannot set aside" in message and str(layout.quarantine_dir) in message
    assert _snapshot(layout) == before


@pytest_twisted.ensureDeferred
async def test_the_queue_counts_what_recovery_quarantined(tmp_path: Path) -> None:
    """An opened queue reports how many regions it quarantined, and serves the rest."""
    layout, segments = _spool(tmp_path, [_message(1), _message(2, b"kept")], [])
    segments[0].data[segments[0].record(0)[1] - 1] ^= 0xFF
    _write(layout, segments)
    queue = await open_queue(tmp_path)
    try:
        assert queue.quarantined == 1
        assert await queue.list_messages() == [_qid(2)]
        assert await read_all(queue.open_message(_qid(2))) == b"kept"
    finally:
        await queue.close()

"""Recovery at start: torn tails cut, damage quarantined and counted, the rest always loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from relay.envelope import RecipientState, RecipientStatus
from relay.queue.layout import SpoolLayout
from relay.queue.payload import (
    encode_done,
    encode_envelope,
    encode_message_prefix,
    encode_status,
)
from relay.queue.record import RecordType, encode, scan
from relay.queue.recovery import recover

from queue_helpers import make_envelope, open_queue, read_all


def _qid(n: int) -> str:
    return f"{n:014X}"


def _message(n: int, text: bytes = b"text", recipients: int = 1) -> bytes:
    envelope = encode_envelope(make_envelope(recipients, arrival=1000.0 + n))
    return encode(RecordType.MESSAGE, encode_message_prefix(_qid(n), envelope) + text)


def _write_segments(root: Path, *segments: bytes) -> SpoolLayout:
    layout = SpoolLayout(root)
    layout.make_dirs()
    for number, data in enumerate(segments, start=1):
        layout.segment_path(number).write_bytes(data)
    return layout


class _Logged:
    """Collects the text of log events while in a with block."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format") or ""
        self.lines.append(fmt.format(**event) if fmt else "")

    def __enter__(self) -> _Logged:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def test_a_torn_tail_of_the_last_segment_is_cut_off(tmp_path: Path) -> None:
    """Half a record at the end of the last segment is truncated, not quarantined."""
    whole = _message(1) + _message(2)
    torn = _message(3, b"x" * 100)[:-40]
    layout = _write_segments(tmp_path, whole + torn)
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(2)]
    assert found.torn_tails == 1 and found.quarantined == []
    assert layout.segment_path(1).stat().st_size == len(whole) == found.end_offset
    assert list(layout.quarantine_dir.iterdir()) == []


def test_a_read_only_look_changes_nothing(tmp_path: Path) -> None:
    """Recovery without repair reports a torn tail but leaves the file as it was."""
    data = _message(1) + _message(2)[:-5]
    layout = _write_segments(tmp_path, data)
    found = recover(layout, repair=False)
    assert found.torn_tails == 1
    assert layout.segment_path(1).read_bytes() == data


def test_the_last_segment_cut_at_any_position_keeps_every_whole_record(tmp_path: Path) -> None:
    """Whatever octet a crash stops at, every message written completely before it is loaded."""
    records = [_message(i, bytes([i]) * (37 * i)) for i in range(1, 7)]
    data = b"".join(records)
    ends = [sum(len(r) for r in records[: i + 1]) for i in range(len(records))]
    for cut in range(0, len(data) + 1, 7):
        root = tmp_path / str(cut)
        found = recover(_write_segments(root, data[:cut]))
        assert len(found.state.messages) == sum(1 for e in ends if e <= cut)
        assert found.quarantined == []


def test_a_bad_checksum_in_an_older_segment_is_quarantined_and_the_rest_loads(
    tmp_path: Path,
) -> None:
    """A damaged record in an older segment goes to quarantine/ with a log line; others load."""
    first, bad, third = _message(1), bytearray(_message(2)), _message(3)
    bad[-2] ^= 0x40
    layout = _write_segments(tmp_path, first + bytes(bad) + third, _message(4))
    with _Logged() as logged:
        found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3), _qid(4)]
    assert len(found.quarantined) == 1
    [item] = found.quarantined
    assert (item.segment, item.offset, item.length) == (1, len(first), len(bad))
    assert item.path is not None and item.path.read_bytes() == bytes(bad)
    assert item.path.name.startswith(f"0000000001-{len(first):012d}-bad-payload-checksum")
    assert any("quarantined" in line and "segment 1" in line for line in logged.lines)


def test_a_bad_header_in_an_older_segment_quarantines_the_rest_of_it(tmp_path: Path) -> None:
    """A header that cannot be trusted costs the rest of its segment, not the next segments."""
    first, bad = _message(1), bytearray(_message(2) + _message(3))
    bad[5] ^= 0x01  # the record type, under the header checksum
    layout = _write_segments(tmp_path, first + bytes(bad), _message(4))
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(4)]
    [item] = found.quarantined
    assert item.offset == len(first) and item.length == len(bad)
    assert "rest-of-segment" in str(item.path)


def test_damage_in_the_middle_of_the_last_segment_is_quarantined_not_cut(tmp_path: Path) -> None:
    """A damaged payload followed by sound records is set aside; the records after it stay."""
    bad = bytearray(_message(2))
    bad[-1] ^= 0xFF
    layout = _write_segments(tmp_path, _message(1) + bytes(bad) + _message(3))
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3)]
    assert len(found.quarantined) == 1 and found.torn_tails == 0


def test_an_unreadable_envelope_is_quarantined(tmp_path: Path) -> None:
    """A record with a sound checksum but an envelope that does not parse is set aside."""
    nonsense = encode(RecordType.MESSAGE, encode_message_prefix(_qid(2), b'{"arrival": 1}') + b"t")
    layout = _write_segments(tmp_path, _message(1) + nonsense + _message(3))
    found = recover(layout)
    assert sorted(found.state.messages) == [_qid(1), _qid(3)]
    [item] = found.quarantined
    assert "unreadable-envelope" in str(item.path)


def test_a_status_that_does_not_fit_its_envelope_is_quarantined(tmp_path: Path) -> None:
    """A STATUS record with the wrong number of recipients leaves the earlier state in force."""
    status = encode(RecordType.STATUS, encode_status(_qid(1), (RecipientStatus(),) * 2))
    layout = _write_segments(tmp_path, _message(1) + status)
    found = recover(layout)
    assert found.state.messages[_qid(1)].statuses == (RecipientStatus(),)
    assert len(found.quarantined) == 1


def test_quarantine_happens_once(tmp_path: Path) -> None:
    """Recovering twice does not copy or count the same damage again."""
    bad = bytearray(_message(1))
    bad[-1] ^= 0xFF
    layout = _write_segments(tmp_path, bytes(bad) + _message(2), _message(3))
    assert len(recover(layout).quarantined) == 1
    assert recover(layout).quarantined == []
    assert len(list(layout.quarantine_dir.iterdir())) == 1


def test_statuses_and_removals_replay_in_log_order(tmp_path: Path) -> None:
    """The newest STATUS record wins, and a DONE record removes its message."""
    deferred = RecipientStatus(RecipientState.DEFERRED, 2, 99.0)
    records = (
        _message(1, recipients=2)
        + encode(RecordType.STATUS, encode_status(_qid(1), (RecipientStatus(),) * 2))
        + _message(2)
        + encode(RecordType.DONE, encode_done(_qid(2), "final"))
    )
    later = encode(RecordType.STATUS, encode_status(_qid(1), (deferred, deferred)))
    layout = _write_segments(tmp_path, records, later)
    found = recover(layout)
    assert list(found.state.messages) == [_qid(1)]
    assert found.state.messages[_qid(1)].statuses == (deferred, deferred)
    assert found.highest_id == _qid(2)


def test_temporary_files_are_removed(tmp_path: Path) -> None:
    """Leftovers of an interrupted durable write disappear at start."""
    layout = _write_segments(tmp_path, _message(1))
    (layout.quarantine_dir / ".x.bad.123.tmp").write_bytes(b"half")
    (layout.log_dir / "whatever.tmp").write_bytes(b"half")
    found = recover(layout)
    assert found.temp_files_removed == 2 and layout.temp_files() == []


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_garbage_segments_never_crash_recovery(tmp_path: Path, older: bytes, last: bytes) -> None:
    """Whatever the segment files contain, recovery returns; sound messages still load."""
    root = tmp_path / "spool"
    shutil.rmtree(root, ignore_errors=True)
    layout = _write_segments(root, _message(1) + older, _message(9) + last)
    found = recover(layout)
    assert _qid(1) in found.state.messages
    assert _qid(9) in found.state.messages
    repaired = scan(layout.segment_path(2).read_bytes())
    assert repaired.stop is None and not repaired.damaged  # the tail was cut or set aside


@pytest_twisted.ensureDeferred
async def test_the_queue_counts_what_recovery_quarantined(tmp_path: Path) -> None:
    """An opened queue reports how many regions it quarantined, and serves the rest."""
    bad = bytearray(_message(1))
    bad[-1] ^= 0xFF
    _write_segments(tmp_path, bytes(bad) + _message(2, b"kept"), b"")
    queue = await open_queue(tmp_path)
    try:
        assert queue.quarantined == 1
        assert await queue.list_messages() == [_qid(2)]
        assert await read_all(queue.open_message(_qid(2))) == b"kept"
    finally:
        await queue.close()

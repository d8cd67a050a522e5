"""A real spool, written by SpoolQueue, damaged on disk and opened again: the mail survives.

These tests touch the files only through the queue's own view of them (the text offset
of each message), so they describe behaviour, not a format: a flipped octet costs the
one message it is in, a body crafted to look like records stays a body, a spool made
before keys existed keeps working, and damage that cannot be set aside stops the spool
from opening instead of being dropped.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from relay.cli import exitcodes
from relay.cli.main import main
from relay.envelope import RecipientState, RecipientStatus
from relay.errors import SpoolError
from relay.queue.key import load_key
from relay.queue.layout import SpoolLayout
from relay.queue.payload import encode_done, encode_envelope, encode_message_prefix
from relay.queue.record import HEADER_SIZE, LEGACY_MAGIC, Framing, RecordType, encode
from relay.queue.service import SpoolService
from relay.queue.store import SpoolQueue

from queue_helpers import make_envelope, open_queue, read_all

TEXTS = [b"Subject: %d\r\n\r\n" % n + b"line of message %d\r\n" % n * (20 * n) for n in range(5)]


async def _stored(root: Path, texts: list[bytes]) -> list[tuple[str, int, int]]:
    """Store ``texts`` in a new spool and close it; (queue id, record start, record end) each."""
    queue = await open_queue(root)
    try:
        ids = [await queue.store(make_envelope(), text) for text in texts]
        places = []
        for qid in ids:
            entry = queue.entry(qid)
            prefix = len(encode_message_prefix(qid, encode_envelope(entry.envelope)))
            start = entry.text_offset - prefix - HEADER_SIZE
            places.append((qid, start, entry.text_offset + entry.size))
    finally:
        await queue.close()
    return places


def _flip(root: Path, offset: int, mask: int = 0x01) -> None:
    path = SpoolLayout(root).segment_path(1)
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


async def _texts(queue: SpoolQueue) -> dict[str, bytes]:
    return {qid: await read_all(queue.open_message(qid)) for qid in await queue.list_messages()}


@pytest_twisted.ensureDeferred
async def test_a_flipped_header_octet_costs_one_message_of_a_real_spool(tmp_path: Path) -> None:
    """Four of five stored messages load after a header octet flips; the fifth is set aside."""
    places = await _stored(tmp_path, TEXTS)
    qid, start, end = places[2]
    original = SpoolLayout(tmp_path).segment_path(1).read_bytes()
    _flip(tmp_path, start + 9)  # the length field of the third message's header
    queue = await open_queue(tmp_path)
    try:
        texts = await _texts(queue)
        assert texts == {q: TEXTS[i] for i, (q, _, _) in enumerate(places) if q != qid}
        assert queue.quarantined == 1
        [copy] = SpoolLayout(tmp_path).quarantine_dir.iterdir()
        damaged = bytearray(original[start:end])
        damaged[9] ^= 0x01
        assert copy.read_bytes() == bytes(damaged)
        later = await queue.store(make_envelope(), b"after the damage")
    finally:
        await queue.close()
    queue = await open_queue(tmp_path)
    try:
        assert len(await queue.list_messages()) == 5 and queue.quarantined == 0
        assert await read_all(queue.open_message(later)) == b"after the damage"
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_flipped_body_octet_costs_one_message_of_a_real_spool(tmp_path: Path) -> None:
    """A text damaged on disk is set aside whole and the messages around it load."""
    places = await _stored(tmp_path, TEXTS)
    qid, _, end = places[1]
    _flip(tmp_path, end - 7, 0x20)
    queue = await open_queue(tmp_path)
    try:
        assert sorted(await queue.list_messages()) == sorted(q for q, _, _ in places if q != qid)
        assert queue.quarantined == 1
    finally:
        await queue.close()


def _legacy_record(rtype: RecordType, payload: bytes) -> bytes:
    """A record in the unkeyed format, built by hand the way an attacker would."""
    head = struct.pack(">4sBBHII", LEGACY_MAGIC, rtype, 0, 0, len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


@pytest_twisted.ensureDeferred
async def test_records_smuggled_in_a_body_are_not_replayed_after_damage(tmp_path: Path) -> None:
    """A sender's body full of would-be records stays text when recovery resynchronises."""
    victim = "00000000000001"
    open_relay = encode_envelope(make_envelope(3, sender="spammer@evil.test"))
    smuggled = b"".join(
        [
            _legacy_record(RecordType.DONE, encode_done(victim, "final")),
            _legacy_record(
                RecordType.MESSAGE, encode_message_prefix("FFFFFFFFFFFFFF", open_relay) + b"spam"
            ),
            encode(Framing(bytes(32), 1), RecordType.DONE, encode_done(victim, "final"), 0),
        ]
    )
    crafted = b"Subject: hello\r\n\r\n" + smuggled * 20
    places = await _stored(tmp_path, [TEXTS[0], crafted, TEXTS[2], TEXTS[3]])
    qid, start, _ = places[1]
    _flip(tmp_path, start, 0x80)  # the crafted message's own header
    queue = await open_queue(tmp_path)
    try:
        assert sorted(await queue.list_messages()) == sorted(q for q, _, _ in places if q != qid)
        assert "FFFFFFFFFFFFFF" not in await queue.list_messages()
        assert queue.quarantined == 1
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_spool_made_before_keys_keeps_working_and_moves_on(tmp_path: Path) -> None:
    """An unkeyed spool loads, gets a key, writes keyed segments, and its old one goes."""
    layout = SpoolLayout(tmp_path)
    layout.make_dirs()
    old = b""
    for n in (1, 2):
        envelope = encode_envelope(make_envelope(arrival=1000.0 + n))
        payload = encode_message_prefix(f"{n:014X}", envelope) + b"old mail %d" % n
        old += encode(Framing(None, 1), RecordType.MESSAGE, payload, len(old))
    layout.segment_path(1).write_bytes(old)
    queue = await open_queue(tmp_path)
    try:
        assert await _texts(queue) == {
            "00000000000001": b"old mail 1",
            "00000000000002": b"old mail 2",
        }
        key = load_key(layout)
        assert key is not None and key.keyed_from == 2
        new = await queue.store(make_envelope(), b"new mail")
        assert queue.entry(new).segment == 2
        assert layout.segment_path(1).read_bytes() == old  # never appended to
    finally:
        await queue.close()
    queue = await open_queue(tmp_path)
    try:
        assert sorted(await queue.list_messages()) == ["00000000000001", "00000000000002", new]
        delivered = RecipientStatus(RecipientState.DELIVERED)
        for qid in ("00000000000001", "00000000000002"):
            await queue.update(qid, {0: delivered})
        await queue.reclaim()
        assert queue.segments() == [2] and not layout.segment_path(1).exists()
    finally:
        await queue.close()
    queue = await open_queue(tmp_path)
    try:
        assert await _texts(queue) == {new: b"new mail"}
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_key_is_refused_not_replaced(tmp_path: Path) -> None:
    """Without its key a keyed spool cannot be read: opening fails and nothing is rewritten."""
    await _stored(tmp_path, TEXTS[:2])
    layout = SpoolLayout(tmp_path)
    before = layout.segment_path(1).read_bytes()
    layout.key_path.unlink()
    with pytest.raises(SpoolError, match=r"key .* is missing"):
        await open_queue(tmp_path)
    assert not layout.key_path.exists() and layout.segment_path(1).read_bytes() == before
    layout.key_path.write_text("relay spool key 1\nkey 00\nkeyed-from 1\n")
    with pytest.raises(SpoolError, match="damaged"):
        await open_queue(tmp_path)


@pytest_twisted.ensureDeferred
async def test_the_service_refuses_a_spool_whose_damage_cannot_be_set_aside(
    read_only_quarantine: SpoolLayout,
) -> None:
    """Damage and an unwritable quarantine/: one critical line, the service fails, no bytes cut."""
    root = read_only_quarantine.root
    places = await _stored(root, TEXTS)
    _, start, _ = places[3]
    _flip(root, start + 5)
    before = SpoolLayout(root).segment_path(1).read_bytes()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    service = SpoolService(root, reactor)
    try:
        service.startService()
        with pytest.raises(SpoolError, match="cannot set aside"):
            await service.when_ready()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await service.stopService()
    [line] = [e for e in events if "cannot open" in (e.get("log_format") or "")]
    assert line["log_level"].name == "critical" and "log_failure" not in line
    assert "\n" not in line["reason"] and str(SpoolLayout(root).quarantine_dir) in line["reason"]
    assert SpoolLayout(root).segment_path(1).read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_the_command_on_a_stopped_spool_refuses_too(
    read_only_quarantine: SpoolLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """``relay queue hold`` exits 74 with the reason and cuts nothing; ``list`` still looks."""
    layout = read_only_quarantine
    places = await _stored(layout.root, TEXTS[:3])
    _flip(layout.root, places[2][1] + 5)  # the last record: a damaged tail, to be cut
    before = layout.segment_path(1).read_bytes()
    config = layout.root.parent / "relay.toml"
    config.write_text('[relay]\nhostname = "hub.example.test"\nspool = "spool"\n')
    code = main(["queue", "-c", str(config), "hold", places[0][0]])
    err = capsys.readouterr().err
    assert code == exitcodes.IOERR and err.count("\n") == 1
    assert "cannot set aside" in err and "refusing to open the spool" in err
    assert layout.segment_path(1).read_bytes() == before
    assert main(["queue", "-c", str(config), "--json"]) == exitcodes.OK
    listed = json.loads(capsys.readouterr().out)
    assert sorted(m["id"] for m in listed) == sorted(q for q, _, _ in places[:2])

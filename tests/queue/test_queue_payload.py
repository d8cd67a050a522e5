"""Record payloads: envelopes and statuses survive the round trip; garbage is a PayloadError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.envelope import RecipientState, RecipientStatus
from relay.queue.payload import (
    PayloadError,
    decode_done,
    decode_envelope,
    decode_message_prefix,
    decode_status,
    encode_done,
    encode_envelope,
    encode_message_prefix,
    encode_status,
)
from relay.queue.queueid import QueueIdGenerator, is_valid_queue_id
from relay.reply import Reply, ReplyCode

from support.queue_helpers import make_envelope

QID = "0615E2A4C1B3F0"


def test_a_message_prefix_splits_back_into_id_envelope_and_text() -> None:
    """The MESSAGE payload prefix gives back the id, the envelope and where the text starts."""
    envelope = make_envelope(3)
    prefix = encode_message_prefix(QID, encode_envelope(envelope))
    decoded = decode_message_prefix(prefix + b"the text")
    assert decoded.queue_id == QID
    assert decode_envelope(decoded.envelope_json) == envelope
    assert (prefix + b"the text")[decoded.text_start :] == b"the text"


def test_an_smtputf8_envelope_survives_the_round_trip() -> None:
    """Non-ASCII addresses are stored as UTF-8 and read back equal."""
    envelope = make_envelope(1, sender="jörg@bücher.test")
    assert decode_envelope(encode_envelope(envelope)) == envelope


def test_statuses_with_replies_survive_the_round_trip() -> None:
    """Every field of a recipient status is kept by a STATUS payload."""
    statuses = (
        RecipientStatus(RecipientState.DEFERRED, 2, 1234.5, Reply(ReplyCode.DHST, "gone"), True),
        RecipientStatus(RecipientState.DELIVERED, 1, None, Reply(ReplyCode.MOK), updated=9.0),
    )
    assert decode_status(encode_status(QID, statuses)) == (QID, statuses)


def test_a_done_payload_names_its_message_and_reason() -> None:
    """DONE payloads carry the id and why the message left."""
    assert decode_done(encode_done(QID, "removed")) == (QID, "removed")


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_payload_error_only(data: bytes) -> None:
    """Whatever a sound checksum covers, decoding answers a value or a PayloadError."""
    for decode in (decode_status, decode_done, decode_message_prefix, decode_envelope):
        with contextlib.suppress(PayloadError):
            decode(data)


def test_a_number_too_long_to_read_is_a_payload_error() -> None:
    """Python refuses integers over 4 300 digits with a ValueError: still a PayloadError."""
    huge = b'{"id": "0615E2A4C1B3F0", "arrival": ' + b"9" * 5000 + b"}"
    for decode in (decode_status, decode_done, decode_message_prefix, decode_envelope):
        with pytest.raises(PayloadError):
            decode(huge)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": "../../etc/passwd", "why": "final"}',
        b'{"id": "0615E2A4C1B3F0", "recipients": []}',
        b'{"id": "0615E2A4C1B3F0", "recipients": [{"state": "lost", "attempts": 0}]}',
        b"[1, 2]",
    ],
)
def test_malformed_json_payloads_are_refused(payload: bytes) -> None:
    """Ids that are not queue ids, empty or unknown states are PayloadErrors."""
    with pytest.raises(PayloadError):
        decode_status(payload) if b"recipients" in payload else decode_done(payload)


def test_queue_ids_increase_strictly_even_when_the_clock_stands_still_or_steps_back() -> None:
    """The generator bumps past the last id when time does not move forward."""
    times = iter([100.0, 100.0, 99.0, 101.0])
    ids = QueueIdGenerator(lambda: next(times))
    made = [ids.next() for _ in range(4)]
    assert made == sorted(made) and len(set(made)) == 4
    assert all(is_valid_queue_id(i) for i in made)


def test_queue_ids_never_reuse_an_id_observed_on_disk() -> None:
    """After observing an id from the spool, new ids are larger even with an older clock."""
    ids = QueueIdGenerator(lambda: 1.0, floor="0660C978C5B46E")
    assert ids.next() > "0660C978C5B46E"


def test_queue_ids_are_safe_as_file_names() -> None:
    """Ids are fixed-width upper-case hex: no separators, no dots, no spaces."""
    qid = QueueIdGenerator(lambda: 1_700_000_000.123456).next()
    assert len(qid) == 14 and set(qid) <= set("0123456789ABCDEF")
    assert not is_valid_queue_id("../x") and not is_valid_queue_id(qid.lower())

"""The worker ⇄ spool frames: every frame reads back as written; garbage is a HandoffError."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.gateway.limits import AuthVerdict
from relay.handoff.codec import (
    MAX_CLIENT,
    AuthAnswer,
    AuthBegin,
    AuthEnd,
    Frame,
    HandoffError,
    Hello,
    Ready,
    Sessions,
    Stored,
    StoreFailed,
    StoreRequest,
    decode,
    encode,
    framed,
    unframed,
)

requests = st.integers(min_value=0, max_value=0xFFFFFFFF)
queue_ids = st.text(alphabet="0123456789ABCDEF", min_size=14, max_size=14)
counts = st.integers(min_value=1, max_value=1024)
u32s = st.integers(min_value=0, max_value=0xFFFFFFFF)
clients = st.text(min_size=1, max_size=60)  # at most 240 bytes of UTF-8: under MAX_CLIENT
windows = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
verdicts = st.builds(AuthVerdict, st.booleans(), u32s, u32s, windows)

frames = st.one_of(
    st.builds(StoreRequest, requests, st.binary(max_size=300), st.binary(max_size=3000)),
    st.builds(Stored, requests, queue_ids),
    st.builds(StoreFailed, requests, st.booleans(), st.text(max_size=200)),
    st.builds(Ready, st.booleans()),
    st.builds(
        Sessions,
        st.integers(min_value=0, max_value=2**62),
        st.dictionaries(
            st.text(max_size=64), st.integers(min_value=0, max_value=2**62), max_size=16
        ),
    ),
    st.builds(
        Hello,
        st.text(max_size=500),
        st.text(max_size=100),
        st.lists(st.text(max_size=10), max_size=4).map(tuple),
        st.integers(min_value=0, max_value=1024),
        counts,
    ),
    st.builds(AuthBegin, requests, clients),
    st.builds(AuthAnswer, requests, verdicts),
    st.builds(AuthEnd, clients, st.booleans()),
)


@given(frames)
def test_every_frame_reads_back_as_written(frame: object) -> None:
    """Each kind, AUTH/VERDICT/ENDED included, decodes to what was encoded."""
    assert decode(encode(frame)) == frame  # type: ignore[arg-type]


@given(st.binary(max_size=400))
def test_any_bytes_are_a_frame_or_a_handoff_error(payload: bytes) -> None:
    """Never another exception: the link's owner can always log, count and drop."""
    try:
        frame = decode(payload)
    except HandoffError:
        return
    assert isinstance(frame, Frame)


@given(st.sampled_from([b"A", b"V", b"E"]), st.binary(max_size=300))
def test_any_bytes_after_an_auth_kind_are_a_frame_or_a_handoff_error(
    kind: bytes, rest: bytes
) -> None:
    """AUTH, VERDICT and ENDED with any body: the frame of that kind, or a HandoffError."""
    try:
        frame = decode(kind + rest)
    except HandoffError:
        return
    assert isinstance(frame, AuthBegin | AuthAnswer | AuthEnd)
    assert encode(frame) == kind + rest  # nothing in it was read loosely


@given(frames, st.data())
def test_a_cut_frame_is_refused_or_reads_as_less(frame: object, data: st.DataObject) -> None:
    """A truncated STORED/FAILED/HELLO/STORE never decodes to the original."""
    payload = encode(frame)  # type: ignore[arg-type]
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    try:
        decoded = decode(payload[:cut])
    except HandoffError:
        return
    assert decoded != frame


def test_framed_adds_the_big_endian_length_twisted_reads() -> None:
    assert framed(b"abc") == b"\x00\x00\x00\x03abc"


def _hello(**changes: object) -> bytes:
    fields = {"config_text": "", "base_dir": "/", "channels": [], "index": 1, "processes": 2}
    return b"H" + json.dumps({**fields, **changes}).encode()


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"", "unknown frame kind"),
        (b"Z123", "unknown frame kind"),
        (b"S\x00\x00", "too short"),
        (b"S" + struct.pack(">II", 1, 10) + b"short", "envelope longer than the frame"),
        (b"K\x00\x00\x00\x01" + b"not-an-id", "not a queue id"),
        (b"K\x00\x00\x00\x01", "not a queue id"),
        (b"F\x00\x00\x00\x01\x02why", "neither 0 nor 1"),
        (b"R", "not 0 or 1"),
        (b"R2", "not 0 or 1"),
        (b"R11", "not 0 or 1"),
        (b'H{"index": ' + b"9" * 5000 + b"}", "not JSON"),
        (b"H[1]", "not a JSON object"),
        (b"H{", "not JSON"),
        (b"H\xff", "not JSON"),
        (_hello(config_text=1), "strings"),
        (_hello(channels=[1]), "channels"),
        (_hello(index=True), "counts"),
        (_hello(processes=0), "counts"),
        (b"N[]", "not a JSON object"),
        (b"N{", "not JSON"),
        (b'N{"open": -1, "refused": {}}', "open must be a count"),
        (b'N{"open": true, "refused": {}}', "open must be a count"),
        (b'N{"open": 1, "refused": []}', "open must be a count"),
        (b'N{"open": 1, "refused": {"x": "1"}}', "reasons to counts"),
        (b"A\x00\x00\x01", "AUTH frame too short"),
        (b"A\x00\x00\x00\x01", "1-255 bytes"),
        (b"A\x00\x00\x00\x01" + b"1" * (MAX_CLIENT + 1), "1-255 bytes"),
        (b"A\x00\x00\x00\x01\xff", "not UTF-8"),
        (b"V" + struct.pack(">IBIId", 1, 1, 0, 0, 900.0)[:-1], "wrong length"),
        (b"V" + struct.pack(">IBIId", 1, 1, 0, 0, 900.0) + b"x", "wrong length"),
        (b"V" + struct.pack(">IBIId", 1, 2, 0, 0, 900.0), "neither 0 nor 1"),
        (b"V" + struct.pack(">IBIId", 1, 0, 0, 0, 0.0), "positive number"),
        (b"V" + struct.pack(">IBIId", 1, 0, 0, 0, -1.0), "positive number"),
        (b"V" + struct.pack(">IBIId", 1, 0, 0, 0, float("nan")), "positive number"),
        (b"V" + struct.pack(">IBIId", 1, 0, 0, 0, float("inf")), "positive number"),
        (b"E", "neither 0 nor 1"),
        (b"E\x021.2.3.4", "neither 0 nor 1"),
        (b"E\x01", "1-255 bytes"),
        (b"E\x00\xc3", "not UTF-8"),
    ],
)
def test_malformed_frames_say_what_is_wrong(payload: bytes, problem: str) -> None:
    """Each way a frame can be wrong is a HandoffError naming it."""
    with pytest.raises(HandoffError, match=problem):
        decode(payload)


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_a_datagram_of_frames_splits_back_into_them(payloads: list[bytes]) -> None:
    """Framed payloads put end to end come back one by one, in order."""
    assert unframed(b"".join(framed(p) for p in payloads)) == payloads


@given(st.binary(max_size=200))
def test_any_datagram_splits_or_is_a_handoff_error(data: bytes) -> None:
    """Arbitrary bytes: a list of payloads whose frames make up exactly ``data``, or refused."""
    try:
        payloads = unframed(data)
    except HandoffError:
        return
    assert b"".join(framed(p) for p in payloads) == data


@pytest.mark.parametrize(
    "data,problem",
    [
        (framed(b"K1234") + b"\x00\x00", "length cut off"),
        (framed(b"K1234") + b"\x00\x00\x00\x09abc", "longer than what is left"),
    ],
)
def test_a_cut_datagram_says_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(HandoffError, match=problem):
        unframed(data)

"""Frames on a byte stream: round trip, damage always caught, resynchronisation, bounds.

The decoder is fed the way a serial port delivers: in pieces cut anywhere, with modem
chatter, login prompts and noise before and between frames, and with bits flipped.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sansio.phone.frame import (
    FRAME_OVERHEAD,
    HEADER_SIZE,
    MAX_PAYLOAD,
    SYNC,
    Frame,
    FrameDecoder,
    encode_frame,
)

CHATTER = b"ATZ\r\nOK\r\nATDT5551234\r\nCONNECT 115200\r\n\r\nhub login: "


def frames_of(data: bytes, piece: int | None = None) -> tuple[list[Frame], FrameDecoder]:
    """Decode ``data`` fed whole, or in pieces of ``piece`` bytes."""
    decoder = FrameDecoder()
    step = piece or max(1, len(data))
    found: list[Frame] = []
    for start in range(0, len(data), step):
        found += decoder.feed(data[start : start + step])
    return found, decoder


def some_frames(count: int = 3, seed: int = 7) -> list[Frame]:
    """A few frames with varied kinds, sequence numbers and random payloads."""
    rng = random.Random(seed)
    return [
        Frame(rng.randrange(256), rng.randrange(1 << 24), rng.randbytes(rng.randrange(0, 300)))
        for _ in range(count)
    ]


@pytest.mark.parametrize("size", [0, 1, 15, 4096, MAX_PAYLOAD])
def test_frame_round_trip(size: int) -> None:
    """A frame comes out of the decoder as it went into the encoder, overhead as documented."""
    frame = Frame(0x81, 0xFFFFFF, random.Random(size).randbytes(size))
    wire = encode_frame(frame)
    assert len(wire) == size + FRAME_OVERHEAD
    assert wire.startswith(SYNC)
    found, decoder = frames_of(wire)
    assert found == [frame]
    assert decoder.garbage_bytes == decoder.bad_headers == decoder.bad_checksums == 0
    assert decoder.buffered == 0


def test_frame_fields_are_validated() -> None:
    """A frame whose fields do not fit the wire format cannot be made."""
    with pytest.raises(ValueError):
        Frame(256, 0, b"")
    with pytest.raises(ValueError):
        Frame(1, 1 << 24, b"")
    with pytest.raises(ValueError):
        Frame(1, 0, bytes(MAX_PAYLOAD + 1))


def test_every_single_bit_flip_is_detected() -> None:
    """Whichever bit of a frame is flipped, the frame is not delivered; the next one is."""
    frame, following = some_frames(2, seed=3)
    frame = Frame(frame.kind, frame.seq, random.Random(1).randbytes(200))
    wire = encode_frame(frame)
    tail = encode_frame(following)
    for bit in range(len(wire) * 8):
        damaged = bytearray(wire)
        damaged[bit // 8] ^= 1 << (bit % 8)
        found, decoder = frames_of(bytes(damaged) + tail)
        assert found == [following], bit
        if bit >= len(SYNC) * 8:
            assert decoder.bad_headers + decoder.bad_checksums >= 1, bit


def test_chatter_before_and_between_frames_is_skipped_and_counted() -> None:
    """Modem chatter, a login prompt and noise around frames are skipped, byte for byte."""
    frames = some_frames(3)
    noise = bytes(range(256))  # holds every byte value, the marker's among them
    stream = CHATTER + encode_frame(frames[0]) + noise + encode_frame(frames[1])
    stream += b"\r\nNO CARRIER\r\n" + encode_frame(frames[2]) + b"+++"
    found, decoder = frames_of(stream)
    assert found == frames
    assert decoder.garbage_bytes == len(CHATTER) + len(noise) + len(b"\r\nNO CARRIER\r\n") + 3


def test_damaged_length_resynchronises_at_the_next_marker_at_once() -> None:
    """A header whose length was hit is refused when it arrives; the decoder does not wait."""
    first, second = some_frames(2)
    damaged = bytearray(encode_frame(first))
    damaged[len(SYNC) + 1] ^= 0x40  # the length's high byte: 16 KiB more than sent
    found, decoder = frames_of(bytes(damaged) + encode_frame(second))
    assert found == [second]
    assert decoder.bad_headers >= 1  # and perhaps a marker byte inside the payload
    assert decoder.bad_checksums == 0
    assert decoder.buffered == 0


def test_truncated_frame_does_not_cost_the_frames_behind_it() -> None:
    """A frame cut short is dropped once its CRC fails; the frames inside its length survive."""
    frames = some_frames(6, seed=11)
    cut = encode_frame(Frame(1, 5, bytes(1000)))[:400]
    found, decoder = frames_of(cut + b"".join(encode_frame(frame) for frame in frames))
    assert found == frames
    assert decoder.bad_checksums == 1


def test_a_frame_inside_a_damaged_payload_is_not_delivered() -> None:
    """A record that carries a trace of this protocol never yields that trace's frames."""
    inner = Frame(1, 4242, b"not from this line" * 10)
    outer = encode_frame(Frame(1, 0, b"xx" + encode_frame(inner) + b"yy"))
    for position in range(len(SYNC), HEADER_SIZE):
        damaged = bytearray(outer)
        damaged[position] ^= 0x01
        found, _ = frames_of(bytes(damaged))
        assert found == [], position
    found, _ = frames_of(outer[:-1] + bytes([outer[-1] ^ 1]))
    assert found == []


def test_input_split_at_every_position_decodes_the_same() -> None:
    """However the stream is cut into two reads, the same frames come out."""
    frames = some_frames(3)
    stream = CHATTER + b"".join(encode_frame(frame) for frame in frames) + SYNC[:1]
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        found = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert found == frames, cut
        assert decoder.garbage_bytes == len(CHATTER), cut


def test_byte_at_a_time_decodes_the_same() -> None:
    """Fed one byte per read (a slow serial port), the decoder finds every frame."""
    frames = some_frames(4)
    found, _ = frames_of(b"".join(encode_frame(frame) for frame in frames), piece=1)
    assert found == frames


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8), st.data())
def test_decoder_memory_is_bounded_and_it_never_raises(
    chunks: list[bytes], data: st.DataObject
) -> None:
    """Any bytes, in any pieces: no exception, and at most one frame's worth is held."""
    decoder = FrameDecoder()
    for chunk in chunks:
        if data.draw(st.booleans()):
            chunk = SYNC + chunk  # markers make the decoder wait for more
        decoder.feed(chunk)
        assert decoder.buffered <= FrameDecoder.limit


def test_decoder_memory_is_bounded_for_a_huge_feed() -> None:
    """A megabyte of markers and noise in one read leaves at most one frame's worth held."""
    blob = (SYNC + random.Random(2).randbytes(500)) * 2000
    decoder = FrameDecoder()
    decoder.feed(blob)
    assert decoder.buffered <= FrameDecoder.limit


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=600), min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
    flips=st.integers(0, 12),
    piece=st.integers(1, 700),
)
def test_damaged_stream_yields_only_frames_that_were_sent(
    payloads: list[bytes], seed: int, flips: int, piece: int
) -> None:
    """After random bit flips, what comes out is an in-order subset of what was sent."""
    rng = random.Random(seed)
    frames = [Frame(1, index * 1000, payload) for index, payload in enumerate(payloads)]
    stream = bytearray(b"".join(encode_frame(frame) for frame in frames))
    for _ in range(flips):
        bit = rng.randrange(len(stream) * 8)
        stream[bit // 8] ^= 1 << (bit % 8)
    found, decoder = frames_of(bytes(stream), piece)
    remaining = iter(frames)
    assert all(any(frame == sent for sent in remaining) for frame in found)
    if not flips:
        assert found == frames
    assert decoder.buffered <= FrameDecoder.limit

"""The session's pure parts: record codec, chunk compression, record sealing, handshake."""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.address import parse_forward_path
from relay.envelope import BodyType, Recipient
from relay.reply import Reply, ReplyCode
from relay.sansio.phone import handshake, records
from relay.sansio.phone.compress import ChunkCompressor, ChunkDecompressor, CompressionError
from relay.sansio.phone.jobs import IN_TRANSITIONS, OUT_TRANSITIONS, InState, OutState
from relay.sansio.phone.records import (
    Abandon,
    Abort,
    Answer,
    Capabilities,
    Done,
    FinalReply,
    Hello,
    Inventory,
    InventoryItem,
    MailEnvelope,
    Proof,
    Propose,
    RecordError,
    Role,
    Text,
)
from relay.sansio.phone.seal import Opener, Sealer, SealError

CAPS = Capabilities(64, 4096, 65536, 1 << 20, 10 << 20, True, False)
replies = st.builds(
    Reply, st.sampled_from(list(ReplyCode)), st.text(alphabet="abc xyz.:0123", max_size=40)
)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)
addresses = st.sampled_from(["<bob@site.example>", "<a.b+c@x.example>", "<üser@例え.jp>"])
envelopes = st.builds(
    MailEnvelope,
    st.one_of(st.none(), addresses.map(lambda a: parse_forward_path(a, smtputf8=True))),
    st.lists(
        addresses.map(lambda a: Recipient(parse_forward_path(a, smtputf8=True))),
        min_size=1,
        max_size=3,
    ).map(tuple),
    st.floats(0, 2e9),
    st.sampled_from(list(BodyType)),
    st.booleans(),
    st.one_of(st.none(), st.text(alphabet="abc123", max_size=10)),
)
all_records = st.one_of(
    st.builds(
        Hello,
        st.integers(0, 255),
        st.integers(0, 255),
        st.sampled_from(list(Role)),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
        st.binary(min_size=32, max_size=32),
        st.just(CAPS),
    ),
    st.builds(Proof, st.binary(min_size=32, max_size=32)),
    st.builds(Proof, st.binary(min_size=32, max_size=32), st.just(CAPS)),
    st.builds(Abort, replies),
    st.builds(
        Inventory,
        st.lists(st.builds(InventoryItem, ids, st.integers(0, 1 << 40)), max_size=5).map(tuple),
    ),
    st.builds(
        Propose,
        st.integers(0, 1 << 40),
        ids,
        st.integers(0, 1 << 40),
        st.binary(min_size=32, max_size=32),
        envelopes,
    ),
    st.builds(
        Answer,
        st.integers(0, 1000),
        st.lists(replies, max_size=3).map(tuple),
        st.integers(0, 10**9),
    ),
    st.builds(lambda j, r: Answer(j, whole=r), st.integers(0, 1000), replies),
    st.builds(Text, st.integers(0, 1000), st.booleans(), st.binary(max_size=100)),
    st.builds(FinalReply, st.integers(0, 1000), replies),
    st.builds(Abandon, st.integers(0, 1000), replies),
    st.just(Done()),
)


@settings(max_examples=200, deadline=None)
@given(all_records)
def test_every_record_reads_back_as_written(record: records.Record) -> None:
    """encode then decode gives the same record, for every type."""
    assert records.decode(records.encode(record)) == record


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_record_error(data: bytes) -> None:
    """Whatever the bytes, decode returns a record or raises RecordError, nothing else."""
    with contextlib.suppress(RecordError):
        records.decode(data)


@settings(max_examples=300, deadline=None)
@given(all_records, st.integers(0, 400), st.integers(0, 255))
def test_damaged_records_decode_or_raise_record_error(
    record: records.Record, position: int, value: int
) -> None:
    """A record with one byte changed or cut short still never raises anything else."""
    data = bytearray(records.encode(record))
    for damaged in (bytes(data[: position % (len(data) + 1)]), _with_byte(data, position, value)):
        with contextlib.suppress(RecordError):
            records.decode(damaged)


def _with_byte(data: bytearray, position: int, value: int) -> bytes:
    copy = bytearray(data)
    if copy:
        copy[position % len(copy)] = value
    return bytes(copy)


def test_hello_skips_capabilities_it_does_not_know() -> None:
    """A later minor version's extra capability tags are ignored, not refused."""
    hello = Hello(1, 3, Role.CALLER, "hub-a", b"n" * 32, CAPS)
    data = records.encode(hello) + bytes((99, 2, 7, 7))
    assert records.decode(data) == hello


def test_reply_text_from_the_peer_loses_its_control_characters() -> None:
    """A peer's reply text is stored and logged: control characters are replaced."""
    raw = bytearray(records.encode(Abort(Reply(ReplyCode.NO, "xx"))))
    raw[-2:] = b"\x1b\x07"
    reply = records.decode(bytes(raw))
    assert isinstance(reply, Abort) and reply.reply.text == "??"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=3000)), max_size=20))
def test_compressed_chunks_inflate_to_what_was_sent(chunks: list[tuple[bool, bytes]]) -> None:
    """Any mix of compressible and random chunks arrives exact, each smaller or as it was."""
    compressor, decompressor = ChunkCompressor(), ChunkDecompressor()
    for repetitive, data in chunks:
        chunk = data * 5 if repetitive else data
        compressed, wire = compressor.compress(chunk)
        assert len(wire) <= len(chunk)
        got = decompressor.decompress(wire, len(chunk)) if compressed else wire
        assert got == chunk


def test_a_deflate_bomb_is_refused() -> None:
    """A chunk that inflates past the message's size is a protocol error."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = bomb.compress(b"\0" * 1_000_000) + bomb.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(CompressionError):
        ChunkDecompressor().decompress(data, 4096)
    with pytest.raises(CompressionError):
        ChunkDecompressor().decompress(b"\xff\xff\xff", 4096)


def test_sealed_records_open_in_order_and_refuse_tampering_and_replay() -> None:
    """Sealed records open in order; a changed bit or a replayed record does not."""
    key = os.urandom(32)
    sealer = Sealer(key)
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    opener = Opener(key)
    assert opener.open(first) == b"one"
    with pytest.raises(SealError):
        opener.open(first)  # replayed: the counter moved on
    assert Opener(key).open(first) == b"one"
    tampered = bytearray(second)
    tampered[0] ^= 1
    opener2 = Opener(key)
    opener2.open(first)
    with pytest.raises(SealError):
        opener2.open(bytes(tampered))


def test_proofs_are_bound_to_role_secret_and_transcript() -> None:
    """A proof verifies only for its prover's role, the same secret and the same hellos."""
    t = handshake.transcript_hash(b"caller hello", b"answerer hello")
    mac = handshake.make_proof(b"s" * 32, Role.CALLER, t)
    assert handshake.verify_proof(b"s" * 32, Role.CALLER, t, mac)
    assert not handshake.verify_proof(b"s" * 32, Role.ANSWERER, t, mac)
    assert not handshake.verify_proof(b"x" * 32, Role.CALLER, t, mac)
    other = handshake.transcript_hash(b"caller hello", b"answerer hellO")
    assert not handshake.verify_proof(b"s" * 32, Role.CALLER, other, mac)


def test_an_answerers_proof_covers_the_capabilities_it_carries() -> None:
    """The capabilities in a proof record are under its MAC: changed, the proof fails."""
    t = handshake.transcript_hash(b"caller hello", b"answerer hello")
    raw = records.encode(Proof(b"\0" * 32, CAPS))
    terms = records.proof_terms(raw)
    assert terms and records.decode(raw) == Proof(b"\0" * 32, CAPS)
    mac = handshake.make_proof(b"s" * 32, Role.ANSWERER, t, terms)
    assert handshake.verify_proof(b"s" * 32, Role.ANSWERER, t, mac, terms)
    assert not handshake.verify_proof(b"s" * 32, Role.ANSWERER, t, mac)
    changed = records.proof_terms(records.encode(Proof(mac, replace(CAPS, encryption=True))))
    assert changed != terms
    assert not handshake.verify_proof(b"s" * 32, Role.ANSWERER, t, mac, changed)


def test_both_ends_negotiate_the_same_link() -> None:
    """Negotiation is symmetric in the link's limits, and each end learns the other's size limit."""
    a = Capabilities(64, 4096, 65536, 1 << 20, 10 << 20, True, False)
    b = Capabilities(128, 1024, 16384, 1 << 16, 1 << 20, False, True)
    ab, ba = handshake.negotiate(0, a, b, 2), handshake.negotiate(2, b, a, 0)
    assert (
        (ab.min_frame_payload, ab.max_frame_payload, ab.window, ab.max_record)
        == (
            ba.min_frame_payload,
            ba.max_frame_payload,
            ba.window,
            ba.max_record,
        )
        == (128, 1024, 16384, 1 << 16)
    )
    assert ab.compression is ba.compression is False and ab.encryption is ba.encryption is True
    assert ab.minor == ba.minor == 0
    assert ab.max_message_size == 1 << 20 and ba.max_message_size == 10 << 20


def test_keys_differ_by_direction_and_by_nonce() -> None:
    """Each direction has its own key, and new nonces give new keys."""
    c2a, a2c = handshake.derive_keys(b"s" * 32, b"c" * 32, b"a" * 32, b"t")
    assert c2a != a2c and len(c2a) == len(a2c) == 32
    assert handshake.derive_keys(b"s" * 32, b"d" * 32, b"a" * 32, b"t")[0] != c2a


def test_job_tables_only_lead_to_states() -> None:
    """Every transition names a known state, and the settled states have no way out."""
    assert all(isinstance(v, OutState) for v in OUT_TRANSITIONS.values())
    assert all(isinstance(v, InState) for v in IN_TRANSITIONS.values())
    assert not [k for k in OUT_TRANSITIONS if k[0] is OutState.SETTLED]
    assert not [k for k in IN_TRANSITIONS if k[0] is InState.SETTLED]

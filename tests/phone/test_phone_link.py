"""The reliable record transport: two links over the in-memory line of ``link_harness``.

Time is the harness's fake clock; the line serialises at 115 200 bit/s unless a test
says otherwise, so "the line never stalls" and "resent without waiting for a timeout"
are statements about simulated seconds.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.sansio.phone.errors import LocalPhoneError
from relay.sansio.phone.estimate import INITIAL_RTO, MIN_RTO
from relay.sansio.phone.frame import Frame, FrameDecoder, encode_frame
from relay.sansio.phone.link import (
    FrameFlag,
    FrameKind,
    Link,
    LinkDead,
    LinkParams,
    RecordReceived,
    encode_varint,
    unwrap_seq,
)

from support.phone.link_harness import LINE_RATE, Conditions, End, Outcome, simulate

FAST = LinkParams(keepalive=1.0, dead_after=8.0)


def records(count: int, size: int, seed: int = 1) -> list[bytes]:
    """``count`` incompressible records of ``size`` bytes."""
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(count)]


def frames_written(outcome: Outcome, direction: str) -> list[Frame]:
    """Every frame a driver wrote in ``direction`` ("a>b" or "b>a"), before any damage."""
    line = outcome.a_to_b if direction == "a>b" else outcome.b_to_a
    decoder = FrameDecoder()
    return decoder.feed(b"".join(chunk for _, chunk in line.writes))


def data_frames(frames: list[Frame]) -> list[Frame]:
    """The frames that carry stream data."""
    return [frame for frame in frames if frame.kind & 0x3F == FrameKind.DATA]


def exchange(sender: Link, receiver: Link, now: float, max_bytes: int | None = None) -> None:
    """Move what ``sender`` has to send into ``receiver`` at once (an empty read is EOF)."""
    data = sender.data_to_send(now, max_bytes)
    if data:
        receiver.receive_data(data, now)


def efficiency(outcome: Outcome, end: End, payload: int) -> float:
    """Payload delivered to ``end`` over what the line could carry until it had it all."""
    assert end.done_at is not None
    return payload / (outcome.a_to_b.conditions.rate * end.done_at)


# -- records -----------------------------------------------------------------------


def test_records_cross_both_ways_in_order() -> None:
    """Records of every size, empty ones included, arrive in order, both ways at once."""
    rng = random.Random(5)
    mixed = [rng.randbytes(rng.choice([0, 1, 127, 128, 5000, 70000])) for _ in range(30)]
    outcome = simulate(mixed, list(reversed(mixed)), Conditions())
    assert outcome.b.received == mixed
    assert outcome.a.received == list(reversed(mixed))
    assert outcome.a.link.idle and outcome.b.link.idle
    assert outcome.a.dead is None and outcome.b.dead is None
    stats = outcome.a.link.stats()
    assert stats.payload_bytes_sent == sum(map(len, mixed)) == stats.payload_bytes_received
    assert stats.frames_resent == 0


def test_link_input_split_at_every_position_gives_the_same_records() -> None:
    """However the line cuts the frames into reads, the receiver gets the same records."""
    sent = [b"", b"x" * 200, bytes(range(256)) * 3, b"end"]
    sender = Link(LinkParams(min_frame_payload=64, max_frame_payload=300), 0.0)
    for record in sent:
        sender.send_record(record)
    wire = b"login: " + sender.data_to_send(0.0)
    for cut in range(len(wire) + 1):
        receiver = Link(LinkParams(), 0.0)
        for piece in (wire[:cut], wire[cut:]):
            if piece:
                receiver.receive_data(piece, 0.1)
        got = []
        while (event := receiver.next_event()) is not None:
            assert isinstance(event, RecordReceived)
            got.append(event.record)
        assert got == sent, cut


def test_a_record_of_max_record_spans_many_frames() -> None:
    """A record as large as allowed goes through in frames of at most max_frame_payload."""
    params = LinkParams(max_record=200_000, max_frame_payload=1024)
    big = records(1, 200_000)
    outcome = simulate(big, [], Conditions(rate=1e6), params=params)
    assert outcome.b.received == big
    sent = data_frames(frames_written(outcome, "a>b"))
    assert len(sent) >= 200_000 // 1024
    assert max(len(frame.payload) for frame in sent) <= 1024


def test_send_record_refuses_a_record_over_max_record() -> None:
    """Our own oversized record is our bug: LocalPhoneError, and nothing is queued."""
    link = Link(LinkParams(max_record=100), 0.0)
    with pytest.raises(LocalPhoneError):
        link.send_record(bytes(101))
    assert link.idle and link.queued_bytes == 0
    link.send_record(bytes(100))
    assert link.queued_bytes == 101


def test_peer_record_over_max_record_kills_the_link_without_raising() -> None:
    """A peer announcing a record longer than we accept gets LinkDead, not an exception."""
    sender = Link(LinkParams(max_record=5000), 0.0)
    receiver = Link(LinkParams(max_record=1000), 0.0)
    sender.send_record(bytes(1001))
    receiver.receive_data(sender.data_to_send(0.0), 0.1)
    event = receiver.next_event()
    assert isinstance(event, LinkDead)
    assert "1001" in event.reason
    assert receiver.dead and receiver.next_event() is None
    assert receiver.data_to_send(0.2) == b""
    with pytest.raises(LocalPhoneError):
        receiver.send_record(b"x")


def test_record_length_prefix_longer_than_five_bytes_kills_the_link() -> None:
    """A length prefix that never ends is a protocol error, reported as LinkDead."""
    receiver = Link(LinkParams(), 0.0)
    frame = Frame(FrameKind.DATA | FrameFlag.PUSH, 0, b"\xff" * 6)
    receiver.receive_data(encode_frame(frame), 0.0)
    assert isinstance(receiver.next_event(), LinkDead)


def test_malformed_ack_block_kills_the_link_without_raising() -> None:
    """A checked frame with a cut-off ack block, or acking unsent data, is LinkDead."""
    for payload, seq in ((b"\x03\x81", 0), (b"\x00", 99)):
        link = Link(LinkParams(), 0.0)
        link.receive_data(encode_frame(Frame(FrameKind.ACK, seq, payload)), 0.0)
        assert isinstance(link.next_event(), LinkDead)


def test_unknown_frame_kinds_are_skipped() -> None:
    """A frame of a kind from a later version is ignored, and what follows still counts."""
    sender, receiver = Link(LinkParams(), 0.0), Link(LinkParams(), 0.0)
    sender.send_record(b"hello")
    wire = encode_frame(Frame(0x3E, 0, b"future")) + sender.data_to_send(0.0)
    receiver.receive_data(wire, 0.0)
    assert receiver.next_event() == RecordReceived(b"hello")


def test_line_drop_is_link_dead() -> None:
    """End of file from the transport is LinkDead("line dropped"), after what came before."""
    sender, receiver = Link(LinkParams(), 0.0), Link(LinkParams(), 0.0)
    sender.send_record(b"last words")
    receiver.receive_data(sender.data_to_send(0.0), 0.5)
    receiver.receive_data(b"", 0.6)
    assert receiver.next_event() == RecordReceived(b"last words")
    assert receiver.next_event() == LinkDead("line dropped")
    assert receiver.next_deadline() is None


def test_params_are_validated() -> None:
    """Impossible settings are refused when made."""
    for bad in (
        {"min_frame_payload": 8},
        {"min_frame_payload": 500, "max_frame_payload": 400},
        {"max_frame_payload": 1 << 15},
        {"window": 1000},
        {"max_record": -1},
        {"keepalive": 0.0},
        {"keepalive": 60.0, "dead_after": 60.0},
    ):
        with pytest.raises(LocalPhoneError):
            LinkParams(**bad)  # type: ignore[arg-type]


def test_sequence_numbers_wrap_around_24_bits() -> None:
    """A 24-bit sequence field is read as the offset nearest to the one expected."""
    assert unwrap_seq(5, (1 << 24) - 10) == (1 << 24) + 5
    assert unwrap_seq((1 << 24) - 3, 1 << 24) == (1 << 24) - 3
    assert unwrap_seq(100, 50) == 100
    assert unwrap_seq(3, 10 * (1 << 24) + 1) == 10 * (1 << 24) + 3


def test_reconfigure_applies_agreed_values() -> None:
    """After reconfigure, frames keep to the new size and records to the new limit."""
    params = LinkParams(min_frame_payload=100, max_frame_payload=300, max_record=20_000)
    a, b = Link(LinkParams(), 0.0), Link(LinkParams(), 0.0)
    a.reconfigure(params)
    b.reconfigure(params)
    with pytest.raises(LocalPhoneError):
        a.send_record(bytes(20_001))
    a.send_record(bytes(10_000))
    wire = a.data_to_send(0.0)
    frames = FrameDecoder().feed(wire)
    assert frames and all(len(frame.payload) <= 300 for frame in frames)
    b.receive_data(wire, 0.1)
    assert b.next_event() == RecordReceived(bytes(10_000))


# -- acknowledgement, resending --------------------------------------------------------


def test_only_the_lost_frame_is_resent_and_without_waiting_for_the_timer() -> None:
    """One frame lost in a burst: its bytes alone are resent (perhaps in smaller frames, as
    the loss made the link cautious), as soon as later frames' acks show the gap."""
    lost = 3

    def drop_one(direction: str, index: int, chunk: bytes) -> bytes:
        return b"" if direction == "a>b" and index == lost else chunk

    params = LinkParams(max_frame_payload=1024)
    sent = records(20, 1000)
    outcome = simulate(sent, [], Conditions(latency=0.05), params=params, tamper=drop_one)
    assert outcome.b.received == sent
    writes = outcome.a_to_b.writes
    (original,) = FrameDecoder().feed(writes[lost][1])
    assert outcome.a.link.stats().bytes_resent == len(original.payload)
    data_sent = [
        (when, frame) for when, chunk in writes for frame in data_frames(FrameDecoder().feed(chunk))
    ]
    seen: set[int] = set()
    resends = []
    for when, frame in data_sent:
        if frame.seq in seen or original.seq <= frame.seq < original.seq + len(original.payload):
            resends.append((when, frame))
        seen.add(frame.seq)
    resends = [(when, frame) for when, frame in resends if when > writes[lost][0]]
    assert b"".join(frame.payload for _, frame in resends) == original.payload
    assert resends[0][0] - writes[lost][0] < MIN_RTO


def test_a_lost_last_frame_is_probed_before_the_timeout() -> None:
    """The tail of a burst lost: it is resent after about two round trips, not a timeout."""

    def drop_last(direction: str, index: int, chunk: bytes) -> bytes:
        return b"" if direction == "a>b" and index == 9 else chunk

    params = LinkParams(max_frame_payload=512)
    first = simulate(records(1, 5 * 512), [], Conditions(), params=params)
    assert len(first.a_to_b.writes) >= 5
    sent = records(1, 10 * 512 - 20)
    outcome = simulate(sent, [], Conditions(), params=params, tamper=drop_last)
    assert outcome.b.received == sent
    writes = outcome.a_to_b.writes
    lost_at = writes[9][0]
    resent_at = writes[10][0]
    assert 0 < resent_at - lost_at < MIN_RTO


def test_a_lost_acknowledgement_is_repeated_when_the_data_comes_again() -> None:
    """The peer resending what we hold means our ack was lost: we ack again at once,
    without waiting for the keepalive."""

    def drop_first_ack(direction: str, index: int, chunk: bytes) -> bytes:
        return b"" if direction == "b>a" and index == 0 else chunk

    sent = records(1, 1000)
    outcome = simulate(sent, [], Conditions(), tamper=drop_first_ack)
    assert outcome.b.received == sent and outcome.a.link.idle
    assert outcome.a.link.stats().frames_resent >= 1
    assert outcome.finished_at < LinkParams().keepalive - 1


def test_the_sender_keeps_within_the_window() -> None:
    """Without acknowledgements, no more than ``window`` bytes of new data go out (and
    no sliver smaller than a frame to fill it to the last byte)."""
    params = LinkParams(window=8192, max_frame_payload=1024)
    link = Link(params, 0.0)
    for record in records(50, 1000):
        link.send_record(record)
    sent = FrameDecoder().feed(b"".join(link.data_to_send(t / 2) for t in range(40)))
    ends = [frame.seq + len(frame.payload) for frame in data_frames(sent)]
    assert params.window - params.max_frame_payload < max(ends) <= params.window


def test_a_damaged_frame_is_named_and_resent_at_once() -> None:
    """A frame that arrives damaged (its header intact) is asked for again by name and
    resent at once, even the last one, which no later frame could show lost."""

    def damage_last(direction: str, index: int, chunk: bytes) -> bytes:
        if direction == "a>b" and index == 2:
            return chunk[:-10] + bytes(byte ^ 0xFF for byte in chunk[-10:])
        return chunk

    params = LinkParams(max_frame_payload=512, min_frame_payload=512)
    sent = records(1, 3 * 512 - 20)
    outcome = simulate(sent, [], Conditions(), params=params, tamper=damage_last)
    assert outcome.b.received == sent
    acks = frames_written(outcome, "b>a")
    assert any(frame.kind & FrameFlag.NACK for frame in acks)
    writes = outcome.a_to_b.writes
    assert len(writes) == 4
    damaged_at, resent_at = writes[2][0], writes[3][0]
    frame_time = len(writes[2][1]) / LINE_RATE
    assert resent_at - damaged_at < 2 * frame_time + 0.01  # the one before it, then it
    assert outcome.a.link.stats().frames_resent == 1


def test_acks_with_too_many_ranges_say_so_and_nothing_is_resent_needlessly() -> None:
    """When holes are too many to list, the ack says ranges were left out, and the
    sender takes nothing beyond the last one listed for lost."""
    params = LinkParams(min_frame_payload=64, max_frame_payload=64, window=1 << 20)
    sender, receiver = Link(params, 0.0), Link(params, 0.0)
    sender.send_record(bytes(64 * 300))
    frames = FrameDecoder().feed(sender.data_to_send(0.0))
    assert len(frames) > 200
    for frame in frames[1::2]:  # every other frame lost: more holes than an ack can list
        receiver.receive_data(encode_frame(frame), 0.1)
    (ack,) = FrameDecoder().feed(receiver.data_to_send(0.1))
    assert ack.kind == FrameKind.ACK and ack.payload[0] & 0x80
    sender.receive_data(encode_frame(ack), 0.2)
    again = {frame.seq for frame in data_frames(FrameDecoder().feed(sender.data_to_send(0.2)))}
    assert again & {frame.seq for frame in frames[0::2]}
    assert not again & {frame.seq for frame in frames[1::2]}


def test_acks_ride_on_data_when_both_ways_carry_data() -> None:
    """With data both ways, acknowledgements travel in data frames; few go alone."""
    sent = records(30, 4096)
    outcome = simulate(sent, sent, Conditions())
    assert outcome.a.received == sent and outcome.b.received == sent
    frames = frames_written(outcome, "a>b")
    data = data_frames(frames)
    alone = [frame for frame in frames if frame.kind == FrameKind.ACK]
    carrying = [frame for frame in data if frame.kind & FrameFlag.ACK_BLOCK]
    assert len(carrying) >= len(data) // 2
    assert len(alone) <= len(data) // 5


def test_not_one_ack_per_frame() -> None:
    """Acknowledgements of in-order data cover several frames each."""
    params = LinkParams(max_frame_payload=256)
    outcome = simulate(records(40, 1000), [], Conditions(), params=params)
    sent = data_frames(frames_written(outcome, "a>b"))
    acks = frames_written(outcome, "b>a")
    assert len(acks) * 2 <= len(sent)


def test_a_600_ms_round_trip_does_not_stall_the_line() -> None:
    """With 300 ms each way the window covers the round trip: the sender never waits."""
    sent = records(50, 4096)
    outcome = simulate(sent, [], Conditions(latency=0.3))
    assert outcome.b.received == sent
    writes = outcome.a_to_b.writes
    busy = sum(len(chunk) for _, chunk in writes) / LINE_RATE
    assert outcome.a_to_b.busy_until - writes[0][0] < busy * 1.01
    assert efficiency(outcome, outcome.b, 50 * 4096) >= 0.95


def test_deep_transmit_buffers_do_not_stall_data_both_ways() -> None:
    """With 22 KiB queued between each driver and its line (a pty's share) and frames
    damaged, data both ways still keeps both directions busy: the flight limit keeps the
    queues short, so acknowledgements and resends are not held up behind them."""
    sent = [b"hello", *records(50, 4096)]
    conditions = Conditions(tx_buffer=22 * 1024, ber=1e-5)
    outcome = simulate(sent, sent, conditions, hello=True, seed=1)
    assert outcome.a.received == sent and outcome.b.received == sent
    assert 2 * 50 * 4096 / (2 * LINE_RATE * outcome.finished_at) >= 0.84


def test_recovery_after_the_line_went_quiet_resends_at_once() -> None:
    """After two seconds in which nothing got through, what was lost is resent promptly,
    and the outage is not taken for damage: frames stay large."""
    sent = records(30, 4096)
    clean = simulate(sent, [], Conditions())
    outcome = simulate(sent, [], Conditions(quiet=(3.0, 5.0)))
    assert outcome.b.received == sent
    assert outcome.finished_at < clean.finished_at + 2.0 + 2 * MIN_RTO + 1.0
    assert outcome.a.link.stats().frame_payload >= 1024


def test_round_trip_is_measured() -> None:
    """The smoothed round trip reflects the line's latency and a frame's transmission."""
    params = LinkParams(max_frame_payload=64, min_frame_payload=64)
    outcome = simulate(records(30, 100), [], Conditions(latency=0.25), params=params)
    rtt = outcome.a.link.stats().rtt
    assert rtt is not None
    assert 0.5 < rtt < 0.5 + 0.3


def test_timeouts_back_off_when_the_line_goes_silent() -> None:
    """With the peer gone, resends come at doubling intervals (up to a ceiling), then the
    link is dead when dead_after has passed."""
    link = Link(LinkParams(keepalive=100.0, dead_after=200.0), 0.0)
    link.send_record(bytes(100))
    now, sends = 0.0, []
    while now < 300:
        if link.data_to_send(now):
            sends.append(now)
        deadline = link.next_deadline()
        if deadline is None:
            break
        now = deadline
    gaps = [later - earlier for earlier, later in itertools.pairwise(sends)]
    assert len(gaps) >= 4
    assert gaps[1] == pytest.approx(2 * gaps[0])
    assert all(later >= earlier for earlier, later in itertools.pairwise(gaps))
    event = link.next_event()
    assert isinstance(event, LinkDead)
    assert now == pytest.approx(200.0)


def test_timeouts_stay_short_while_the_peer_is_heard() -> None:
    """A peer that keeps talking shows the line works: the timeout doubles only once, so
    a frame that keeps getting lost is tried again every few seconds."""
    link = Link(LinkParams(keepalive=100.0, dead_after=200.0), 0.0)
    link.send_record(bytes(100))
    keepalive = encode_frame(Frame(FrameKind.ACK, 0, b"\x00"))
    sends = []
    for tenth in range(1, 1000):
        now = tenth / 10
        if tenth % 10 == 0:
            link.receive_data(keepalive, now)
        if data_frames(FrameDecoder().feed(link.data_to_send(now))):
            sends.append(now)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sends)]
    assert len(gaps) > 10
    assert max(gaps) <= 2 * INITIAL_RTO + 0.1
    assert not link.dead


# -- frame size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ber", "low", "high"),
    [(0.0, 4096, 4096), (1e-5, 200, 1000), (1e-4, 64, 250)],
)
def test_frame_size_follows_the_damage_rate(ber: float, low: int, high: int) -> None:
    """Frames shrink on a noisy line, to a few hundred bytes at 1e-5, and stay large when clean."""
    sent = records(50, 4096)
    outcome = simulate(sent, [], Conditions(ber=ber), seed=3)
    assert outcome.b.received == sent
    assert low <= outcome.a.link.stats().frame_payload <= high


def test_frame_size_grows_back_when_the_line_clears() -> None:
    """After the noise stops, frames grow back to the largest allowed."""
    noisy = simulate(records(30, 4096), [], Conditions(ber=1e-4), seed=4)
    link = noisy.a.link
    small = link.stats().frame_payload
    assert small < 400
    peer = noisy.b.link
    now = noisy.finished_at
    for record in records(100, 4096, seed=2):
        link.send_record(record)
    while not link.idle and not link.dead:
        now += 0.05
        exchange(link, peer, now, max_bytes=600)
        exchange(peer, link, now)
        while peer.next_event() is not None:
            pass
    assert link.stats().frame_payload == 4096


# -- liveness ----------------------------------------------------------------------


def test_idle_links_keep_each_other_alive() -> None:
    """Two idle links exchange keepalives and outlive many dead_after periods."""
    outcome = simulate([], [], Conditions(), params=FAST, time_limit=100.0, run_to_limit=True)
    assert outcome.a.dead is None and outcome.b.dead is None
    keepalives = frames_written(outcome, "a>b")
    assert len(keepalives) >= 100 / FAST.keepalive - 2
    assert all(frame.kind == FrameKind.ACK for frame in keepalives)


def test_silent_peer_is_link_dead() -> None:
    """When the line goes quiet both ends report LinkDead after dead_after."""
    sent = records(10, 4096)
    outcome = simulate(sent, sent, Conditions(silent_after=2.0), params=FAST, time_limit=60)
    for end in (outcome.a, outcome.b):
        assert isinstance(end.dead, LinkDead)
        assert "nothing heard" in end.dead.reason or "acknowledged nothing" in end.dead.reason
    assert outcome.finished_at < 2.0 + FAST.dead_after + 1


def test_data_never_acknowledged_is_link_dead_even_with_keepalives() -> None:
    """If one direction is broken, the sender gives up after dead_after despite keepalives."""

    def break_a_to_b(direction: str, index: int, chunk: bytes) -> bytes:
        return chunk if direction == "b>a" or index == 0 else b""

    outcome = simulate(records(5, 4096), [], Conditions(), params=FAST, tamper=break_a_to_b)
    assert isinstance(outcome.a.dead, LinkDead)
    assert "acknowledged nothing" in outcome.a.dead.reason


def test_a_reader_that_falls_behind_holds_the_peer_back() -> None:
    """Records not taken by next_event count against the window: memory stays bounded."""
    params = LinkParams(window=8192, max_frame_payload=1024)
    sender, receiver = Link(params, 0.0), Link(params, 0.0)
    for record in records(100, 1000):
        sender.send_record(record)
    now = 0.0
    for _ in range(400):
        now += 0.1
        exchange(sender, receiver, now)
        exchange(receiver, sender, now)
    assert sender.queued_bytes > 80_000
    assert receiver.stats().payload_bytes_received <= 2 * params.window
    assert receiver.buffered_bytes <= 2 * params.window
    taken = []
    while not sender.idle:
        while (event := receiver.next_event()) is not None:
            assert isinstance(event, RecordReceived)
            taken.append(event.record)
        now += 0.1
        exchange(sender, receiver, now)
        exchange(receiver, sender, now)
    while (event := receiver.next_event()) is not None:
        assert isinstance(event, RecordReceived)
        taken.append(event.record)
    assert taken == records(100, 1000)


def test_a_due_acknowledgement_wakes_the_driver_once() -> None:
    """A driver that can only tick (its transport is full) is not woken again and again
    for an acknowledgement only data_to_send can send; data_to_send then sends it."""
    sender, receiver = Link(LinkParams(), 0.0), Link(LinkParams(), 0.0)
    sender.send_record(bytes(5000))
    second = FrameDecoder().feed(sender.data_to_send(0.0))[1]
    receiver.receive_data(encode_frame(second), 0.5)  # out of order: an ack is due now
    assert receiver.next_deadline() == 0.5
    receiver.tick(0.5)
    deadline = receiver.next_deadline()
    assert deadline is not None and deadline > 0.5
    acks = FrameDecoder().feed(receiver.data_to_send(0.6, max_bytes=0))
    assert [frame.kind for frame in acks] == [FrameKind.ACK]


def test_settled_once_the_last_acknowledgement_is_out() -> None:
    """After the peer's last frame (pushed) the link owes an ack at once; once it is
    written the link is settled, with no delay to wait out."""
    sender, receiver = Link(LinkParams(), 0.0), Link(LinkParams(), 0.0)
    sender.send_record(b"bye")
    receiver.receive_data(sender.data_to_send(0.0), 0.1)
    assert receiver.idle and not receiver.settled
    assert receiver.next_deadline() == 0.1
    sender.receive_data(receiver.data_to_send(0.1), 0.2)
    assert receiver.settled and sender.settled


def test_varint_lengths() -> None:
    """Record lengths use LEB128: one byte below 128, more above."""
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(1 << 20) == b"\x80\x80\x40"


# -- the property ------------------------------------------------------------------

conditions_strategy = st.builds(
    Conditions,
    rate=st.sampled_from([LINE_RATE, 100_000.0]),
    latency=st.sampled_from([0.0, 0.01, 0.3]),
    ber=st.sampled_from([0.0, 1e-5, 1e-4, 1e-3]),
    drop=st.sampled_from([0.0, 0.01, 0.1]),
    truncate=st.sampled_from([0.0, 0.01, 0.1]),
    duplicate=st.sampled_from([0.0, 0.05]),
    reorder=st.sampled_from([0.0, 0.05]),
    noise=st.sampled_from([0.0, 0.05]),
    silent_after=st.sampled_from([float("inf"), float("inf"), 0.5, 3.0]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conditions=conditions_strategy,
    seed=st.integers(0, 2**32),
    sizes_a=st.lists(st.integers(0, 6000), max_size=6),
    sizes_b=st.lists(st.integers(0, 6000), max_size=6),
)
def test_every_record_arrives_once_in_order_or_the_link_is_dead(
    conditions: Conditions, seed: int, sizes_a: list[int], sizes_b: list[int]
) -> None:
    """Whatever the line does, each end gets a prefix of what the other sent, byte for
    byte, each record once; if it is not all of it, that end reported LinkDead."""
    rng = random.Random(seed)
    sent_a = [rng.randbytes(size) for size in sizes_a]
    sent_b = [rng.randbytes(size) for size in sizes_b]
    params = LinkParams(max_frame_payload=2048)
    outcome = simulate(sent_a, sent_b, conditions, seed=seed, params=params, time_limit=900)
    for end, expected in ((outcome.a, sent_b), (outcome.b, sent_a)):
        assert end.received == expected[: len(end.received)]
        if len(end.received) < len(expected):
            assert isinstance(end.dead, LinkDead)
    per_piece = sum(
        (conditions.drop, conditions.truncate, conditions.duplicate, conditions.reorder)
    )
    if conditions.silent_after == float("inf") and conditions.ber < 1e-3 and per_piece <= 0.15:
        assert outcome.a.received == sent_b and outcome.b.received == sent_a


frame_strategy = st.builds(
    Frame,
    kind=st.sampled_from(
        [
            FrameKind.DATA,
            FrameKind.DATA | FrameFlag.PUSH,
            FrameKind.DATA | FrameFlag.ACK_BLOCK,
            FrameKind.ACK,
            0x3F,
        ]
    ),
    seq=st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 24) - 1)),
    payload=st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(frame_strategy.map(encode_frame), st.binary(min_size=1, max_size=200)),
        max_size=30,
    ),
    outgoing=st.lists(st.binary(max_size=3000), max_size=3),
)
def test_hostile_frames_never_raise(pieces: list[bytes], outgoing: list[bytes]) -> None:
    """Checked frames with arbitrary contents, mixed with noise, give events or LinkDead,
    never an exception, and the link's memory stays within its window."""
    params = LinkParams(window=8192, max_record=4096, max_frame_payload=1024)
    link = Link(params, 0.0)
    for record in outgoing:
        link.send_record(record)
    now = 0.0
    for piece in pieces:
        now += 0.25
        link.data_to_send(now, max_bytes=1500)
        link.receive_data(piece, now)
        link.tick(now)
        while (event := link.next_event()) is not None:
            assert isinstance(event, RecordReceived | LinkDead)
            if isinstance(event, RecordReceived):
                assert len(event.record) <= params.max_record
        assert link.stats().garbage_bytes <= link.stats().wire_bytes_received
        bound = 2 * (params.window + params.max_record) + FrameDecoder.limit
        assert link.buffered_bytes <= bound
        assert link.queued_bytes <= sum(len(record) + 2 for record in outgoing)

"""Hostile input to the session engine: it answers or hangs up, never raises, leaks nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from relay.envelope import Envelope
from relay.reply import Reply, ReplyCode
from relay.sansio.phone import records
from relay.sansio.phone.accounting import CallOutcome
from relay.sansio.phone.records import Answer, Role
from relay.sansio.phone.session import (
    Acceptance,
    Authenticated,
    InventoryReceived,
    ProposalReceived,
    SessionState,
)

from support.phone.memstore import MemoryPhoneStore
from support.phone.session_harness import HUB, SITE, End, envelope, make_end, real_link

_TYPES = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x00, 0xFF]
fuzz_records = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from(_TYPES), st.binary(max_size=120)).map(
            lambda t: bytes((t[0],)) + t[1]
        ),
    ),
    max_size=12,
)


def _pump(a: End, b: End, rounds: int = 50) -> None:
    """Move bytes both ways until neither end has more to say."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.session.data_to_send(0.0)
            src.handler.handle_events()
            if data:
                moved = True
                dst.session.receive_data(data, 0.0)
                dst.handler.handle_events()
        if not moved:
            return


def _events(end: End) -> list[object]:
    seen = []
    while (event := end.session.next_event()) is not None:
        seen.append(event)
    return seen


@settings(max_examples=300, deadline=None)
@given(fuzz_records)
def test_a_fuzzed_handshake_never_raises_and_never_authenticates(blobs: list[bytes]) -> None:
    """Arbitrary records instead of a caller's hello and proof: no exception, no mail."""
    site = MemoryPhoneStore()
    site.put(HUB, "m1", envelope(), b"private")
    answerer = make_end(Role.ANSWERER, site)
    fake_caller = make_end(Role.CALLER, MemoryPhoneStore())  # only its link is used
    for blob in blobs:
        fake_caller.link.send_record(blob)
    answerer.session.receive_data(fake_caller.link.data_to_send(0.0), 0.0)
    events = _events(answerer)
    assert not [e for e in events if isinstance(e, Authenticated | InventoryReceived)]
    assert b"m1" not in answerer.session.data_to_send(0.0)
    answerer.session.tick(1e6)
    answerer.session.tick(2e6)
    assert answerer.session.state is SessionState.ENDED


@settings(max_examples=300, deadline=None)
@given(fuzz_records)
def test_fuzzed_records_after_the_handshake_are_answered_or_hung_up(blobs: list[bytes]) -> None:
    """After a real handshake, arbitrary records never raise: the engine goes on or aborts."""
    caller = make_end(Role.CALLER, MemoryPhoneStore())
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    _pump(caller, answerer)
    assert answerer.session.state in (SessionState.RUNNING, SessionState.CLOSING)
    for blob in blobs:
        caller.link.send_record(blob)
    _pump(caller, answerer)
    answerer.session.tick(1e6)
    answerer.handler.handle_events()
    s = answerer.summary
    if s is not None and s.outcome is not CallOutcome.COMPLETED:
        assert s.outcome is CallOutcome.PROTOCOL_ERROR


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=500), max_size=10))
def test_line_noise_into_the_real_link_never_raises(chunks: list[bytes]) -> None:
    """Bytes straight from a noisy line into a session over the real link never raise."""
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore(), link_factory=real_link)
    for chunk in chunks:
        answerer.session.receive_data(chunk, 0.5)
        answerer.handler.handle_events()
        answerer.session.data_to_send(0.5)
    assert answerer.session.state in (
        SessionState.GREETING,
        SessionState.REFUSING,
        SessionState.ENDED,
    )


class UndecidedStore(MemoryPhoneStore):
    """A store that never decides a proposal (its Deferred never fires)."""

    def accept(
        self, site: str, message_id: str, envelope: Envelope, size: int
    ) -> Deferred[Acceptance]:
        return Deferred()


def test_a_final_reply_before_the_answer_is_a_protocol_error_and_an_abort() -> None:
    """A record out of turn (a final reply for a proposal not yet answered) aborts the call."""
    hub = MemoryPhoneStore()
    hub.put(SITE, "m1", envelope(), b"x" * 100)
    caller = make_end(Role.CALLER, hub)
    answerer = make_end(Role.ANSWERER, UndecidedStore())
    _pump(caller, answerer)
    assert caller.session.state is SessionState.RUNNING and "m1" in hub.outbox[SITE]
    answerer.link.send_record(records.encode(records.FinalReply(1, Reply(ReplyCode.OK))))
    answerer.link.send_record(records.encode(Answer(1, whole=Reply(ReplyCode.OK))))
    _pump(caller, answerer)
    caller.session.tick(100.0)
    caller.handler.handle_events()
    assert caller.summary is not None
    assert caller.summary.outcome is CallOutcome.PROTOCOL_ERROR
    assert "m1" in hub.outbox[SITE]  # nothing settled on the strength of garbage


def test_a_proposal_before_the_inventory_is_a_protocol_error() -> None:
    """A proposal out of turn (before the inventory) aborts the call; nothing is stored."""
    caller = make_end(Role.CALLER, MemoryPhoneStore())
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    answerer.session.receive_data(caller.session.data_to_send(0.0), 0.0)
    for byte in answerer.session.data_to_send(0.0):
        caller.session.receive_data(bytes((byte,)), 0.0)
        if caller.session.state is SessionState.PROVING:
            break  # our proof is queued, the answerer's not yet read: inject a proposal
    env = records.MailEnvelope.from_envelope(envelope())
    caller.link.send_record(records.encode(records.Propose(1, "m1", 3, b"d" * 32, env)))
    answerer.session.receive_data(caller.session.data_to_send(0.0), 0.0)
    _pump(caller, answerer)
    events = _events(answerer)
    assert not [e for e in events if isinstance(e, ProposalReceived)]
    answerer.session.tick(100.0)
    assert answerer.session.state is SessionState.ENDED


def test_a_hello_with_unworkable_link_limits_is_refused_without_raising() -> None:
    """A hello asking for a window smaller than a frame is a protocol error: refused."""
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    fake_caller = make_end(Role.CALLER, MemoryPhoneStore())
    caps = records.Capabilities(64, 4096, 100, 1 << 20, 1 << 20, True, False)
    hello = records.Hello(1, 0, Role.CALLER, HUB, b"n" * 32, caps)
    fake_caller.link.send_record(records.encode(hello))
    answerer.session.receive_data(fake_caller.link.data_to_send(0.0), 0.0)
    assert answerer.session.state is SessionState.REFUSING
    answerer.session.tick(100.0)
    answerer.handler.handle_events()
    assert answerer.summary is not None
    assert answerer.summary.outcome is CallOutcome.PROTOCOL_ERROR

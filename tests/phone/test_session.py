"""The phone session engine, two ends back to back in memory over a perfect record link."""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import Deferred, fail
from zope.interface.verify import verifyObject

from relay.envelope import Envelope
from relay.interfaces import IPhoneStore
from relay.reply import ReplyCode
from relay.sansio.phone import handshake
from relay.sansio.phone.accounting import CallOutcome
from relay.sansio.phone.link import LinkParams
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import Authenticated, InventoryReceived, SessionOptions

from support.phone.link_harness import Conditions
from support.phone.memstore import MemoryPhoneStore
from support.phone.session_harness import (
    HUB,
    SITE,
    CutLine,
    End,
    Line,
    LossyLine,
    Stuck,
    envelope,
    make_end,
    real_link,
    run_call,
)


def _pair(
    hub: MemoryPhoneStore | None = None,
    site: MemoryPhoneStore | None = None,
    caller_options: SessionOptions | None = None,
    answerer_options: SessionOptions | None = None,
) -> tuple[End, End]:
    return (
        make_end(Role.CALLER, hub or MemoryPhoneStore(), options=caller_options),
        make_end(Role.ANSWERER, site or MemoryPhoneStore(), options=answerer_options),
    )


def test_mail_one_way_arrives_once_and_byte_identical() -> None:
    """Messages the caller holds for the site are stored there exactly, then leave its outbox."""
    hub = MemoryPhoneStore()
    texts = {f"m{i}": os.urandom(100 + 1000 * i) for i in range(5)}
    for mid, text in texts.items():
        hub.put(SITE, mid, envelope(), text)
    caller, answerer = _pair(hub)
    run_call(caller, answerer)
    site = answerer.store
    assert {mid: t for mid, (_, t) in site.inbox[HUB].items()} == texts
    assert sorted(site.commits) == sorted((HUB, mid) for mid in texts)
    assert hub.outbox[SITE] == {}
    for end in (caller, answerer):
        assert end.summary is not None and end.summary.outcome is CallOutcome.COMPLETED
    assert caller.summary is not None and caller.summary.messages_sent == 5
    assert caller.summary.payload_bytes_sent == sum(map(len, texts.values()))
    assert answerer.summary is not None and answerer.summary.messages_received == 5


def test_the_inventory_lists_what_is_offered_once_the_peer_is_proven() -> None:
    """Each side learns the ids and sizes the other holds for it, after authentication."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    hub.put(SITE, "h1", envelope(), b"a" * 10)
    site.put(HUB, "s1", envelope(), b"b" * 20)
    caller, answerer = _pair(hub, site)
    seen: list[object] = []
    for end in (caller, answerer):
        original = end.handler._dispatch
        end.handler._dispatch = lambda e, o=original: (seen.append(e), o(e))[1]  # type: ignore[method-assign]
    run_call(caller, answerer)
    items = {
        i.message_id: i.size for e in seen if isinstance(e, InventoryReceived) for i in e.items
    }
    assert items == {"h1": 10, "s1": 20}
    first_auth = min(i for i, e in enumerate(seen) if isinstance(e, Authenticated))
    assert all(not isinstance(e, InventoryReceived) for e in seen[:first_auth])


def test_mail_flows_both_ways_in_one_call() -> None:
    """Submit and pickup run in the same call: each side stores what the other held."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    for i in range(4):
        hub.put(SITE, f"h{i}", envelope(), b"to site %d\r\n" % i * 500)
        site.put(HUB, f"s{i}", envelope("<alice@hub.example>"), b"to hub %d\r\n" % i * 700)
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer)
    assert set(site.inbox[HUB]) == {f"h{i}" for i in range(4)}
    assert set(hub.inbox[SITE]) == {f"s{i}" for i in range(4)}
    assert hub.inbox[SITE]["s2"][1] == b"to hub 2\r\n" * 700
    assert hub.outbox[SITE] == {} and site.outbox[HUB] == {}


def test_an_empty_call_hangs_up_cleanly() -> None:
    """With nothing to send either way the call still ends by agreement."""
    caller, answerer = _pair()
    run_call(caller, answerer)
    for end in (caller, answerer):
        assert end.summary is not None and end.summary.outcome is CallOutcome.COMPLETED
        assert end.summary.handshake_seconds is not None


def test_received_envelope_keeps_addresses_and_names_the_site() -> None:
    """The receiver's envelope has the sender's addresses and a phone submitter naming the peer."""
    hub = MemoryPhoneStore()
    hub.put(SITE, "m1", envelope("<x@site.example>", "<y@site.example>", sender="<>"), b"hi\r\n")
    caller, answerer = _pair(hub)
    run_call(caller, answerer)
    env, _ = answerer.store.inbox[HUB]["m1"]
    assert env.return_path is None
    assert [str(r.address) for r in env.recipients] == ["x@site.example", "y@site.example"]
    assert env.submitter.protocol == "phone" and env.submitter.client_name == HUB


def test_refused_address_gets_its_reply_and_the_others_the_final() -> None:
    """Address-then-text: a refused address keeps its refusal, accepted ones get the final OK."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore(refuse_user="nobody")
    hub.put(SITE, "m1", envelope("<nobody@site.example>", "<bob@site.example>"), b"x" * 3000)
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer)
    ((_, _, replies),) = hub.settled
    assert [r.code for r in replies] == [ReplyCode.USER, ReplyCode.OK]
    assert "m1" in site.inbox[HUB] and hub.outbox[SITE] == {}
    stored, _ = site.inbox[HUB]["m1"]
    assert [str(r.address) for r in stored.recipients] == ["bob@site.example"]


def test_a_message_held_already_is_not_sent_again() -> None:
    """A re-proposed id is answered "already have it": no text flows, the sender forgets it."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    hub.put(SITE, "m1", envelope(), b"a" * 5000)
    site.inbox[HUB] = {"m1": (envelope(), b"a" * 5000)}
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer)
    assert caller.summary is not None and caller.summary.payload_bytes_sent == 0
    ((_, _, replies),) = hub.settled
    assert replies[0].code is ReplyCode.DONE and hub.outbox[SITE] == {}
    assert site.commits == []


class _DropBeforeFinalReply(Line):
    """A perfect line that goes dead once the receiving store has committed, so its
    final reply never reaches the sender."""

    def __init__(self, receiver: MemoryPhoneStore) -> None:
        self.receiver = receiver

    def carry(self, direction: int, data: bytes, now: float) -> list[tuple[float, bytes]]:
        return [] if self.dropped(now) else [(now, data)]

    def dropped(self, now: float) -> bool:
        return bool(self.receiver.commits)


def test_a_refusal_whose_final_reply_was_lost_still_reaches_the_sender() -> None:
    """The line drops after the commit, before the final reply: the next call answers the
    re-proposal per recipient as the first answer did, so the refused address bounces and
    the accepted one is done, and no text flows again."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore(refuse_user="nobody")
    hub.put(SITE, "m1", envelope("<nobody@site.example>", "<bob@site.example>"), b"x" * 3000)
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer, _DropBeforeFinalReply(site))
    assert caller.summary is not None and caller.summary.outcome is CallOutcome.LINE_DROPPED
    assert site.commits == [(HUB, "m1")] and hub.settled == []
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer)
    ((_, _, replies),) = hub.settled
    assert [r.code for r in replies] == [ReplyCode.USER, ReplyCode.DONE]
    assert hub.outbox[SITE] == {} and site.commits == [(HUB, "m1")]
    assert caller.summary is not None and caller.summary.payload_bytes_sent == 0


def test_a_cut_message_resumes_from_the_offset_held() -> None:
    """After a drop in the middle of a text the next call sends only what the receiver lacks."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    text = os.urandom(200_000)
    hub.put(SITE, "big", envelope(), text)
    caller, answerer = _pair(hub, site, SessionOptions(compression=False))
    run_call(caller, answerer, CutLine(120_000))
    assert caller.summary is not None and caller.summary.outcome is CallOutcome.LINE_DROPPED
    held = len(site.partial[(HUB, "big")])
    assert 0 < held < len(text)
    caller, answerer = _pair(hub, site, SessionOptions(compression=False))
    run_call(caller, answerer)
    assert site.inbox[HUB]["big"][1] == text
    assert caller.summary is not None
    assert caller.summary.payload_bytes_sent == len(text) - held
    assert hub.outbox[SITE] == {}


def test_wrong_secret_fails_both_ends_after_a_delay_and_moves_nothing() -> None:
    """A wrong secret: each end reports the failure, waits the delay, ends; no mail moves."""
    hub = MemoryPhoneStore()
    hub.put(SITE, "m1", envelope(), b"secret mail")
    caller = make_end(Role.CALLER, hub, secrets={SITE: b"wrong" * 7})
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    trace = run_call(caller, answerer)
    for end in (caller, answerer):
        assert end.summary is not None and end.summary.outcome is CallOutcome.AUTH_FAILED
    assert trace.end_time >= SessionOptions().failure_delay
    assert b"m1" not in bytes(trace.written[0]) and b"secret mail" not in bytes(trace.written[0])
    assert "m1" in hub.outbox[SITE] and answerer.store.inbox == {}


def test_unknown_site_looks_like_a_wrong_secret_to_the_caller() -> None:
    """An unknown caller is refused; the caller cannot tell the name is unknown."""
    caller = make_end(Role.CALLER, MemoryPhoneStore(), name="stranger")
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    run_call(caller, answerer)
    assert answerer.summary is not None
    assert answerer.summary.outcome is CallOutcome.UNKNOWN_SITE
    assert caller.summary is not None and caller.summary.outcome is CallOutcome.AUTH_FAILED


def test_major_version_mismatch_is_a_clear_error_at_both_ends(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Different majors: both ends end with VERSION_MISMATCH naming both versions."""
    caller = make_end(Role.CALLER, MemoryPhoneStore())
    monkeypatch.setattr(handshake, "MAJOR", 2)
    answerer = make_end(Role.ANSWERER, MemoryPhoneStore())
    monkeypatch.undo()
    run_call(caller, answerer)
    for end in (caller, answerer):
        assert end.summary is not None
        assert end.summary.outcome is CallOutcome.VERSION_MISMATCH
        assert "2.0" in end.summary.reason and "1.0" in end.summary.reason


def test_silence_times_out_the_handshake() -> None:
    """A peer that never answers: the handshake times out, then the line is dropped."""
    caller = make_end(Role.CALLER, MemoryPhoneStore(), options=SessionOptions(handshake_timeout=30))
    caller.session.data_to_send(0.0)
    deadline = caller.session.next_deadline()
    assert deadline == 30
    caller.session.tick(30.0)
    caller.handler.handle_events()
    assert caller.summary is None  # the failure delay first
    caller.session.tick(caller.session.next_deadline() or 0)
    caller.handler.handle_events()
    assert caller.summary is not None and caller.summary.outcome is CallOutcome.TIMEOUT


def test_the_answerers_settings_for_the_caller_count_at_both_ends() -> None:
    """The answerer's per-site settings (compression off, encryption on for the hub),
    known only once the caller is named, are what both ends negotiate and use."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    plain = b"Subject: hello\r\n\r\n" + b"the same words again and again\r\n" * 500
    hub.put(SITE, "h1", envelope(), plain)
    site.put(HUB, "s1", envelope("<alice@hub.example>"), plain)
    caller = make_end(Role.CALLER, hub)
    answerer = make_end(
        Role.ANSWERER,
        site,
        site_options={HUB: SessionOptions(compression=False, encryption=True)},
    )
    trace = run_call(caller, answerer)
    for end in (caller, answerer):
        (auth,) = [e for e in end.seen if isinstance(e, Authenticated)]
        assert not auth.negotiated.compression and auth.negotiated.encryption
        assert end.summary is not None and end.summary.outcome is CallOutcome.COMPLETED
        assert end.summary.text_wire_bytes_sent >= len(plain)  # not deflated
    assert b"the same words" not in trace.written[0] + trace.written[1]  # sealed
    assert hub.inbox[SITE]["s1"][1] == plain and site.inbox[HUB]["h1"][1] == plain


def test_settings_for_other_sites_leave_the_answerer_on_its_defaults() -> None:
    """Per-site settings for another site change nothing for this caller."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    hub.put(SITE, "h1", envelope(), b"words words words\r\n" * 500)
    caller = make_end(Role.CALLER, hub)
    answerer = make_end(
        Role.ANSWERER, site, site_options={"other": SessionOptions(compression=False)}
    )
    run_call(caller, answerer)
    for end in (caller, answerer):
        (auth,) = [e for e in end.seen if isinstance(e, Authenticated)]
        assert auth.negotiated.compression and not auth.negotiated.encryption
    assert caller.summary is not None and caller.summary.text_wire_bytes_sent < 2000


def test_compression_shrinks_text_and_keeps_it_exact() -> None:
    """Compressible text travels deflated; incompressible text as it is; both arrive exact."""
    hub = MemoryPhoneStore()
    plain = b"Subject: hello\r\n\r\n" + b"the same words again and again\r\n" * 2000
    noise = os.urandom(30_000)
    hub.put(SITE, "text", envelope(), plain)
    hub.put(SITE, "noise", envelope(), noise)
    caller, answerer = _pair(hub)
    run_call(caller, answerer)
    assert answerer.store.inbox[HUB]["text"][1] == plain
    assert answerer.store.inbox[HUB]["noise"][1] == noise
    s = caller.summary
    assert s is not None and s.text_wire_bytes_sent < len(plain) // 5 + len(noise) + 100


def test_encryption_hides_the_text_and_delivers_it() -> None:
    """With encryption asked by one end the text never crosses the line in clear."""
    hub = MemoryPhoneStore()
    text = b"attack at dawn\r\n" * 100
    hub.put(SITE, "m1", envelope(), text)
    caller, answerer = _pair(hub, caller_options=SessionOptions(encryption=True, compression=False))
    trace = run_call(caller, answerer)
    assert answerer.store.inbox[HUB]["m1"][1] == text
    assert b"attack at dawn" not in bytes(trace.written[0])
    assert b"bob@site.example" not in bytes(trace.written[0])


class HeldCommits(MemoryPhoneStore):
    """Commits wait until the test releases them (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[str], tuple[str, str, Envelope, int, bytes]]] = []

    def commit(
        self, site: str, message_id: str, env: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.held.append((d, (site, message_id, env, size, digest)))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, args in held:
            MemoryPhoneStore.commit(self, *args).chainDeferred(d)


def test_the_sender_never_waits_for_one_final_reply_before_sending_the_next() -> None:
    """With every commit held, all texts still arrive; the final replies follow the commits."""
    hub, site = MemoryPhoneStore(), HeldCommits()
    texts = {f"m{i}": os.urandom(5000) for i in range(6)}
    for mid, text in texts.items():
        hub.put(SITE, mid, envelope(), text)
    caller, answerer = _pair(hub, site)
    with pytest.raises(Stuck):
        run_call(caller, answerer)
    assert {mid for _, mid in site.partial} == set(texts)
    assert all(bytes(site.partial[(HUB, mid)]) == text for mid, text in texts.items())
    assert len(site.held) == 6 and site.commits == [] and hub.settled == []
    site.release()
    run_call(caller, answerer)
    assert set(site.inbox[HUB]) == set(texts) and hub.outbox[SITE] == {}


class WriteLog(MemoryPhoneStore):
    """Remembers the order in which pieces of text were stored."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, int]] = []

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        self.writes.append((message_id, len(data)))
        return super().write_text(site, message_id, offset, data)


def test_small_messages_are_not_held_back_by_a_large_one_queued_before_them() -> None:
    """Behind a 400 kB message, five small ones complete after at most a window of it."""
    hub, site = MemoryPhoneStore(), WriteLog()
    hub.put(SITE, "big", envelope(), os.urandom(400_000))
    for i in range(5):
        hub.put(SITE, f"small{i}", envelope(), os.urandom(2000))
    caller = make_end(Role.CALLER, hub, link_factory=real_link)
    answerer = make_end(Role.ANSWERER, site, link_factory=real_link)
    run_call(caller, answerer, LossyLine(Conditions(), seed=1))
    last_small = max(i for i, (mid, _) in enumerate(site.writes) if mid != "big")
    big_before = sum(n for mid, n in site.writes[:last_small] if mid == "big")
    assert big_before <= LinkParams().window
    assert set(site.inbox[HUB]) == {"big", *(f"small{i}" for i in range(5))}


class FailingStore(MemoryPhoneStore):
    """Cannot store the text of ``bad`` (a full disk), or holds a damaged copy of ``damaged``."""

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        if message_id == "bad" or (message_id == "lastbad" and offset + len(data) == 6000):
            return fail(OSError(28, "No space left on device"))
        if message_id == "damaged":
            data = data[:-1] + bytes((data[-1] ^ 1,))
        return super().write_text(site, message_id, offset, data)


def test_a_message_the_receiver_cannot_store_stays_with_its_sender() -> None:
    """A store failure or a text that fails its hash is a temporary failure: the sender
    keeps the message for the next call, the rest of the call goes on."""
    hub, site = MemoryPhoneStore(), FailingStore()
    for mid in ("bad", "good", "damaged", "lastbad"):
        hub.put(SITE, mid, envelope(), os.urandom(6000))
    caller, answerer = _pair(hub, site)
    run_call(caller, answerer)
    assert set(site.inbox[HUB]) == {"good"}
    assert set(hub.outbox[SITE]) == {"bad", "damaged", "lastbad"}
    replies = {mid: r[0].code for _, mid, r in hub.settled}
    assert replies == {
        "good": ReplyCode.OK,
        "bad": ReplyCode.FIO,
        "damaged": ReplyCode.NET,
        "lastbad": ReplyCode.FIO,
    }
    for end in (caller, answerer):
        assert end.summary is not None and end.summary.outcome is CallOutcome.COMPLETED


def test_the_memory_store_provides_the_store_interface() -> None:
    """The tests' store is a real IPhoneStore."""
    assert verifyObject(IPhoneStore, MemoryPhoneStore())


def test_a_message_over_the_peers_limit_is_refused_without_being_proposed() -> None:
    """The peer's size limit from its hello: a bigger message fails for good at once."""
    hub = MemoryPhoneStore()
    hub.put(SITE, "huge", envelope(), b"x" * 5000)
    hub.put(SITE, "fits", envelope(), b"y" * 500)
    caller, answerer = _pair(hub, answerer_options=SessionOptions(max_message_size=1000))
    run_call(caller, answerer)
    replies = {mid: r[0].code for _, mid, r in hub.settled}
    assert replies == {"huge": ReplyCode.FSIZ, "fits": ReplyCode.OK}
    assert hub.outbox[SITE] == {} and set(answerer.store.inbox[HUB]) == {"fits"}

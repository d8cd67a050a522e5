"""Every reply of the MMDF table, in both modes, and every contract violation, end to end.

Each test runs a whole deliverer (MemoryQueue, task.Clock) against a scripted channel
that gives one reply at one point of the sequence, and checks what was recorded: the
recipient's state and attempts, whether the destination was rested, whether a DSN went
out, whether a violation was logged, and what became of the session.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from relay.channels.discard import DiscardChannel
from relay.envelope import Destination, RecipientState
from relay.errors import SessionFailed
from relay.interfaces import SequencingMode
from relay.reply import Action, Reply, ReplyCode

from test_deliver_fakes import (
    LIST,
    PER_ADDRESS,
    TEXT,
    Harness,
    Raise,
    Raw,
    ScriptedChannel,
    ZeroJitter,
    envelope,
)

DEST = Destination("fake", "dest.test")


class Expect(enum.Enum):
    """What the contract says a reply at a given point must lead to."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # kept queued, the destination goes on
    DEAD = "dead"  # kept queued, the destination rests
    BOUNCED = "bounced"  # failed, the sender gets a DSN
    VIOLATION = "violation"  # the channel broke the contract: deferred, session dropped


def _by_action(code: ReplyCode) -> Expect:
    return {
        Action.RETRY: Expect.DEFERRED,
        Action.HOST_DEAD: Expect.DEAD,
        Action.BOUNCE: Expect.BOUNCED,
    }[code.action]


def expected_for_address_in_list_mode(code: ReplyCode) -> Expect:
    """add_recipient in address-then-text mode: AOK (text follows), or a failure."""
    if code is ReplyCode.AOK:
        return Expect.DELIVERED  # the text follows and the default end_text says OK
    if code.action is Action.COMMIT:
        return Expect.VIOLATION
    return _by_action(code)


def expected_for_end_of_text(code: ReplyCode) -> Expect:
    """end_text: OK-like success for the message, or a failure; AOK and MOK are illegal."""
    if code in (ReplyCode.AOK, ReplyCode.MOK):
        return Expect.VIOLATION
    if code.action is Action.COMMIT:
        return Expect.DELIVERED
    return _by_action(code)


def expected_for_address_per_address(code: ReplyCode) -> Expect:
    """add_recipient in text-per-address mode: MOK (delivered), or a failure."""
    if code is ReplyCode.MOK:
        return Expect.DELIVERED
    if code.action in (Action.COMMIT, Action.TEXT_FOLLOWS):
        return Expect.VIOLATION
    return _by_action(code)


def _run(channel: ScriptedChannel) -> tuple[Harness, str]:
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("rcpt@dest.test"))
    return harness, queue_id


def _check(harness: Harness, queue_id: str, expect: Expect) -> None:
    status = harness.queue.statuses(queue_id)[0]
    channel = harness.channels["fake"]
    assert isinstance(channel, ScriptedChannel)
    dead = harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds())
    dsns = harness.notices()
    assert status.attempts == 1
    if expect is Expect.DELIVERED:
        assert status.state is RecipientState.DELIVERED
        assert channel.delivered == [(queue_id, "rcpt@dest.test")]
    elif expect is Expect.BOUNCED:
        assert status.state is RecipientState.FAILED
        assert len(dsns) == 1
    else:
        assert status.state is RecipientState.DEFERRED
        assert status.next_attempt == harness.clock.seconds() + 300
    if expect is not Expect.BOUNCED:
        assert dsns == []
    assert dead == (expect is Expect.DEAD)
    assert bool(harness.violations()) == (expect is Expect.VIOLATION)
    if expect in (Expect.VIOLATION, Expect.DEAD):
        assert channel.names()[-2:] == ["abort_message", "end_session"]
    else:
        assert "end_session" not in channel.names()  # the session stays open for reuse
    if expect is Expect.VIOLATION:
        (event,) = harness.violations()
        assert event["channel"] == "fake"
        assert status.last_reply is not None and status.last_reply.code is ReplyCode.AGN


@pytest.mark.parametrize("code", list(ReplyCode))
def test_every_reply_to_an_address_in_list_mode(code: ReplyCode) -> None:
    """add_recipient's reply in address-then-text mode is acted on as the contract says."""
    channel = ScriptedChannel(LIST, add_recipient=lambda r: Reply(code))
    harness, queue_id = _run(channel)
    expect = expected_for_address_in_list_mode(code)
    _check(harness, queue_id, expect)
    sent_text = "begin_text" in channel.names()
    assert sent_text == (code is ReplyCode.AOK)
    if expect in (Expect.DEFERRED, Expect.BOUNCED):
        assert channel.names(1)[-2:] == ["end_recipients", "abort_message"]


@pytest.mark.parametrize("code", list(ReplyCode))
def test_every_reply_to_the_end_of_text(code: ReplyCode) -> None:
    """end_text's reply applies to every accepted address as the contract says."""
    channel = ScriptedChannel(LIST, end_text=lambda: Reply(code))
    harness, queue_id = _run(channel)
    _check(harness, queue_id, expected_for_end_of_text(code))
    assert channel.names(1).count("write_text") == 1


@pytest.mark.parametrize("code", list(ReplyCode))
def test_every_reply_to_an_address_per_address(code: ReplyCode) -> None:
    """add_recipient's reply in text-per-address mode is acted on as the contract says."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(code))
    harness, queue_id = _run(channel)
    _check(harness, queue_id, expected_for_address_per_address(code))
    assert "begin_text" not in channel.names() and "write_text" not in channel.names()


def test_end_of_text_reply_applies_to_accepted_addresses_only() -> None:
    """Refused addresses keep their own reply; the final reply goes to the AOK ones only."""
    replies = {"a@dest.test": ReplyCode.AOK, "b@dest.test": ReplyCode.USER}
    channel = ScriptedChannel(
        LIST,
        add_recipient=lambda r: Reply(replies.get(str(r.address), ReplyCode.AOK)),
        end_text=lambda: Reply(ReplyCode.QUOT),
    )
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("a@dest.test", "b@dest.test", "c@dest.test"))
    codes = [s.last_reply.code for s in harness.queue.statuses(queue_id) if s.last_reply]
    assert codes == [ReplyCode.QUOT, ReplyCode.USER, ReplyCode.QUOT]
    assert len(harness.notices()) == 1  # all three failures in one DSN


def test_no_address_accepted_means_no_text() -> None:
    """When no address gets AOK the message is aborted and no text is sent."""
    channel = ScriptedChannel(LIST, add_recipient=lambda r: Reply(ReplyCode.USER))
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    harness.store(envelope("a@dest.test", "b@dest.test"))
    assert channel.names(1) == [
        "begin_message",
        "add_recipient",
        "add_recipient",
        "end_recipients",
        "abort_message",
    ]


# --- each contract violation ---------------------------------------------------------------


class Violation(enum.Enum):
    """The ways a channel can answer outside the contract."""

    MOK_TO_ADDRESS_IN_LIST_MODE = "MOK to add_recipient in list mode"
    AOK_TO_ADDRESS_PER_ADDRESS = "AOK to add_recipient in per-address mode"
    NOT_A_REPLY = "add_recipient fires with a string"
    AOK_TO_END_OF_TEXT = "end_text answers AOK"
    MOK_TO_END_OF_TEXT = "end_text answers MOK"
    NOT_A_DEFERRED = "begin_message returns None instead of a Deferred"
    SESSION_FAILED_WITH_SUCCESS = "add_recipient fails with SessionFailed(OK)"
    FAILED_DEFERRED = "add_recipient's Deferred fails"
    RAISES = "end_recipients raises"


def _violating_channel(violation: Violation) -> ScriptedChannel:
    aok = lambda r: Reply(ReplyCode.AOK)  # noqa: E731
    answers: dict[Violation, tuple[SequencingMode, dict[str, Any]]] = {
        Violation.MOK_TO_ADDRESS_IN_LIST_MODE: (
            LIST,
            {"add_recipient": lambda r: Reply(ReplyCode.MOK)},
        ),
        Violation.AOK_TO_ADDRESS_PER_ADDRESS: (PER_ADDRESS, {"add_recipient": aok}),
        Violation.NOT_A_REPLY: (LIST, {"add_recipient": lambda r: "250 ok"}),
        Violation.AOK_TO_END_OF_TEXT: (LIST, {"end_text": lambda: Reply(ReplyCode.AOK)}),
        Violation.MOK_TO_END_OF_TEXT: (LIST, {"end_text": lambda: Reply(ReplyCode.MOK)}),
        Violation.SESSION_FAILED_WITH_SUCCESS: (
            LIST,
            {"add_recipient": lambda r: SessionFailed(Reply(ReplyCode.OK))},
        ),
        Violation.FAILED_DEFERRED: (LIST, {"add_recipient": lambda r: RuntimeError("boom")}),
        Violation.NOT_A_DEFERRED: (LIST, {"begin_message": lambda *a: Raw(None)}),
        Violation.RAISES: (PER_ADDRESS, {"end_recipients": lambda: Raise(ValueError("oops"))}),
    }
    mode, scripted = answers[violation]
    return ScriptedChannel(mode, **scripted)


@pytest.mark.parametrize("violation", list(Violation))
def test_contract_violation_defers_aborts_and_logs(violation: Violation) -> None:
    """A violation defers the transaction's recipients, drops the session, logs the channel.

    A Deferred that fails (or a call that raises) is the session breaking: the
    recipients get NET and the destination rests; every other violation leaves the
    destination alone.
    """
    channel = _violating_channel(violation)
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    first = harness.store(envelope("a@dest.test", "b@dest.test"))
    statuses = harness.queue.statuses(first)
    broken = violation in (Violation.FAILED_DEFERRED, Violation.RAISES)
    if violation is Violation.RAISES:
        # per-address: both addresses were delivered (MOK) before end_recipients raised
        assert [s.state for s in statuses] == [RecipientState.DELIVERED] * 2
    elif broken:
        # the session broke at the first address: it was tried (NET); the second was
        # never sent, and waits for the destination to revive without an attempt counted
        assert [s.state for s in statuses] == [RecipientState.DEFERRED] * 2
        assert [s.attempts for s in statuses] == [1, 0]
        assert {s.last_reply.code for s in statuses if s.last_reply} == {ReplyCode.NET}
        assert statuses[1].next_attempt == harness.clock.seconds() + 600
    else:
        assert [s.state for s in statuses] == [RecipientState.DEFERRED] * 2
        assert [s.attempts for s in statuses] == [1, 1]
        assert {s.last_reply.code for s in statuses if s.last_reply} == {ReplyCode.AGN}
    assert harness.notices() == []
    (event,) = harness.violations()
    assert event["channel"] == "fake" and "fake" in event["violation"]
    assert channel.names(1)[-2:] == ["abort_message", "end_session"]
    assert harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds()) == broken
    if not broken:
        # the destination goes on: the next message gets a new session at once
        harness.store(envelope("c@dest.test"))
        assert channel.sessions_opened == 2


def test_violation_keeps_final_replies_given_before_it() -> None:
    """In per-address mode a MOK before the violation stands: that copy was delivered."""
    answers = iter([Reply(ReplyCode.MOK), Reply(ReplyCode.AOK)])
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: next(answers))
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("a@dest.test", "b@dest.test", "c@dest.test"))
    states = [s.state for s in harness.queue.statuses(queue_id)]
    assert states == [RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.DEFERRED]
    assert [s.attempts for s in harness.queue.statuses(queue_id)] == [1, 1, 1]


def test_open_session_failing_without_session_failed_is_a_broken_session() -> None:
    """open_session failing with a plain error: NET for the addresses, logged, host rested."""
    channel = ScriptedChannel(LIST, open_session=lambda d: OSError("socket trouble"))
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("a@dest.test"))
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.DEFERRED and status.last_reply is not None
    assert status.last_reply.code is ReplyCode.NET
    assert harness.violations()[0]["channel"] == "fake"
    assert harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds())


@pytest.mark.parametrize("code", [c for c in ReplyCode if c.is_temporary or c.is_permanent])
def test_session_failed_reply_applies_to_every_address(code: ReplyCode) -> None:
    """SessionFailed at open gives its reply to every address, as if each had got it."""
    channel = ScriptedChannel(LIST, open_session=lambda d: SessionFailed(Reply(code)))
    harness = Harness(channel, DiscardChannel(LIST, name="smtp"), rng=ZeroJitter()).start()
    queue_id = harness.store(envelope("a@dest.test", "b@dest.test"))
    statuses = harness.queue.statuses(queue_id)
    assert {s.last_reply.code for s in statuses if s.last_reply} == {code}
    expect = _by_action(code)
    want = RecipientState.FAILED if expect is Expect.BOUNCED else RecipientState.DEFERRED
    assert [s.state for s in statuses] == [want, want]
    assert harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds()) == (
        expect is Expect.DEAD
    )
    assert harness.violations() == []


def test_stop_records_the_transaction_in_flight_and_keeps_no_session_idle() -> None:
    """A stop waits for the transaction in flight, records it, and ends its session at once."""
    answer: Deferred[Reply] = Deferred()
    channel = ScriptedChannel(LIST, end_text=lambda: answer)
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("a@dest.test"))
    stopped = harness.service.stopService()
    harness.clock.advance(1)
    assert not stopped.called  # the transaction still waits for its final reply
    answer.callback(Reply(ReplyCode.OK))
    harness.clock.advance(0)  # no idle timeout: a stopping pool keeps no session open
    assert stopped.called
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.DELIVERED
    assert channel.names(1)[-1] == "end_session"


def test_stop_waits_for_the_bounce_of_a_transaction_in_flight() -> None:
    """A transaction that fails during a stop: its DSN is stored and recorded before it ends."""
    answer: Deferred[Reply] = Deferred()
    channel = ScriptedChannel(LIST, end_text=lambda: answer)
    harness = Harness(channel, DiscardChannel(LIST, name="smtp"), latency=1.0).start()
    harness.queue.store(envelope("a@dest.test", arrival=harness.clock.seconds()), TEXT)
    harness.clock.advance(1.0)  # durable: the deliverer starts the transaction
    (queue_id,) = harness.queue.queued()
    harness.mine.add(queue_id)
    stopped = harness.service.stopService()
    answer.callback(Reply(ReplyCode.NDEL, "no such user"))
    seen_unfinished = False
    for _ in range(10):  # each write takes a second on this queue
        if stopped.called:
            break
        seen_unfinished = True
        harness.clock.advance(1.0)
    assert seen_unfinished and stopped.called
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.FAILED
    assert len(harness.notices()) == 1


def test_stop_cancels_a_hanging_transaction_and_records_nothing() -> None:
    """A transaction that hangs is cancelled after the stop grace; its recipient stays due."""
    hang: Deferred[Reply] = Deferred()
    channel = ScriptedChannel(LIST, end_text=lambda: hang)
    harness = Harness(channel, DiscardChannel(LIST, name="smtp")).start()
    queue_id = harness.store(envelope("a@dest.test"))
    harness.advance(3600)
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.PENDING
    stopped = harness.service.stopService()
    harness.clock.advance(10)  # the stop grace: then the transaction is cancelled
    assert stopped.called
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.PENDING
    assert channel.names(1)[-2:] == ["abort_message", "end_session"]

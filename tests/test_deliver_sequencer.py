"""One transaction, driven directly: streaming, backpressure, cancelling, unreadable text.

Plus a property test over random replies in both modes: whatever a channel answers,
every recipient ends with exactly one outcome and the text goes at most once.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred

from relay.deliver.sequencer import Transaction, TransactionOutcome, Verdict
from relay.envelope import Destination
from relay.interfaces import IMessage, SequencingMode
from relay.reply import Action, Reply, ReplyCode

from support.deliver_fakes import LIST, PER_ADDRESS, ScriptedChannel, envelope
from support.fakes import BytesMessage, CountingMessage

DEST = Destination("fake", "dest.test")
TEXT = b"Subject: streamed\r\n\r\n" + b"line of text\r\n" * 20_000  # 280 kB


def _transaction(
    channel: ScriptedChannel, message: IMessage, count: int | None = None
) -> tuple[Transaction, Deferred[TransactionOutcome]]:
    session = channel.open_session(DEST)
    sessions: list[Any] = []
    session.addCallback(sessions.append)
    recipients = list(enumerate(message.envelope.recipients))[:count]
    transaction = Transaction(channel.name, channel.mode, sessions[0], message, recipients)
    return transaction, transaction.run()


def _outcome(d: Deferred[TransactionOutcome]) -> TransactionOutcome:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the transaction has not ended"
    assert isinstance(results[0], TransactionOutcome)
    return results[0]


def test_text_is_streamed_in_chunks_with_backpressure() -> None:
    """Each chunk waits for the previous write_text to fire; reads are at most 64 KiB."""
    pending: list[Deferred[None]] = []

    def slow_write(chunk: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    channel = ScriptedChannel(LIST, write_text=slow_write)
    message = CountingMessage(envelope("a@dest.test"), TEXT)
    _, running = _transaction(channel, message)
    reader = message.readers[0]
    assert len(reader.reads) == 1 and len(pending) == 1  # one chunk read, one written
    while pending:
        assert not running.called
        pending.pop().callback(None)
        assert len(pending) <= 1
    outcome = _outcome(running)
    assert outcome.replies[0].code is ReplyCode.OK and outcome.verdict is Verdict.KEEP
    assert set(reader.reads) == {65536} and reader.closed
    assert channel.texts == [TEXT]


def test_unreadable_text_aborts_the_message_and_keeps_the_session() -> None:
    """A text the queue cannot read: abort_message, FIO for accepted addresses, session kept."""
    channel = ScriptedChannel(LIST)
    message = CountingMessage(envelope("a@dest.test", "b@dest.test"), TEXT, fail_at=2)
    _, running = _transaction(channel, message)
    outcome = _outcome(running)
    assert outcome.verdict is Verdict.KEEP and outcome.replies == {}
    assert outcome.failure is not None and outcome.failure.code is ReplyCode.FIO
    assert channel.names()[-2:] == ["write_text", "abort_message"]
    assert "end_text" not in channel.names()
    assert message.readers[0].closed


def test_cancel_abandons_the_transaction() -> None:
    """Cancelling while the channel is busy ends the transaction with nothing decided."""
    hang: Deferred[Reply] = Deferred()
    channel = ScriptedChannel(PER_ADDRESS)
    answers = iter([defer.succeed(Reply(ReplyCode.MOK)), hang])
    channel.answers["add_recipient"] = lambda r: next(answers)
    message = BytesMessage("q1", envelope("a@dest.test", "b@dest.test"), TEXT)
    transaction, running = _transaction(channel, message)
    assert not running.called
    transaction.cancel()
    outcome = _outcome(running)
    assert outcome.abandoned and outcome.failure is None
    assert list(outcome.replies) == [0]  # the MOK given before stands
    assert hang.called  # the channel's Deferred was cancelled


def _pipelined(
    channel: ScriptedChannel, message: IMessage
) -> tuple[Transaction, Deferred[TransactionOutcome]]:
    """A transaction on a session that says it pipelines (as the SMTP channel's does)."""
    sessions: list[Any] = []
    channel.open_session(DEST).addCallback(sessions.append)
    sessions[0].pipelines_addresses = True
    recipients = list(enumerate(message.envelope.recipients))
    transaction = Transaction(channel.name, channel.mode, sessions[0], message, recipients)
    return transaction, transaction.run()


def test_a_pipelining_session_gets_every_address_before_any_reply() -> None:
    """Every add_recipient and end_recipients come before any reply; replies apply in order."""
    pending: list[Deferred[Reply]] = []

    def hold(recipient: Any) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred()
        pending.append(d)
        return d

    channel = ScriptedChannel(LIST, add_recipient=hold)
    message = BytesMessage("q1", envelope("a@dest.test", "b@dest.test", "c@dest.test"), TEXT)
    _, running = _pipelined(channel, message)
    assert channel.names(1) == ["begin_message", *["add_recipient"] * 3, "end_recipients"]
    assert len(pending) == 3 and not running.called
    pending[0].callback(Reply(ReplyCode.AOK))
    pending[1].callback(Reply(ReplyCode.USER, "no such user"))
    pending[2].callback(Reply(ReplyCode.AOK))
    outcome = _outcome(running)
    assert outcome.replies[0].code is ReplyCode.OK and outcome.replies[2].code is ReplyCode.OK
    assert outcome.replies[1].code is ReplyCode.USER
    assert channel.texts == [TEXT]


def test_a_pipelined_host_dead_reply_leaves_the_later_addresses_unasked() -> None:
    """After a connection-level reply, addresses whose replies were not awaited are unasked."""
    later: list[Deferred[Reply]] = []

    def first_dead(recipient: Any) -> Deferred[Reply]:
        if not later and str(recipient.address) == "a@dest.test":
            return defer.succeed(Reply(ReplyCode.NET, "connection lost"))
        d: Deferred[Reply] = Deferred()
        later.append(d)
        return d

    channel = ScriptedChannel(LIST, add_recipient=first_dead)
    message = BytesMessage("q1", envelope("a@dest.test", "b@dest.test", "c@dest.test"), TEXT)
    _, running = _pipelined(channel, message)
    outcome = _outcome(running)
    assert outcome.verdict is Verdict.DEAD and outcome.unasked == (1, 2)
    assert list(outcome.replies) == [0]
    for d in later:  # answered after the stop: nothing breaks, nothing is recorded
        d.errback(RuntimeError("late"))
    assert "begin_text" not in channel.names()


def test_a_transaction_needs_recipients() -> None:
    """A transaction without recipients is a caller's defect, refused at once."""
    channel = ScriptedChannel(LIST)
    message = BytesMessage("q1", envelope("a@dest.test"), TEXT)
    try:
        _transaction(channel, message, count=0)
    except ValueError:
        return
    raise AssertionError("an empty transaction was accepted")


# --- whatever the channel answers -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(list(SequencingMode)),
    address_codes=st.lists(st.sampled_from(list(ReplyCode)), min_size=1, max_size=6),
    final_code=st.sampled_from(list(ReplyCode)),
)
def test_every_recipient_gets_exactly_one_outcome(
    mode: SequencingMode, address_codes: list[ReplyCode], final_code: ReplyCode
) -> None:
    """Any answers: each recipient has one reply or the shared failure; text at most once."""
    codes = iter(address_codes)
    channel = ScriptedChannel(
        mode,
        add_recipient=lambda r: Reply(next(codes)),
        end_text=lambda: Reply(final_code),
    )
    addresses = [f"r{i}@dest.test" for i in range(len(address_codes))]
    message = BytesMessage("q1", envelope(*addresses), b"Subject: x\r\n\r\nbody\r\n")
    outcome = _outcome(_transaction(channel, message)[1])
    dead = outcome.verdict is Verdict.DEAD
    for index in range(len(addresses)):
        has_reply = index in outcome.replies
        parked = index in outcome.unasked
        assert has_reply or outcome.failure is not None or parked
        assert not (has_reply and parked)
        if parked:
            assert dead or outcome.violation is not None
    assert len(channel.texts) <= 1
    if mode is PER_ADDRESS:
        assert "write_text" not in channel.names()
    for reply in outcome.replies.values():
        if mode is PER_ADDRESS:
            assert reply.code is ReplyCode.MOK or reply.code.action is not Action.COMMIT
        assert reply.code is not ReplyCode.AOK
    if outcome.violation is not None:
        assert outcome.verdict is not Verdict.KEEP
        assert outcome.failure is not None
    if outcome.verdict is Verdict.KEEP:
        assert outcome.violation is None

"""The fakes the deliverer's tests use keep the contract they stand in for."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relay.address import parse_forward_path
from relay.envelope import Destination, Recipient, RecipientState, RecipientStatus
from relay.interfaces import IChannel, IChannelSession, IHandoffStore, IQueue, SequencingMode
from relay.reply import Reply, ReplyCode

from support.deferreds import fired
from support.deliver_fakes import LIST, TEXT, ScriptedChannel, envelope
from support.memqueue import MemoryQueue

# --- the fakes keep the contract ------------------------------------------------------------


@pytest.mark.parametrize("mode", list(SequencingMode))
def test_scripted_channel_provides_the_contract(mode: SequencingMode) -> None:
    """The scripted channel and its sessions verify against IChannel and IChannelSession."""
    channel = ScriptedChannel(mode)
    assert verifyObject(IChannel, channel)
    session = fired(channel.open_session(Destination("fake", "x")))
    assert verifyObject(IChannelSession, session)


@pytest.mark.parametrize("mode", list(SequencingMode))
def test_scripted_channel_answers_like_a_good_channel_by_default(
    mode: SequencingMode, memory_queue: MemoryQueue
) -> None:
    """Unscripted, it answers AOK then OK in list mode and MOK per address, and records it."""
    queue = memory_queue
    queue_id = fired(queue.store(envelope("a@dest.test"), TEXT))
    message = queue.open_message(queue_id)
    channel = ScriptedChannel(mode)
    session = fired(channel.open_session(Destination("fake", "x")))
    fired(session.begin_message("m", message.envelope.return_path, message))
    reply = fired(session.add_recipient(message.envelope.recipients[0]))
    if mode is LIST:
        assert reply.code is ReplyCode.AOK
        fired(session.write_text(TEXT))
        assert fired(session.end_text()).code is ReplyCode.OK
        assert channel.texts == [TEXT]
    else:
        assert reply.code is ReplyCode.MOK
    assert channel.delivered == [(queue_id, "a@dest.test")]


def test_scripted_answers_replace_the_default() -> None:
    """A scripted answer is used: a value fires at once, an exception fails the Deferred."""
    channel = ScriptedChannel(
        LIST, add_recipient=lambda r: Reply(ReplyCode.USER), end_text=lambda: RuntimeError("x")
    )
    session = fired(channel.open_session(Destination("fake", "x")))
    recipient = Recipient(parse_forward_path("<a@b.test>"))
    assert fired(session.add_recipient(recipient)).code is ReplyCode.USER
    failures: list[Any] = []
    session.end_text().addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)


def test_memory_queue_provides_iqueue(memory_queue: MemoryQueue) -> None:
    """The in-memory queue verifies against IQueue and IHandoffStore, as the spool does."""
    assert verifyObject(IQueue, memory_queue)
    assert verifyObject(IHandoffStore, memory_queue)


def test_memory_queue_makes_changes_visible_only_when_durable(clock: Clock) -> None:
    """With latency, a stored message and an update appear only when their Deferreds fire."""
    queue = MemoryQueue(clock, latency=1.0)
    stored = queue.store(envelope("a@dest.test", "b@dest.test"), TEXT)
    assert not stored.called and queue.queued() == []
    clock.advance(1.0)
    queue_id = fired(stored)
    delivered = RecipientStatus(RecipientState.DELIVERED, 1)
    update = queue.update(queue_id, {0: delivered})
    assert queue.statuses(queue_id)[0].state is RecipientState.PENDING
    clock.advance(1.0)
    assert update.called and queue.statuses(queue_id)[0] == delivered


def test_memory_queue_wakes_listeners_when_mail_falls_due(
    clock: Clock, memory_queue: MemoryQueue
) -> None:
    """A deferred recipient wakes the listeners when its time comes, and leaves when final."""
    queue = memory_queue  # on the test's clock
    wakes: list[float] = []
    queue.add_listener(lambda: wakes.append(clock.seconds()))
    queue_id = fired(queue.store(envelope("a@dest.test"), TEXT))
    assert wakes == [0.0]
    fired(queue.update(queue_id, {0: RecipientStatus(RecipientState.DEFERRED, 1, 300.0)}))
    assert queue.next_due_time() == 300.0
    assert fired(queue.due(299.0)) == []
    clock.advance(300)
    assert wakes == [0.0, 300.0]
    assert fired(queue.due(300.0)) == [(queue_id, 0)]
    fired(queue.update(queue_id, {0: RecipientStatus(RecipientState.DELIVERED, 2)}))
    assert queue.queued() == [] and queue_id in queue.done


def test_memory_queue_hold_release_flush(clock: Clock, memory_queue: MemoryQueue) -> None:
    """Held recipients are never due; release and flush make them due again."""
    queue = memory_queue  # on the test's clock
    queue_id = fired(queue.store(envelope("a@dest.test"), TEXT))
    fired(queue.update(queue_id, {0: RecipientStatus(RecipientState.DEFERRED, 1, 900.0)}))
    assert fired(queue.hold(queue_id)) == 1
    clock.advance(1000)
    assert fired(queue.due(clock.seconds())) == []
    assert fired(queue.release(queue_id)) == 1
    assert fired(queue.due(clock.seconds())) == [(queue_id, 0)]
    fired(queue.update(queue_id, {0: RecipientStatus(RecipientState.DEFERRED, 2, 5000.0)}))
    assert fired(queue.flush()) == 1
    assert queue.statuses(queue_id)[0].state is RecipientState.PENDING

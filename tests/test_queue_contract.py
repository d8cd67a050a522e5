"""One behaviour suite for IQueue, run against the spool and the in-memory queue alike.

The deliverer's tests run on :class:`support.memqueue.MemoryQueue`; they mean something
for the relay only while the fake keeps the spool's promises.  Every test here takes the
``any_queue`` fixture, once with each implementation, and pins a promise of the
interface that both must keep (the spool's own tests pin what only the spool does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relay.envelope import Destination, RecipientState, RecipientStatus
from relay.interfaces import IQueue
from relay.queue.state import NoSuchMessage

from support.memqueue import MemoryQueue
from support.queue_helpers import LOCAL_DEST, SMTP_DEST, make_envelope, open_queue, read_all

NOW = 1_700_000_000.0
TEXT = b"Subject: contract\r\n\r\nthe same promises\r\n"
DEFERRED = RecipientStatus(RecipientState.DEFERRED, 1, NOW + 600)
DELIVERED = RecipientStatus(RecipientState.DELIVERED, 1)


@pytest_twisted.async_yield_fixture(params=["spool", "memory"])
async def any_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IQueue]:
    """The spool in a fresh directory, or the in-memory queue; both on a Clock at NOW."""
    clock = Clock()
    clock.advance(NOW)
    if request.param == "memory":
        yield MemoryQueue(clock)
        return
    queue = await open_queue(tmp_path / "spool", clock=clock)
    try:
        yield queue
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_both_provide_iqueue(any_queue: IQueue) -> None:
    """Each implementation verifies against IQueue."""
    assert verifyObject(IQueue, any_queue)


@pytest_twisted.ensureDeferred
async def test_a_stored_message_loads_with_every_recipient_pending(any_queue: IQueue) -> None:
    """load gives back the stored envelope and one pending status per recipient."""
    envelope = make_envelope(3, arrival=NOW)
    queue_id = await any_queue.store(envelope, TEXT)
    loaded, statuses = await any_queue.load(queue_id)
    assert loaded == envelope
    assert [s.state for s in statuses] == [RecipientState.PENDING] * 3


@pytest_twisted.ensureDeferred
async def test_messages_are_listed_oldest_first(any_queue: IQueue) -> None:
    """list_messages names every stored message in the order they arrived."""
    ids = [await any_queue.store(make_envelope(arrival=NOW), TEXT) for _ in range(3)]
    assert list(await any_queue.list_messages()) == ids


@pytest_twisted.ensureDeferred
async def test_the_text_reads_back_as_stored(any_queue: IQueue) -> None:
    """open_message gives the stored text, chunk by chunk, from a fresh stream each time."""
    queue_id = await any_queue.store(make_envelope(arrival=NOW), TEXT)
    message = any_queue.open_message(queue_id)
    assert message.queue_id == queue_id and message.size == len(TEXT)
    assert await read_all(message, chunk=7) == TEXT
    assert await read_all(message) == TEXT


@pytest_twisted.ensureDeferred
async def test_a_message_leaves_once_every_recipient_is_final(any_queue: IQueue) -> None:
    """An update that leaves a recipient unfinished keeps the message; the last one removes it."""
    queue_id = await any_queue.store(make_envelope(2, arrival=NOW), TEXT)
    await any_queue.update(queue_id, {0: DELIVERED})
    _, statuses = await any_queue.load(queue_id)
    assert [s.state for s in statuses] == [RecipientState.DELIVERED, RecipientState.PENDING]
    await any_queue.update(queue_id, {1: DELIVERED})
    assert list(await any_queue.list_messages()) == []
    with pytest.raises(NoSuchMessage):
        await any_queue.load(queue_id)


@pytest_twisted.ensureDeferred
async def test_unknown_ids_fail_with_the_spools_no_such_message(any_queue: IQueue) -> None:
    """remove, load and flush_message of an id that is not queued fail with NoSuchMessage."""
    for call in (any_queue.remove, any_queue.load, any_queue.flush_message):
        with pytest.raises(NoSuchMessage):
            await call("0660CB0F360000")


@pytest_twisted.ensureDeferred
async def test_removal_takes_a_message_whatever_its_state(any_queue: IQueue) -> None:
    """remove deletes a message with recipients still pending."""
    queue_id = await any_queue.store(make_envelope(2, arrival=NOW), TEXT)
    await any_queue.remove(queue_id)
    assert list(await any_queue.list_messages()) == []


@pytest_twisted.ensureDeferred
async def test_due_reports_pending_now_and_deferred_at_their_time(any_queue: IQueue) -> None:
    """A pending recipient is due now; a deferred one only from its next attempt on."""
    queue_id = await any_queue.store(make_envelope(2, arrival=NOW), TEXT)
    await any_queue.update(queue_id, {1: DEFERRED})
    assert sorted(await any_queue.due(NOW)) == [(queue_id, 0)]
    assert any_queue.next_due_time() == NOW + 600
    assert sorted(await any_queue.due(NOW + 600)) == [(queue_id, 0), (queue_id, 1)]


@pytest_twisted.ensureDeferred
async def test_due_recipients_are_grouped_by_destination(any_queue: IQueue) -> None:
    """due_by_destination splits the due recipients by (channel, host)."""
    envelope = make_envelope(3, destinations=(SMTP_DEST, LOCAL_DEST), arrival=NOW)
    queue_id = await any_queue.store(envelope, TEXT)
    grouped = await any_queue.due_by_destination(NOW)
    assert {key: sorted(value) for key, value in grouped.items()} == {
        Destination("smtp", "dest.test"): [(queue_id, 0), (queue_id, 2)],
        Destination("local", ""): [(queue_id, 1)],
    }


@pytest_twisted.ensureDeferred
async def test_held_recipients_are_never_due_until_released(any_queue: IQueue) -> None:
    """hold counts what it held and keeps it from due; release puts it back."""
    queue_id = await any_queue.store(make_envelope(2, arrival=NOW), TEXT)
    await any_queue.update(queue_id, {0: DELIVERED})
    assert await any_queue.hold(queue_id) == 1
    assert list(await any_queue.due(NOW + 10**6)) == []
    assert await any_queue.release(queue_id) == 1
    assert sorted(await any_queue.due(NOW)) == [(queue_id, 1)]


@pytest_twisted.ensureDeferred
async def test_flush_makes_deferred_recipients_due_now(any_queue: IQueue) -> None:
    """flush_message (on one channel) and flush make deferred recipients due at once."""
    envelope = make_envelope(2, destinations=(SMTP_DEST, LOCAL_DEST), arrival=NOW)
    queue_id = await any_queue.store(envelope, TEXT)
    later = replace(DEFERRED, next_attempt=NOW + 3600)
    await any_queue.update(queue_id, {0: later, 1: later})
    assert await any_queue.flush_message(queue_id, "local") == 1
    assert sorted(await any_queue.due(NOW)) == [(queue_id, 1)]
    assert await any_queue.flush() == 1
    assert sorted(await any_queue.due(NOW)) == [(queue_id, 0), (queue_id, 1)]


@pytest_twisted.ensureDeferred
async def test_listeners_hear_of_new_mail_until_removed(any_queue: IQueue) -> None:
    """A listener is called when mail is stored, and no more once removed."""
    calls: list[None] = []

    def listener() -> None:
        calls.append(None)

    any_queue.add_listener(listener)
    await any_queue.store(make_envelope(arrival=NOW), TEXT)
    assert calls
    any_queue.remove_listener(listener)
    heard = len(calls)
    await any_queue.store(make_envelope(arrival=NOW), TEXT)
    assert len(calls) == heard

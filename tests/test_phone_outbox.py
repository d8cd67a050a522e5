"""The phone channel's outbox on a deliverer over a MemoryQueue: what a call offers, under
which id, and how the receiver's replies settle it."""

from __future__ import annotations

from collections.abc import Sequence

from relay.address import parse_forward_path
from relay.channels.phone.channel import PhoneChannel
from relay.channels.phone.outbox import SpoolOutbox
from relay.envelope import Destination, RecipientState
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.records import valid_message_id
from relay.sansio.phone.session import Outgoing

from support.deferreds import fired
from support.deliver_fakes import Harness, envelope

SITE = "site-b"
WHERE = Destination("phone", SITE)


def _harness() -> Harness:
    return Harness(PhoneChannel(lambda site: None, frozenset())).start()


def _outbox(harness: Harness) -> SpoolOutbox:
    def no_route(address: object) -> Destination:
        raise AssertionError("every recipient here is routed")

    return SpoolOutbox(lambda: harness.queue, lambda: harness.service, no_route)


def _offers(outbox: SpoolOutbox) -> Sequence[Outgoing]:
    offers: Sequence[Outgoing] = fired(outbox.outgoing(SITE))
    return offers


def test_a_retry_of_a_temporarily_refused_recipient_is_a_new_id() -> None:
    """A recipient refused for now in a call whose final reply arrived is offered again
    under an id of its own (the receiver remembers the first id's answers), while a resend
    of the same recipients after a drop keeps the id (the receiver knows it)."""
    harness = _harness()
    queue_id = harness.store(envelope("a@site-b.test", "b@site-b.test", destination=WHERE))
    outbox = _outbox(harness)
    first = _offers(outbox)
    assert len(first) == 1 and valid_message_id(first[0].message_id)
    assert first[0].message_id.startswith(queue_id)
    outbox.release(SITE)  # the line dropped before the final reply
    harness.clock.advance(0)
    again = _offers(outbox)
    assert [o.message_id for o in again] == [first[0].message_id]
    fired(outbox.settle(SITE, again[0].message_id, [Reply(ReplyCode.OK), Reply(ReplyCode.AGN)]))
    harness.clock.advance(0)
    statuses = harness.queue.statuses(queue_id)
    assert [s.state for s in statuses] == [RecipientState.DELIVERED, RecipientState.DEFERRED]
    retry = _offers(outbox)
    assert len(retry) == 1
    assert [r.address for r in retry[0].envelope.recipients] == [
        parse_forward_path("<b@site-b.test>")
    ]
    assert retry[0].message_id != first[0].message_id
    assert retry[0].message_id.startswith(queue_id) and valid_message_id(retry[0].message_id)

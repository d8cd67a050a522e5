"""The phone channel's outbox on a deliverer over a MemoryQueue: what a call offers, under
which id, and how the receiver's replies settle it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest

from relay.address import parse_forward_path
from relay.channels.phone.channel import PhoneChannel
from relay.channels.phone.inbox import SpoolInbox
from relay.channels.phone.outbox import SpoolOutbox
from relay.channels.phone.store import SpoolPhoneStore
from relay.envelope import Destination, RecipientState
from relay.errors import SpoolError
from relay.queue.ready import QueueReady
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.records import valid_message_id
from relay.sansio.phone.session import Outgoing

from support.deferreds import fired
from support.deliver_fakes import TEXT, Harness, envelope

SITE = "site-b"
WHERE = Destination("phone", SITE)


def _harness() -> Harness:
    return Harness(PhoneChannel(frozenset())).start()


def _outbox(harness: Harness) -> SpoolOutbox:
    def no_route(address: object) -> Destination:
        raise AssertionError("every recipient here is routed")

    return SpoolOutbox(QueueReady.of(harness.queue), harness.service, no_route)


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


def test_two_calls_with_one_site_release_only_their_own_offers() -> None:
    """Calls at once with the same site (it calls in while we call out) each settle and
    release only what they offered: the end of one leaves the other's offer claimed and
    settled by its own final reply."""
    harness = _harness()
    outbox = _outbox(harness)
    store = SpoolPhoneStore(outbox, cast(SpoolInbox, object()))
    calling_out, calling_in = store.for_call(), store.for_call()
    first = harness.store(envelope("a@site-b.test", destination=WHERE))
    offered_out: Sequence[Outgoing] = fired(calling_out.outgoing(SITE))
    second = harness.store(envelope("b@site-b.test", destination=WHERE))
    offered_in: Sequence[Outgoing] = fired(calling_in.outgoing(SITE))
    assert [o.message_id.split(".")[0] for o in offered_out] == [first]
    assert [o.message_id.split(".")[0] for o in offered_in] == [second]
    assert calling_out.release(SITE) == 1  # the outgoing call dropped
    harness.clock.advance(0)
    assert [s.state for s in harness.queue.statuses(first)] == [RecipientState.DEFERRED]
    next_call: Sequence[Outgoing] = fired(store.for_call().outgoing(SITE))
    assert [o.message_id.split(".")[0] for o in next_call] == [first]  # not the other's
    fired(calling_in.settle(SITE, offered_in[0].message_id, [Reply(ReplyCode.OK)]))
    harness.clock.advance(0)
    assert calling_in.release(SITE) == 0
    assert [s.state for s in harness.queue.statuses(second)] == [RecipientState.DELIVERED]


def test_reading_a_message_another_call_offered_fails_its_deferred() -> None:
    """A call asking for the text of a message it did not offer (another call did) gets a
    failed Deferred, never an exception out of the call."""
    harness = _harness()
    outbox = _outbox(harness)
    harness.store(envelope("a@site-b.test", destination=WHERE))
    (offered,) = fired(outbox.outgoing(SITE, "one call"))
    d = outbox.read_text(SITE, offered.message_id, 0, 100, "another call")
    with pytest.raises(KeyError):
        fired(d)
    assert fired(outbox.read_text(SITE, offered.message_id, 0, 9, "one call")) == TEXT[:9]


def test_a_call_that_outlives_the_spool_fails_instead_of_waiting() -> None:
    """After the spool has closed (a call still running while the relay stops), asking
    the outbox for a call's mail fails with the spool's error at once: the call ends with
    an error rather than waiting for a queue that will not come back."""
    harness = _harness()
    harness.store(envelope("a@site-b.test", destination=WHERE))
    ready = QueueReady.of(harness.queue)
    outbox = SpoolOutbox(ready, harness.service, lambda address: WHERE)
    ready.closed()
    failures: list[object] = []
    outbox.outgoing(SITE).addErrback(lambda f: failures.append(f.value))
    assert len(failures) == 1 and isinstance(failures[0], SpoolError)

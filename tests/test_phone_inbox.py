"""The phone channel's inbox: what a site's proposals are answered, and how what it sends
is stored (a MemoryQueue, the link's file store in a temporary directory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from relay.address import Address
from relay.channels.phone.inbox import SpoolInbox
from relay.envelope import Destination
from relay.errors import SpoolError
from relay.queue.ready import QueueReady
from relay.reply import ReplyCode
from relay.sansio.phone.session import ALREADY_HAVE
from relay.sansio.smtp.wire import SmtpReply

from support.deliver_fakes import envelope
from support.memqueue import MemoryQueue
from support.reactor_helpers import until

SITE = "site-b"
TEXT = b"Subject: hello\r\n\r\nbody\r\n"
OK = SmtpReply(250, "2.1.5", ("ok",))
LATER = SmtpReply(450, "4.2.1", ("not now",))


def _inbox(
    tmp_path: Path,
    queue: MemoryQueue,
    answers: dict[str, SmtpReply],
    *,
    clock: IReactorTime | None = None,
) -> SpoolInbox:
    def decide(address: Address) -> SmtpReply:
        return answers.get(address.local_part, OK)

    return SpoolInbox(
        tmp_path / "links",
        QueueReady.of(queue),
        decide,
        reactor,
        hostname="hub-a.example.test",
        max_message_size=lambda site: None,
        **({} if clock is None else {"clock": clock}),
    )


@pytest_twisted.ensureDeferred
async def test_a_committed_id_is_answered_from_memory_not_afresh(tmp_path: Path) -> None:
    """A re-proposal of a committed id (its final reply lost with the line) is answered
    from what was remembered: the accepted recipient is "already have it", never accepted
    again for a second copy, even when the refused one would now be accepted."""
    queue = MemoryQueue(reactor)
    answers = {"b": LATER}
    inbox = _inbox(tmp_path, queue, answers)
    proposed = envelope("a@example.test", "b@example.test", destination=Destination("local", ""))
    digest = hashlib.sha256(TEXT).digest()
    first = await inbox.accept(SITE, "Q1.abc", proposed, len(TEXT))
    assert first.replies[0].code is ReplyCode.AOK and first.replies[1].code.is_temporary
    await inbox.write_text(SITE, "Q1.abc", 0, TEXT)
    accepted = proposed.with_recipients(proposed.recipients[:1])
    await inbox.commit(SITE, "Q1.abc", accepted, len(TEXT), digest)
    assert len(queue.stored()) == 1
    answers.clear()  # b would be accepted now
    again = await inbox.accept(SITE, "Q1.abc", proposed, len(TEXT))
    assert again.replies[0] == ALREADY_HAVE and again.whole is None
    assert again.replies[1].code is not ReplyCode.AOK
    whole = await inbox.accept(SITE, "Q1.abc", accepted, len(TEXT))
    assert whole.whole == ALREADY_HAVE


@pytest_twisted.ensureDeferred
async def test_a_failed_queue_store_is_retried_with_backoff_while_running(
    tmp_path: Path, clock: Clock
) -> None:
    """When the queue cannot store a message the link has committed, the relay stores it
    again after a growing delay (on its clock) until it succeeds, once, without waiting
    for the next start."""
    queue = MemoryQueue(reactor)
    queue.fail_stores = 2
    inbox = _inbox(tmp_path, queue, {}, clock=clock)
    proposed = envelope("a@example.test", destination=Destination("local", ""))
    await inbox.accept(SITE, "Q2.abc", proposed, len(TEXT))
    await inbox.write_text(SITE, "Q2.abc", 0, TEXT)
    with pytest.raises(SpoolError):
        await inbox.commit(SITE, "Q2.abc", proposed, len(TEXT), hashlib.sha256(TEXT).digest())
    assert queue.stored() == []
    delays = []
    while not queue.stored():
        assert len(clock.getDelayedCalls()) == 1, "one retry scheduled"
        delay = clock.getDelayedCalls()[0].getTime() - clock.seconds()
        delays.append(delay)
        clock.advance(delay)
        await until(lambda: queue.stored() or clock.getDelayedCalls())
    assert len(delays) == 2 and delays[1] > delays[0] > 0
    assert [queue.texts[q].endswith(TEXT) for q in queue.stored()] == [True]
    assert not clock.getDelayedCalls()
    assert not (tmp_path / "links" / SITE / "in" / "mail" / "Q2.abc.text").exists()

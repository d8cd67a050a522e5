"""From replies to recorded states, and the pieces of a notice: headers, who is told."""

from __future__ import annotations

import random

from twisted.internet.defer import ensureDeferred

from relay.deliver.dispositions import (
    HEADER_LIMIT,
    attempted_status,
    parked_status,
    read_headers,
    wants_failure_notice,
)
from relay.envelope import RecipientState, RecipientStatus
from relay.policy.dsn import DOUBLE_BOUNCE_PROTOCOL, DSN_PROTOCOL
from relay.policy.retry import decide
from relay.reply import Reply, ReplyCode

from support.deferreds import fired
from support.deliver_fakes import envelope, make_config
from support.fakes import CountingMessage

SETTINGS = make_config().deliver


def test_headers_are_read_only_up_to_the_blank_line() -> None:
    """A DSN reads the header section and stops: the body is never read."""
    head = b"Subject: x\r\nFrom: a@b.test\r\n\r\n"
    message = CountingMessage(envelope("a@dest.test"), head + b"body\r\n" * 1_000_000)
    headers = fired(ensureDeferred(read_headers(message)))
    assert headers.startswith(head)
    reader = message.readers[0]
    assert len(reader.reads) == 1 and reader.closed


def test_headers_without_an_end_are_cut_at_the_limit() -> None:
    """A text with no blank line is read no further than HEADER_LIMIT octets."""
    text = b"X-Long: " + b"y" * 1_000_000
    message = CountingMessage(envelope("a@dest.test"), text)
    headers = fired(ensureDeferred(read_headers(message)))
    assert len(headers) == HEADER_LIMIT
    assert sum(message.readers[0].reads) == HEADER_LIMIT


def test_an_attempt_is_counted_and_scheduled() -> None:
    """A temporary failure counts one more attempt and waits retry_min the first time."""
    previous = RecipientStatus(RecipientState.PENDING)
    decision = decide(Reply(ReplyCode.AGN), arrival=0.0, now=100.0, give_up_after=1e9)
    rng = random.Random()
    rng.random = lambda: 0.5  # type: ignore[method-assign]
    status = attempted_status(
        previous, decision, now=100.0, settings=SETTINGS, rng=rng, warned=False
    )
    assert status.state is RecipientState.DEFERRED and status.attempts == 1
    assert status.next_attempt == 400.0 and status.updated == 100.0


def test_a_parked_recipient_keeps_its_attempts_and_last_attempt_time() -> None:
    """Held back for a resting destination: no attempt counted, last attempt time kept."""
    previous = RecipientStatus(RecipientState.DEFERRED, 2, 50.0, Reply(ReplyCode.AGN), False, 40.0)
    reason = Reply(ReplyCode.DHST, "delivery temporarily suspended: refused")
    status = parked_status(previous, 700.0, reason, warned=True)
    assert status.state is RecipientState.DEFERRED
    assert (status.attempts, status.updated, status.next_attempt) == (2, 40.0, 700.0)
    assert status.last_reply == reason and status.warned


def test_who_is_told_about_failures() -> None:
    """A sender is told; a DSN's failure goes to the postmaster; <> and double bounces: nobody."""
    assert wants_failure_notice(envelope("a@dest.test"))
    assert not wants_failure_notice(envelope("a@dest.test", sender=None))
    assert wants_failure_notice(envelope("a@dest.test", sender=None, protocol=DSN_PROTOCOL))
    assert not wants_failure_notice(
        envelope("a@dest.test", sender=None, protocol=DOUBLE_BOUNCE_PROTOCOL)
    )

"""From a reply to a recorded state, and from failures to the notice the sender gets.

The deliverer's decisions live in :mod:`relay.policy` (what a reply means, when to try
again, what a DSN says); this module turns them into the two things the queue stores:
a new :class:`~relay.envelope.RecipientStatus` per recipient, and, for failures and
delays, a new message (the DSN) with its envelope.

* **Attempts are counted only for attempts made.**  A recipient held back because its
  destination is resting (:func:`parked_status`) keeps its attempts, its last reply and
  its ``updated`` time (which a DSN reports as the last attempt); only its next attempt
  moves to when the destination revives.
* **Who is told.**  An ordinary sender gets a DSN; a DSN this relay made that fails goes
  to the postmaster once (the double bounce); a double bounce that fails, and null-sender
  mail from elsewhere, is dropped (the caller logs it).  :func:`failure_notice` and
  :func:`delay_notice` return None for "nobody".
* **The original headers** come from the start of the queued text, read through the
  message's :class:`~relay.interfaces.ITextReader` up to the first empty line and never
  more than :data:`HEADER_LIMIT` octets, so a DSN never holds the whole message in memory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from relay.envelope import Envelope, RecipientState, RecipientStatus
from relay.interfaces import IMessage
from relay.policy.dsn import (
    DsnKind,
    DsnRecipient,
    build_double_bounce,
    build_dsn,
    double_bounce_envelope,
    dsn_envelope,
    is_double_bounce,
    is_dsn,
)
from relay.policy.retry import Decision, Disposition, RetrySettings, next_attempt
from relay.reply import Reply

__all__ = [
    "HEADER_LIMIT",
    "Notice",
    "attempted_status",
    "delay_notice",
    "expired_status",
    "failure_notice",
    "parked_status",
    "read_headers",
    "wants_failure_notice",
]

HEADER_LIMIT: Final = 64 * 1024
"""The most of a message's text read to find its header section for a DSN."""

_READ_SIZE: Final = 8192


def attempted_status(
    previous: RecipientStatus,
    decision: Decision,
    *,
    now: float,
    settings: RetrySettings,
    rng: random.Random,
    warned: bool,
) -> RecipientStatus:
    """The state after an attempt that ended in ``decision``: one more attempt counted."""
    attempts = previous.attempts + 1
    warned = warned or previous.warned
    if decision.disposition is Disposition.DELIVERED:
        return RecipientStatus(
            RecipientState.DELIVERED, attempts, None, decision.reply, warned, now
        )
    if decision.disposition is Disposition.BOUNCE:
        return RecipientStatus(RecipientState.FAILED, attempts, None, decision.reply, warned, now)
    when = next_attempt(now, attempts, decision.reply, settings, rng)
    return RecipientStatus(RecipientState.DEFERRED, attempts, when, decision.reply, warned, now)


def parked_status(
    previous: RecipientStatus, until: float, reason: Reply, *, warned: bool
) -> RecipientStatus:
    """Held back while its destination rests: due again at ``until``, no attempt counted.

    ``reason`` (why the destination rests) becomes the last reply, so a delay DSN can say
    why; ``attempts`` and ``updated`` (the time of the last real attempt) are kept.
    """
    return replace(
        previous,
        state=RecipientState.DEFERRED,
        next_attempt=until,
        last_reply=reason,
        warned=warned or previous.warned,
    )


def expired_status(previous: RecipientStatus, reply: Reply, *, now: float) -> RecipientStatus:
    """Failed because its time ran out without another attempt (its destination rested)."""
    return replace(
        previous, state=RecipientState.FAILED, next_attempt=None, last_reply=reply, updated=now
    )


async def read_headers(message: IMessage, limit: int = HEADER_LIMIT) -> bytes:
    """The start of ``message``'s text up to its first empty line, at most ``limit`` octets."""
    reader = message.open_text()
    data = b""
    try:
        while len(data) < limit:
            chunk = await reader.read(min(_READ_SIZE, limit - len(data)))
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data or b"\n\n" in data or data.startswith((b"\r\n", b"\n")):
                break
    finally:
        reader.close()
    return data[:limit]


@dataclass(frozen=True, slots=True)
class Notice:
    """A DSN ready to be queued: its envelope, its text, and what it is (for the log)."""

    envelope: Envelope
    text: bytes
    kind: str  # "failure", "delay" or "double-bounce"


def wants_failure_notice(envelope: Envelope) -> bool:
    """Whether anybody is told when ``envelope``'s recipients fail (see the docstring)."""
    if is_double_bounce(envelope):
        return False
    return envelope.return_path is not None or is_dsn(envelope)


def failure_notice(
    envelope: Envelope,
    queue_id: str,
    failures: Sequence[DsnRecipient],
    headers: bytes,
    *,
    hostname: str,
    postmaster: str,
    now: float,
) -> Notice | None:
    """The one DSN for every failure of a message decided together; None: tell nobody."""
    if is_double_bounce(envelope):
        return None
    if envelope.return_path is None:
        if not is_dsn(envelope):
            return None
        to_postmaster = double_bounce_envelope(envelope, postmaster, now)
        text = build_double_bounce(envelope, queue_id, failures, headers, hostname, postmaster, now)
        if to_postmaster is None or text is None:
            return None
        return Notice(to_postmaster, text, "double-bounce")
    to_sender = dsn_envelope(envelope, now)
    text = build_dsn(
        DsnKind.FAILURE, envelope, queue_id, failures, headers, hostname, postmaster, now
    )
    if to_sender is None or text is None:
        return None
    return Notice(to_sender, text, "failure")


def delay_notice(
    envelope: Envelope,
    queue_id: str,
    delayed: Sequence[DsnRecipient],
    headers: bytes,
    *,
    hostname: str,
    postmaster: str,
    now: float,
) -> Notice | None:
    """The one delay DSN of a message; None for the null sender (DSNs are never warned of)."""
    to_sender = dsn_envelope(envelope, now)
    text = build_dsn(DsnKind.DELAY, envelope, queue_id, delayed, headers, hostname, postmaster, now)
    if to_sender is None or text is None:
        return None
    return Notice(to_sender, text, "delay")

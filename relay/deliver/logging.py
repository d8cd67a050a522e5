"""One log event per recipient disposition: a Postfix-like line for people, fields for programs.

An operator greps ``to=<alice@example.test>`` and reads ``status=deferred (451 4.4.1 …)``
the way a Postfix log reads, so the format string is that line.  A program reads the
same event as JSON (:func:`twisted.logger.eventAsJSON`): every value in it is a plain
str, int or float, so nothing is lost or stringified on the way.  The fields:

``queue_id``, ``recipient``, ``orig_recipient`` (ORCPT or None), ``channel``,
``destination`` (the host key, ``""`` for local), ``reply`` (the SMTP line and the MMDF
name), ``reply_code`` (MMDF name), ``smtp_code``, ``enhanced``, ``delay`` (seconds since
the message arrived), ``attempt`` (the attempt this disposition closes; an attempt that
was not made, e.g. a destination resting, is not counted) and ``status``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from twisted.logger import Logger

from relay.envelope import Destination, Recipient
from relay.oneline import escape
from relay.reply import Reply

__all__ = [
    "DISPOSITION_FORMAT",
    "DispositionStatus",
    "describe_reply",
    "log_disposition",
]

DISPOSITION_FORMAT: Final = (
    "{queue_id}: to=<{recipient}>, relay={channel}:{destination}, delay={delay:.2f}, "
    "attempt={attempt}, status={status} ({reply})"
)
"""The line each disposition event formats to."""


class DispositionStatus(StrEnum):
    """What became of a recipient, in Postfix's words."""

    SENT = "sent"  # delivered: final
    DEFERRED = "deferred"  # kept queued: tried again later
    BOUNCED = "bounced"  # failed permanently: the sender is told
    EXPIRED = "expired"  # failed because its time ran out: the sender is told


def describe_reply(reply: Reply) -> str:
    """The reply as a log shows it: ``550 5.1.1 unknown user [USER]``."""
    return f"{reply.smtp_line()} [{reply.code.name}]"


def log_disposition(
    log: Logger,
    *,
    queue_id: str,
    recipient: Recipient,
    destination: Destination | None,
    reply: Reply,
    status: DispositionStatus,
    delay: float,
    attempt: int,
) -> None:
    """Emit the one event that records what became of ``recipient`` in this attempt."""
    log.info(
        DISPOSITION_FORMAT,
        queue_id=queue_id,
        recipient=escape(str(recipient.address)),
        orig_recipient=None if recipient.original is None else escape(recipient.original),
        channel=destination.channel if destination is not None else "none",
        destination=escape(destination.host) if destination is not None else "",
        reply=escape(describe_reply(reply)),
        reply_code=reply.code.name,
        smtp_code=reply.effective_smtp_code,
        enhanced=reply.effective_enhanced,
        delay=float(delay),
        attempt=attempt,
        status=status.value,
    )

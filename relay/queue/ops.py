"""The operator's actions on a message, as pure functions from states to changes.

``relay queue hold/release`` and ``relay flush`` mean the same thing whether the daemon
carries them out (through the control socket) or the command does it on a stopped
spool, so what they change is decided here, once, and both paths record the result as
an ordinary status update.

* hold: every recipient not yet final becomes HELD; attempts, next attempt and last
  reply are kept, so release can put it back where it was.
* release: a HELD recipient becomes DEFERRED if its next attempt is still in the future,
  else PENDING (due now).
* flush: a DEFERRED recipient becomes PENDING (due now), attempts and last reply kept;
  held recipients stay held (as with Postfix, flushing does not release).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from relay.envelope import Envelope, RecipientState, RecipientStatus

__all__ = ["flush_changes", "hold_changes", "release_changes"]

Changes = dict[int, RecipientStatus]


def hold_changes(statuses: Sequence[RecipientStatus], now: float) -> Changes:
    """Put every recipient that is not final on hold."""
    return {
        i: replace(s, state=RecipientState.HELD, updated=now)
        for i, s in enumerate(statuses)
        if not s.state.is_final and s.state is not RecipientState.HELD
    }


def release_changes(statuses: Sequence[RecipientStatus], now: float) -> Changes:
    """Take held recipients off hold: deferred until their next attempt, or due now."""
    changes: Changes = {}
    for i, s in enumerate(statuses):
        if s.state is not RecipientState.HELD:
            continue
        if s.next_attempt is not None and s.next_attempt > now and s.attempts > 0:
            changes[i] = replace(s, state=RecipientState.DEFERRED, updated=now)
        else:
            changes[i] = replace(s, state=RecipientState.PENDING, next_attempt=None, updated=now)
    return changes


def flush_changes(
    envelope: Envelope, statuses: Sequence[RecipientStatus], channel: str | None, now: float
) -> Changes:
    """Make deferred recipients (on ``channel``, if given) due now."""
    changes: Changes = {}
    for i, (recipient, s) in enumerate(zip(envelope.recipients, statuses, strict=True)):
        if s.state is not RecipientState.DEFERRED:
            continue
        if channel is not None and (
            recipient.destination is None or recipient.destination.channel != channel
        ):
            continue
        changes[i] = replace(s, state=RecipientState.PENDING, next_attempt=None, updated=now)
    return changes

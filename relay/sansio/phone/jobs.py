"""Mail jobs: one small state machine per message each way, as transition tables.

Theory of operation
-------------------
Every message of a call is a *job*, numbered by the side that sends it.  The sender's
job (:class:`OutState`) is offered by the driver, proposed, answered, its text sent,
and settled by the receiver's final reply; the receiver's (:class:`InState`) is decided
by the driver, its text stored, committed, and settled by our final reply.  Jobs of both
directions run at the same time over one link, and any number of each (pipelining): the
session schedules them, these tables only say which step may follow which.

A missing entry is illegal.  The session turns that into a
:class:`~relay.sansio.phone.errors.PhoneProtocolError` when the peer's record caused the
step and a :class:`~relay.sansio.phone.errors.LocalPhoneError` when the driver's call
did, so a test can walk every pair.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["IN_TRANSITIONS", "OUT_TRANSITIONS", "InInput", "InState", "OutInput", "OutState"]


class OutState(enum.Enum):
    """A message we send."""

    QUEUED = "queued"  # offered by the driver, not yet proposed
    PROPOSED = "proposed"  # proposal sent, answer awaited
    SENDING = "sending"  # accepted: text flowing from the offset the receiver named
    AWAITING_FINAL = "awaiting-final"  # all text sent, final reply awaited
    SETTLED = "settled"  # every recipient has its reply


class OutInput(enum.Enum):
    """What moves a message we send."""

    PROPOSE = "propose"  # we sent the proposal
    ACCEPTED = "accepted"  # peer: text wanted (some address accepted)
    REFUSED = "refused"  # peer: whole message refused, deferred or already held; or no AOK
    TEXT_SENT = "text-sent"  # we sent the last byte
    FINAL = "final"  # peer: final reply
    ABANDON = "abandon"  # we cannot read the text: given up
    TOO_BIG = "too-big"  # over the peer's limit: settled without proposing


OUT_TRANSITIONS: Final[dict[tuple[OutState, OutInput], OutState]] = {
    (OutState.QUEUED, OutInput.PROPOSE): OutState.PROPOSED,
    (OutState.QUEUED, OutInput.TOO_BIG): OutState.SETTLED,
    (OutState.PROPOSED, OutInput.ACCEPTED): OutState.SENDING,
    (OutState.PROPOSED, OutInput.REFUSED): OutState.SETTLED,
    (OutState.SENDING, OutInput.TEXT_SENT): OutState.AWAITING_FINAL,
    (OutState.SENDING, OutInput.FINAL): OutState.SETTLED,  # receiver failed mid-text
    (OutState.SENDING, OutInput.ABANDON): OutState.SETTLED,
    (OutState.AWAITING_FINAL, OutInput.FINAL): OutState.SETTLED,
}


class InState(enum.Enum):
    """A message we receive."""

    DECIDING = "deciding"  # proposal received, the driver decides
    RECEIVING = "receiving"  # answered: text arriving
    COMMITTING = "committing"  # all text here: the driver makes it durable
    DRAINING = "draining"  # final failure sent mid-text: the rest is read and dropped
    SETTLED = "settled"  # final reply sent (or no text wanted)


class InInput(enum.Enum):
    """What moves a message we receive."""

    ACCEPT = "accept"  # driver: text wanted
    ACCEPT_COMPLETE = "accept-complete"  # driver: we hold all of it already (resume at end)
    REFUSE = "refuse"  # driver or engine: no text wanted
    TEXT = "text"  # peer: a piece of text
    TEXT_COMPLETE = "text-complete"  # peer: the last piece
    COMMITTED = "committed"  # driver: durable (or failed): final reply sent
    FAIL = "fail"  # driver: cannot store; final failure sent now
    ABANDONED = "abandoned"  # peer gave the message up


IN_TRANSITIONS: Final[dict[tuple[InState, InInput], InState]] = {
    (InState.DECIDING, InInput.ACCEPT): InState.RECEIVING,
    (InState.DECIDING, InInput.ACCEPT_COMPLETE): InState.COMMITTING,
    (InState.DECIDING, InInput.REFUSE): InState.SETTLED,
    (InState.RECEIVING, InInput.TEXT): InState.RECEIVING,
    (InState.RECEIVING, InInput.TEXT_COMPLETE): InState.COMMITTING,
    (InState.RECEIVING, InInput.FAIL): InState.DRAINING,
    (InState.RECEIVING, InInput.ABANDONED): InState.SETTLED,
    (InState.COMMITTING, InInput.COMMITTED): InState.SETTLED,
    (InState.DRAINING, InInput.TEXT): InState.DRAINING,
    (InState.DRAINING, InInput.TEXT_COMPLETE): InState.SETTLED,
    (InState.DRAINING, InInput.ABANDONED): InState.SETTLED,
}

"""When to try a recipient again, when to warn or give up, and which destinations to rest.

Why it is built this way:

* **Exponential backoff, capped, as in Postfix.**  After the *n*-th failed attempt the
  next one waits ``min(retry_min * 2**(n-1), retry_max)``: with the default 5m/70m that is
  5m, 10m, 20m, 40m, then 70m for ever.  Early retries catch the short outages (a
  greylisting peer, a restarting server); the cap keeps a long outage from pushing the
  next try hours past the moment the peer comes back.
* **Jitter.**  Each delay is moved by up to ±10 % (:data:`JITTER`), drawn from a
  ``random.Random`` the caller passes in, so the messages deferred by one outage do not
  all come back in the same second, and a test can seed the generator.  ``retry_max`` is
  the cap of the *nominal* delay; a jittered one may be up to 10 % longer.
* **The reply decides, through its action.**  :func:`disposition` reads nothing but
  :attr:`relay.reply.ReplyCode.action`, so the reply table in :mod:`relay.reply` stays
  the one place that says what a reply means.  A temporary failure that outlives
  ``give_up_after`` becomes a bounce whose reply says so, with RFC 3463's ``4.4.7``
  ("delivery time expired") and the last reply quoted, so the sender learns both why
  it failed and why the relay stopped trying (see :func:`expired_reply`).
* **Dead destinations.**  As in MMDF's deliver, a connection-level failure (action
  ``HOST_DEAD``: timeouts, refused connections, a peer speaking nonsense) rests the whole
  destination for a while (:class:`DeadHosts`), so the other messages for it wait
  instead of each paying for the same timeout.

Nothing here reads the clock: ``now`` and ``arrival`` are seconds since the epoch, passed
in by the deliverer.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Final, Protocol

from relay.envelope import Destination
from relay.reply import Action, Reply, ReplyCode

__all__ = [
    "EXPIRED_STATUS",
    "EXPIRED_TEXT",
    "JITTER",
    "DeadHosts",
    "Decision",
    "Disposition",
    "RetrySettings",
    "backoff_delay",
    "decide",
    "disposition",
    "expired_reply",
    "is_expired",
    "jittered",
    "next_attempt",
    "should_warn",
]

JITTER: Final = 0.10
"""The largest fraction by which a retry delay is moved, either way."""

EXPIRED_STATUS: Final = "4.4.7"
"""RFC 3463 "delivery time expired": the status of a recipient that ran out of time."""

EXPIRED_TEXT: Final = "delivery time expired"
"""How an expired recipient's reply begins."""

_MAX_DOUBLINGS: Final = 64  # beyond this the cap has long won; keeps 2**n finite


class RetrySettings(Protocol):
    """What the backoff needs from ``[deliver]`` (:class:`relay.config.DeliverSection`)."""

    @property
    def retry_min(self) -> float:
        """The delay after the first failed attempt, in seconds."""
        ...

    @property
    def retry_max(self) -> float:
        """The longest nominal delay, in seconds."""
        ...


def backoff_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """The nominal delay after the ``attempts``-th failed attempt (counted from 1)."""
    doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
    return min(retry_min * 2.0**doublings, retry_max)


def jittered(delay: float, rng: random.Random) -> float:
    """``delay`` moved by a random fraction of at most :data:`JITTER`, either way."""
    return delay * (1.0 + rng.uniform(-JITTER, JITTER))


def next_attempt(
    now: float,
    attempts: int,
    reply: Reply | None,
    settings: RetrySettings,
    rng: random.Random,
) -> float:
    """When to try again a recipient whose ``attempts``-th attempt just failed with ``reply``.

    Every temporary reply backs off on the same schedule (as in Postfix); ``reply`` is
    checked so that scheduling a retry for a delivered or bounced recipient fails loudly
    instead of quietly resending.  ``None`` means no reply was had (e.g. a session that
    never opened).
    """
    if reply is not None and not reply.code.is_temporary:
        raise ValueError(f"no retry for a reply that is not temporary: {reply}")
    delay = backoff_delay(attempts, settings.retry_min, settings.retry_max)
    return now + jittered(delay, rng)


def is_expired(arrival: float, now: float, give_up_after: float) -> bool:
    """Whether a message that arrived at ``arrival`` has been queued too long to keep trying."""
    return now - arrival >= give_up_after


def should_warn(arrival: float, now: float, warn_after: float, already_warned: bool) -> bool:
    """Whether to send the one delay DSN now: late enough, and not sent before.

    A ``warn_after`` of zero (or less) turns warnings off, as Postfix's
    ``delay_warning_time = 0`` does.  The caller asks only for recipients still deferred;
    an expired one gets a failure DSN instead.
    """
    return not already_warned and warn_after > 0 and now - arrival >= warn_after


# --- what a reply means for a recipient ------------------------------------------------


class Disposition(enum.Enum):
    """What the deliverer does with a recipient after its final reply."""

    DELIVERED = "delivered"  # record it as delivered; done
    DEFER = "defer"  # keep it queued; try again later
    DEFER_HOST_DEAD = "defer-host-dead"  # keep it queued and rest the whole destination
    BOUNCE = "bounce"  # record it as failed and tell the sender


@dataclass(frozen=True, slots=True)
class Decision:
    """A disposition and the reply to record (and report) with it.

    The reply is the channel's own, except for a temporary failure past the lifetime,
    where it is :func:`expired_reply` of it.
    """

    disposition: Disposition
    reply: Reply

    @property
    def expired(self) -> bool:
        """Whether this is a bounce because time ran out rather than a permanent refusal."""
        return self.disposition is Disposition.BOUNCE and self.reply.code.is_temporary


_BY_ACTION: Final[dict[Action, Disposition]] = {
    Action.COMMIT: Disposition.DELIVERED,
    Action.RETRY: Disposition.DEFER,
    Action.HOST_DEAD: Disposition.DEFER_HOST_DEAD,
    Action.BOUNCE: Disposition.BOUNCE,
}


def decide(reply: Reply, *, arrival: float, now: float, give_up_after: float) -> Decision:
    """The disposition of a recipient whose final reply is ``reply``, and what to record.

    ``AOK`` (address accepted, text to follow) is not a final reply: passing it is a
    defect of the caller and raises ValueError.
    """
    found = _BY_ACTION.get(reply.code.action)
    if found is None:
        raise ValueError(f"not a final reply: {reply}")
    if reply.code.is_temporary and is_expired(arrival, now, give_up_after):
        return Decision(Disposition.BOUNCE, expired_reply(reply))
    return Decision(found, reply)


def disposition(reply: Reply, *, arrival: float, now: float, give_up_after: float) -> Disposition:
    """Only the disposition of :func:`decide`."""
    return decide(reply, arrival=arrival, now=now, give_up_after=give_up_after).disposition


def expired_reply(last: Reply | None) -> Reply:
    """The reply of a recipient that ran out of time, quoting its last reply if it had one.

    It keeps the last reply's MMDF value and SMTP code (a 4xx: the failure was never
    permanent) and carries ``4.4.7``, which is what a DSN reports as its status.
    """
    if last is None:
        return Reply(ReplyCode.TIME, EXPIRED_TEXT, enhanced=EXPIRED_STATUS)
    if last.effective_enhanced == EXPIRED_STATUS:
        return last
    text = f"{EXPIRED_TEXT} (last reply: {last.smtp_line()})"
    return Reply(last.code, text, last.effective_smtp_code, EXPIRED_STATUS)


# --- dead destinations -----------------------------------------------------------------


class DeadHosts:
    """Destinations resting after a connection-level failure, each until a given time.

    The deliverer marks a destination with :meth:`note` (or :meth:`mark_dead`), skips it
    while :meth:`is_dead`, and calls :meth:`revive` when a delivery to it succeeds or the
    operator flushes the queue.  :meth:`expire` forgets entries whose time has passed, so
    the table holds only destinations that are resting now.
    """

    def __init__(self, delay: float) -> None:
        if delay < 0:
            raise ValueError(f"negative dead-host delay: {delay}")
        self.delay = delay
        self._until: dict[Destination, float] = {}

    def note(self, destination: Destination, reply: Reply, now: float) -> bool:
        """Mark ``destination`` dead if ``reply`` is a connection-level failure; say if so."""
        if reply.code.action is not Action.HOST_DEAD:
            return False
        self.mark_dead(destination, now)
        return True

    def mark_dead(self, destination: Destination, now: float, delay: float | None = None) -> float:
        """Rest ``destination`` until ``now + delay`` (never shortening a longer rest)."""
        until = now + (self.delay if delay is None else delay)
        until = max(until, self._until.get(destination, until))
        self._until[destination] = until
        return until

    def is_dead(self, destination: Destination, now: float) -> bool:
        """Whether ``destination`` is resting at ``now``."""
        until = self._until.get(destination)
        return until is not None and now < until

    def dead_until(self, destination: Destination) -> float | None:
        """Until when ``destination`` was marked dead, or None if it is not marked."""
        return self._until.get(destination)

    def revive(self, destination: Destination) -> None:
        """Forget that ``destination`` was dead (a delivery to it worked, or a flush)."""
        self._until.pop(destination, None)

    def expire(self, now: float) -> None:
        """Forget every destination whose rest is over at ``now``."""
        for destination in [d for d, until in self._until.items() if until <= now]:
            del self._until[destination]

    def __len__(self) -> int:
        return len(self._until)

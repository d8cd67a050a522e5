"""When to call a phone site: pure decisions from the site's settings, its state and now.

A call is wanted for one of three reasons: mail is waiting for the site (called
``gather_delay`` after the first message, so one call takes a burst), the poll is due
(every ``poll`` seconds after the last call, or at the next of the ``poll_times``), or
an operator asked.  A wanted call then waits for two things: the end of the backoff
after failed calls (``retry_min`` doubling up to ``retry_max``; the site is *down*
meanwhile), and the call window, if one is set (cheap hours; a window may wrap past
midnight).  Times of day are UTC seconds after midnight.  Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from relay.config import DeliverSection, PhoneSite, field_default
from relay.policy.retry import backoff_delay

__all__ = ["CallPolicy", "SiteState", "in_window", "next_call", "next_window_start"]

DAY: Final = 86400
_DELIVER_DEFAULTS: Final = DeliverSection()


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """A site's calling settings (from ``[phone.sites.NAME]`` and ``[deliver]``)."""

    poll: float | None = None
    poll_times: tuple[int, ...] = ()
    call_window: tuple[int, int] | None = None
    gather_delay: float = field_default(PhoneSite, "gather_delay")
    retry_min: float = _DELIVER_DEFAULTS.retry_min
    retry_max: float = _DELIVER_DEFAULTS.retry_max


@dataclass(frozen=True, slots=True)
class SiteState:
    """What the scheduler knows of a site: the last call, failures since the last good
    one, and since when mail has been waiting (None: none known)."""

    started: float
    last_call: float | None = None
    failures: int = 0
    mail_since: float | None = None

    def down_until(self, policy: CallPolicy) -> float | None:
        """The end of the backoff after failed calls, or None if the site is up."""
        if not self.failures or self.last_call is None:
            return None
        return self.last_call + backoff_delay(self.failures, policy.retry_min, policy.retry_max)


def in_window(window: tuple[int, int] | None, when: float) -> bool:
    """Whether ``when`` (epoch seconds) falls in the daily window (always, if None)."""
    if window is None:
        return True
    start, end = window
    second = when % DAY
    if start < end:
        return start <= second < end
    return second >= start or second < end


def next_window_start(window: tuple[int, int] | None, when: float) -> float:
    """``when`` if it is in the window, else the window's next opening."""
    if in_window(window, when):
        return when
    assert window is not None
    midnight = when - when % DAY
    opening = midnight + window[0]
    return opening if opening > when else opening + DAY


def _next_poll(policy: CallPolicy, state: SiteState) -> float | None:
    base = state.last_call if state.last_call is not None else state.started
    candidates = []
    if policy.poll is not None:
        candidates.append(base + policy.poll if state.last_call is not None else base)
    if policy.poll_times:
        midnight = base - base % DAY
        for day in (0, DAY):
            later = [midnight + day + t for t in policy.poll_times if midnight + day + t > base]
            if later:
                candidates.append(later[0])
                break
    return min(candidates) if candidates else None


def next_call(policy: CallPolicy, state: SiteState, now: float) -> float | None:
    """When to call next (at or after ``now``), or None when no call is wanted."""
    wanted = [t for t in (_next_poll(policy, state),) if t is not None]
    if state.mail_since is not None:
        wanted.append(state.mail_since + policy.gather_delay)
    if not wanted:
        return None
    when = max(min(wanted), now)
    down = state.down_until(policy)
    if down is not None:
        when = max(when, down)
    return next_window_start(policy.call_window, when)

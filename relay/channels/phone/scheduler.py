"""When each site is called: timers over :func:`relay.policy.call_schedule.next_call`.

One timer per site this relay calls, re-armed after every change: mail waiting for the
site (the phone channel says so when the deliverer offers it mail), the end of a call
(a completed call clears the failures and the mail waiting; a failed one counts a
failure, and the site is *down* until its backoff ends), an operator's ``relay call``.
A call that is due while another call to the site runs waits for it.  The clock is the
reactor's, so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from relay.channels.phone.calllog import CallRecord
from relay.policy.call_schedule import CallPolicy, SiteState, next_call

__all__ = ["CallScheduler"]

_log = Logger()


class CallScheduler(Service):
    """Calls sites when their schedule says so (see the module docstring)."""

    def __init__(
        self,
        policies: Mapping[str, CallPolicy],
        place_call: Callable[[str], Deferred[CallRecord]],
        clock: Any,
    ) -> None:
        """``policies`` holds the sites this relay calls; ``place_call(site)`` calls one."""
        self._policies = dict(policies)
        self._place_call = place_call
        self._clock = clock
        now = clock.seconds()
        self.states: dict[str, SiteState] = {site: SiteState(now) for site in policies}
        self._timers: dict[str, IDelayedCall] = {}
        self._calling: set[str] = set()
        self._seen: dict[str, CallRecord] = {}  # the last record taken into account, per site

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        now = self._clock.seconds()
        self.states = {site: replace(state, started=now) for site, state in self.states.items()}
        for site in self._policies:
            self._arm(site)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # --- what changes the plan --------------------------------------------------------------

    def mail_waiting(self, site: str) -> None:
        """Mail for ``site`` is queued: call it after the gathering delay (if it is one we
        call; a site that only calls in picks it up itself)."""
        state = self.states.get(site)
        if state is None or state.mail_since is not None:
            return
        self.states[site] = replace(state, mail_since=self._clock.seconds())
        self._arm(site)

    def call_ended(self, record: CallRecord) -> None:
        """A call with a site ended, whoever made it: reset or count a failure.

        The same record may come twice (from the calls' listeners and from the call this
        scheduler placed); it counts once."""
        state = self.states.get(record.site)
        if state is None or self._seen.get(record.site) is record:
            return
        self._seen[record.site] = record
        now = self._clock.seconds()
        if record.completed:
            state = replace(state, last_call=now, failures=0, mail_since=None)
        elif record.direction == "out":
            state = replace(state, last_call=now, failures=state.failures + 1)
        else:
            return  # a call in that failed says nothing of our calls out
        self.states[record.site] = state
        self._arm(record.site)

    def next_call_time(self, site: str) -> float | None:
        """When ``site`` is called next (None: no call planned)."""
        return next_call(self._policies[site], self.states[site], self._clock.seconds())

    def is_down(self, site: str) -> bool:
        """Whether ``site`` is resting after failed calls."""
        until = self.states[site].down_until(self._policies[site])
        return until is not None and until > self._clock.seconds()

    # --- timers ----------------------------------------------------------------------------

    def _arm(self, site: str) -> None:
        timer = self._timers.pop(site, None)
        if timer is not None and timer.active():
            timer.cancel()
        if not self.running or site in self._calling:
            return
        when = self.next_call_time(site)
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._timers[site] = self._clock.callLater(delay, self._due, site)

    def _due(self, site: str) -> None:
        self._timers.pop(site, None)
        self._calling.add(site)
        d = self._place_call(site)

        def done(result: object) -> None:
            self._calling.discard(site)
            if isinstance(result, CallRecord):
                self.call_ended(result)
            else:
                _log.failure("phone: the call to {site} failed", result, site=site)  # type: ignore[arg-type]
                state = self.states[site]
                self.states[site] = replace(
                    state, last_call=self._clock.seconds(), failures=state.failures + 1
                )
            self._arm(site)

        d.addBoth(done)

"""Limits that hold across all SMTP sessions: memory for message text, failed AUTH.

Per-session limits (line length, message size, recipients, errors) live in the engine;
these two need a view over every session at once, so the listeners share one of each
(:func:`~relay.gateway.service.build_gateway` makes them).

:class:`TextBudget` bounds the message text held in memory.  Each session buffers its
text until the spool has it, so without a shared bound the worst case is
``max_sessions * max_message_size`` (about 1 GiB with the defaults) from clients that
all send big messages at once.  A session whose text would go over the bound keeps
reading and throwing its text away, and answers ``452 4.3.1`` at the end of data: the
client retries later, as it would for a full disk.

:class:`AuthThrottle` counts failed AUTH per client address across sessions, forgetting
each failure after a window on the injected clock.  The per-session delay and error
count alone let a client reconnect and guess again; past ``max_failures`` in the window
its AUTH is refused with ``454 4.7.0`` without checking the password, so guessing costs
it time and costs us no scrypt.  An attempt counts against the limit from the moment its
check starts (:meth:`AuthThrottle.begin`), not only once it has failed: a check takes a
while in a thread, and a client that opens many sessions at once and sends AUTH in each
would otherwise have every password checked before the first failure is counted.

Sessions reach it through :class:`~relay.interfaces.IAuthThrottle`, asynchronous
because a gateway worker process asks the spool's process, which holds the relay's one
:class:`AuthThrottle` (:class:`relay.handoff.remote_auth.RemoteAuthThrottle`): with
workers, the count still holds across every process.  In the spool's process the
sessions ask it directly, through :class:`LocalAuthThrottle`.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relay.config import SmtpSection
from relay.interfaces import AuthVerdict, IAuthThrottle

__all__ = [
    "DEFAULT_TEXT_BUDGET",
    "AuthThrottle",
    "LocalAuthThrottle",
    "TextBudget",
]

_SMTP_DEFAULTS: Final = SmtpSection()  # the defaults of [smtp], defined once, in the config

DEFAULT_TEXT_BUDGET: Final = _SMTP_DEFAULTS.max_text_in_memory
"""Bytes of message text all sessions together may hold in memory (``max_text_in_memory``)."""


class TextBudget:
    """Bytes of message text held in memory by all sessions, and the bound on them."""

    def __init__(self, limit: int = DEFAULT_TEXT_BUDGET) -> None:
        if limit < 1:
            raise ValueError("the text budget must be positive")
        self.limit = limit
        self.used = 0
        self.refused = 0  # messages turned away for lack of memory, for logs and tests

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit under the limit; say whether they did."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        """Give back bytes taken with :meth:`reserve`."""
        if size > self.used:
            raise ValueError(f"releasing {size} bytes but only {self.used} are reserved")
        self.used -= size


class AuthThrottle:
    """Failed AUTH attempts per client address, each forgotten ``window`` seconds later.

    A client is blocked while its failures within the window and its attempts still
    being checked add up to ``max_failures``.  Only the last ``max_failures`` times are
    kept per address, and at most ``max_clients`` addresses (the oldest forgotten
    first), so a botnet cannot make this grow unbounded; attempts in progress are kept
    only while their sessions wait for the check.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_failures: int = _SMTP_DEFAULTS.auth_max_failures,
        window: float = _SMTP_DEFAULTS.auth_failure_window,
        max_clients: int = 65536,
    ) -> None:
        if max_failures < 1 or window <= 0 or max_clients < 1:
            raise ValueError("max_failures, window and max_clients must be positive")
        self._clock = clock
        self.max_failures = max_failures
        self.window = window
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._pending: Counter[str] = Counter()

    def blocked(self, client: str) -> bool:
        """Whether ``client``'s failures in the window and attempts in progress reach the limit."""
        return self.failures(client) + self._pending[client] >= self.max_failures

    def begin(self, client: str) -> bool:
        """Start an attempt of ``client``'s, counted from now; False (nothing counted) if blocked.

        Every attempt begun is ended with :meth:`end` once its check is done.
        """
        if self.blocked(client):
            return False
        self._pending[client] += 1
        return True

    def ask(self, client: str) -> AuthVerdict:
        """:meth:`begin`, with the counts behind the answer."""
        allowed = self.begin(client)
        return AuthVerdict(allowed, self.failures(client), self.pending(client), self.window)

    def end(self, client: str, *, failed: bool) -> None:
        """An attempt :meth:`begin` counted is done; a failed one counts on in the window."""
        pending = self._pending[client] - 1
        if pending < 0:
            raise ValueError(f"no AUTH attempt of {client} in progress")
        if pending:
            self._pending[client] = pending
        else:
            del self._pending[client]
        if failed:
            self.failed(client)

    def pending(self, client: str) -> int:
        """How many attempts of ``client`` are being checked now."""
        return self._pending[client]

    def failures(self, client: str) -> int:
        """How many failures of ``client`` fall within the window now."""
        times = self._recent(client)
        return 0 if times is None else len(times)

    def failed(self, client: str) -> None:
        """Count one failed AUTH for ``client``, now."""
        times = self._recent(client)
        if times is None:
            times = deque(maxlen=self.max_failures)
        else:
            del self._failures[client]  # re-inserted below: the dict stays oldest first
        times.append(self._clock.seconds())
        self._failures[client] = times
        if len(self._failures) > self._max_clients:
            self._forget()

    def _recent(self, client: str) -> deque[float] | None:
        """The client's failures within the window (older ones dropped), or None."""
        times = self._failures.get(client)
        if times is None:
            return None
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def _forget(self) -> None:
        """Drop expired clients, then the least recently failed until under the cap."""
        horizon = self._clock.seconds() - self.window
        for client in [c for c, times in self._failures.items() if times[-1] <= horizon]:
            del self._failures[client]
        while len(self._failures) > self._max_clients:
            del self._failures[next(iter(self._failures))]


@implementer(IAuthThrottle)
class LocalAuthThrottle:
    """The sessions of the process that holds the :class:`AuthThrottle` ask it directly."""

    def __init__(self, throttle: AuthThrottle) -> None:
        self.throttle = throttle

    def begin(self, client: str) -> Deferred[AuthVerdict]:
        """The verdict, at once."""
        return defer.succeed(self.throttle.ask(client))

    def end(self, client: str, failed: bool) -> None:
        """Done: a failed attempt counts on in the window."""
        self.throttle.end(client, failed=failed)

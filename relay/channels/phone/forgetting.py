"""Forgetting the link's remembered ids once no resend can come.

The receiver remembers each committed id so that a message resent after a dropped line
is stored once (:mod:`relay.phone.filestore`).  A sender resends a message only while it
holds it, and it holds nothing longer than its ``[deliver] give_up_after``; an id older
than twice that can no longer come back (the factor covers a sender whose clock or
settings differ somewhat from ours).  :class:`IdForgetting` asks the store to forget
older ids once at start and then every ``interval``; the store does the file work off
the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["FORGET_INTERVAL", "IdForgetting", "remember_for"]

FORGET_INTERVAL: Final = 3600.0
"""Seconds between two passes over the remembered ids."""

_log = Logger()


def remember_for(give_up_after: float) -> float:
    """How long a committed id is remembered: twice the longest a sender keeps mail."""
    return 2.0 * give_up_after


class IdForgetting(Service):
    """Calls ``forget(before)`` at start and every ``interval`` seconds, ``before`` being
    ``keep`` seconds ago."""

    def __init__(
        self,
        forget: Callable[[float], Deferred[int]],
        keep: float,
        clock: IReactorTime,
        interval: float = FORGET_INTERVAL,
    ) -> None:
        self._forget = forget
        self._keep = keep
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        loop = self._loop = LoopingCall(self._pass)
        loop.clock = self._clock
        loop.start(self._interval, now=True).addErrback(
            lambda f: _log.failure("phone: forgetting ids stopped", f)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()  # type: ignore[no-untyped-call]

    def _pass(self) -> Deferred[None]:
        """One pass; a failure is logged and the next pass tries again."""
        before = self._clock.seconds() - self._keep
        d = self._forget(before)

        def done(count: int) -> None:
            if count:
                _log.info("phone: forgot {count} remembered message ids", count=count)

        return d.addCallbacks(
            done, lambda f: _log.failure("phone: cannot forget remembered ids", f)
        )

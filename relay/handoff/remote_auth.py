"""A gateway worker's failed-AUTH count, kept by the spool's process: an IAuthThrottle.

Every process runs SMTP sessions on the same sockets, so a count kept in each would let
a client guessing in parallel have ``auth_max_failures`` passwords checked per process.
The spool's process holds the one :class:`~relay.gateway.limits.AuthThrottle`; a
worker's session asks it before each password check (``AUTH`` → ``VERDICT``) and tells
it the outcome (``ENDED``), over the worker's link (:mod:`relay.handoff.codec`).

**Failure.**  A check is never let through uncounted: when the link is gone, or goes
while a question waits for its verdict, :meth:`RemoteAuthThrottle.begin` fails (the
session answers ``454``) and the worker exits anyway.  An attempt already allowed when
the link drops is counted as failed by the spool's process (it cannot know the
outcome), so the ``ENDED`` this side can no longer send is not missed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.gateway.limits import AuthVerdict
from relay.handoff.codec import MAX_REQUEST, AuthAnswer, AuthBegin, AuthEnd, Frame, HandoffError
from relay.interfaces import IAuthThrottle

__all__ = ["RemoteAuthThrottle"]


@implementer(IAuthThrottle)
class RemoteAuthThrottle:
    """Asks the spool's process, over the link, and fires each question's verdict."""

    def __init__(self, send: Callable[[Frame], bool]) -> None:
        """``send`` puts a frame on the link; False when there is no link to send on."""
        self._send = send
        self._waiting: dict[int, Deferred[AuthVerdict]] = {}
        self._next = 0
        self._lost = False

    def begin(self, client: str) -> Deferred[AuthVerdict]:
        """Ask; fire with the spool's process's verdict, or fail without a link."""
        if self._lost:
            return defer.fail(HandoffError("no link to the spool's process"))
        request = self._next
        self._next = 0 if request == MAX_REQUEST else request + 1
        d: Deferred[AuthVerdict] = Deferred()
        self._waiting[request] = d
        if not self._send(AuthBegin(request, client)):
            del self._waiting[request]
            return defer.fail(HandoffError("no link to the spool's process"))
        return d

    def end(self, client: str, failed: bool) -> None:
        """Tell the outcome; without a link the spool's process has counted it failed."""
        if not self._lost:
            self._send(AuthEnd(client, failed))

    @property
    def waiting(self) -> int:
        """Questions asked and not answered yet."""
        return len(self._waiting)

    def answered(self, frame: AuthAnswer) -> None:
        """The verdict on one question; HandoffError if that question is not waiting."""
        d = self._waiting.pop(frame.request, None)
        if d is None:
            raise HandoffError(f"a verdict on AUTH {frame.request}, which is not waiting")
        d.callback(frame.verdict)

    def link_lost(self) -> None:
        """No more verdicts will come: every question waiting fails (its session says 454)."""
        self._lost = True
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(HandoffError("the link to the spool's process went away"))

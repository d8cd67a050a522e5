"""An epoll reactor that hands each I/O event straight to its selectable.

Why this exists: Twisted's ``EPollReactor.doPoll`` wraps every event in
``twisted.python.log.callWithLogger``: it asks the selectable for its ``logPrefix()``,
copies the legacy log context, pushes ``{"system": prefix}`` onto it, calls, and pops.
The only reader of that context is the legacy ``twisted.python.log`` API
(``log.msg``/``log.err``), which uses it to label a line with the connection it came
from.  A gateway worker has no use for that label: its log lines are written without a
system field, for the relay to put in its own log (:mod:`relay.gateway.worker`).  What
it pays for it is real: an SMTP session as ``smtp-source`` runs it is about fifteen
events.  ``bench/lean_reactor.py`` runs the gateway on each reactor in turn, in
alternating rounds; its figures are in the README.

The relay's own process keeps Twisted's reactor: its log lines do show the system
field, and there the gateway's share of the CPU is smaller (the spool and the
deliverer run there too).

What changes for the code running on it: a legacy ``log.msg``/``log.err`` made while
an event is handled is labelled ``-`` instead of the connection's prefix.  Nothing
else: ``_doReadOrWrite`` still catches what ``doRead``/``doWrite`` raise, logs it and
disconnects the selectable, and anything escaping that is logged here, as
``callWithLogger`` would, instead of ending the loop.  It overrides one method and
relies on the attributes that method uses in Twisted's own (``_poller``,
``_selectables``, ``_doReadOrWrite``); tests/test_leanreactor.py runs real sockets
through it, so a Twisted release that moves them fails CI.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

__all__ = ["LeanEPollReactor", "install"]


class LeanEPollReactor(EPollReactor):
    """``EPollReactor`` without the legacy log context around each event."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait for events (``timeout`` seconds at most, None: no limit) and handle them."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise  # a programming error (as in Twisted's own): loudly
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:  # removed by an earlier event of this round
                continue
            try:
                handle(selectable, fd, event)  # type: ignore[no-untyped-call]
            except KeyboardInterrupt:
                raise
            except BaseException:  # as callWithLogger: log it, keep the loop going
                log.err(None, "error while handling an I/O event")  # type: ignore[no-untyped-call]

    doIteration = doPoll


def install() -> Any:
    """Make a :class:`LeanEPollReactor` the process's reactor (before anything imports one).

    Returns it (typed ``Any``, as ``twisted.internet.reactor`` is: Twisted's reactor
    classes are untyped).
    """
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor()  # type: ignore[no-untyped-call]
    installReactor(reactor)  # type: ignore[no-untyped-call]
    return reactor

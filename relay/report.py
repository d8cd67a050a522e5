"""The running relay's part of ``relay status``: since when, deliveries, phone sites.

The queue part comes from the spool (:func:`relay.queue.view.queue_status`); this adds
what only the daemon knows, and the control socket (:mod:`relay.queue.control`) sends
both to ``relay status``.

``phone_sites`` is empty until the phone channel exists: it is where that channel will
put, per site, the last call and its result (issue 17).  An empty object says "no
phone sites are run by this relay", which is true of this build; nothing is made up.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime

from relay import __version__
from relay.deliver.history import DeliveryHistory

__all__ = ["DaemonReport"]


class DaemonReport(Service):
    """Notes when the relay started; answers the daemon's part of ``relay status``."""

    def __init__(self, clock: IReactorTime, history: DeliveryHistory) -> None:
        self._clock = clock
        self._history = history
        self.started: float | None = None

    def startService(self) -> None:
        """The relay is up from now."""
        super().startService()  # type: ignore[no-untyped-call]
        self.started = self._clock.seconds()

    def report(self) -> dict[str, Any]:
        """``{"running": true, "pid", "version", "started", "uptime", "deliveries", ...}``."""
        now = self._clock.seconds()
        started = self.started if self.started is not None else now
        return {
            "running": True,
            "pid": os.getpid(),
            "version": __version__,
            "started": started,
            "uptime": max(0.0, now - started),
            "deliveries": self._history.to_json(),
            "phone_sites": {},
        }

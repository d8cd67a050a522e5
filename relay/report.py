"""The running relay's part of ``relay status``: since when, deliveries, phone sites.

The queue part comes from the spool (:func:`relay.queue.view.queue_status`); this adds
what only the daemon knows, and the control socket (:mod:`relay.queue.control`) sends
both to ``relay status``.

``phone_sites`` holds, per phone site, whether this relay calls it, its last call (the
call record: when, which way, the result) and, for a site it calls, the next planned
call and whether the site is down after failed calls.  An empty object: this relay runs
no phone sites.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime

from relay import __version__
from relay.deliver.history import DeliveryHistory

__all__ = ["DaemonReport"]


class DaemonReport(Service):
    """Notes when the relay started; answers the daemon's part of ``relay status``."""

    def __init__(
        self,
        clock: IReactorTime,
        history: DeliveryHistory,
        phone_sites: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``phone_sites`` reports the phone channel's sites (None: no phone channel)."""
        self._clock = clock
        self._history = history
        self._phone_sites = phone_sites
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
            "phone_sites": self._phone_sites() if self._phone_sites is not None else {},
        }

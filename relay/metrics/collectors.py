"""The gauges of ``/metrics``, read when Prometheus scrapes: queue sizes and SMTP sessions.

Nothing is counted for them on the hot path: the queue is already in memory (the
spool's :class:`~relay.queue.state.SpoolState`), and the gateway's
:class:`~relay.gateway.protocol.SessionLimiter` already counts sessions (open, and
refused by reason); gateway worker processes send theirs to this process at most once a
second (``SESSIONS`` frames, :mod:`relay.handoff.codec`), and those of a worker that
exited are kept (:attr:`~relay.gateway.workers.GatewayWorkers.retired_refused`) so the
refused counter never goes back.

prometheus-client's Twisted resource runs the scrape in a thread of the reactor's
pool, while the reactor thread changes the queue; so the values are read in the
reactor thread (``blockingCallFromThread``), in one go, and only the formatting
happens in the scrape's thread.  Reading the queue walks every queued message once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.threads import blockingCallFromThread
from twisted.python.threadable import isInIOThread

from relay.gateway.service import Gateway
from relay.queue.service import SpoolService
from relay.queue.view import queue_status

__all__ = ["RelayCollector", "Snapshot"]


@dataclass(slots=True)
class Snapshot:
    """The gauges' values at one moment (read in the reactor thread)."""

    queue: dict[str, Any] | None = None  # relay.queue.view.queue_status, None: not open
    sessions_open: int = 0
    sessions_refused: Counter[str] = field(default_factory=Counter)


class RelayCollector(Collector):
    """Collects the queue and session gauges from the running relay's services."""

    def __init__(self, reactor: Any, spool: SpoolService, gateway: Gateway) -> None:
        """``spool`` is the SpoolService, ``gateway`` the ``smtp`` service tree."""
        self._reactor = reactor
        self._spool = spool
        self._gateway = gateway

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The families without reading anything (the registry asks when registering)."""
        yield from _families(Snapshot(queue=queue_status([], 0.0)))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The metric families, from a snapshot taken in the reactor thread."""
        if isInIOThread():  # type: ignore[no-untyped-call]
            snapshot = self.snapshot()
        else:
            snapshot = blockingCallFromThread(self._reactor, self.snapshot)
        yield from _families(snapshot)

    def snapshot(self) -> Snapshot:
        """Read everything now (in the reactor thread)."""
        out = Snapshot()
        queue = self._spool.queue
        if queue is not None:
            out.queue = queue_status(queue.entries(), self._reactor.seconds())
        limiter = self._gateway.limiter  # every listener's sessions in this process
        out.sessions_open += limiter.total
        out.sessions_refused.update(limiter.refused)
        names = {child.name: child for child in self._gateway}
        workers = names.get("workers")
        if workers is not None:
            out.sessions_refused.update(workers.retired_refused)
            for worker in list(workers.workers.values()):
                report = worker.server.sessions
                if not worker.server.lost:
                    out.sessions_open += report.open
                out.sessions_refused.update(report.refused)
        return out


def _families(snapshot: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    queue = snapshot.queue
    if queue is not None:
        yield GaugeMetricFamily(
            "relay_queue_messages", "Messages in the queue.", value=queue["messages"]
        )
        recipients = GaugeMetricFamily(
            "relay_queue_recipients",
            "Recipients of queued messages, by state and channel.",
            labels=["state", "channel"],
        )
        for channel, states in queue["channels"].items():
            for state, count in states.items():
                recipients.add_metric([state, channel], count)
        yield recipients
        oldest = queue["oldest"]
        yield GaugeMetricFamily(
            "relay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when it is empty).",
            value=0.0 if oldest is None else oldest["age"],
        )
    yield GaugeMetricFamily(
        "relay_smtp_sessions_open",
        "SMTP sessions open, in this process and its gateway workers.",
        value=snapshot.sessions_open,
    )
    refused = CounterMetricFamily(
        "relay_smtp_sessions_refused",
        "SMTP sessions refused at connect, by reason.",
        labels=["reason"],
    )
    for reason in ("max_sessions", "max_sessions_per_client", "spool_not_ready"):
        snapshot.sessions_refused.setdefault(reason, 0)
    for reason, count in sorted(snapshot.sessions_refused.items()):
        refused.add_metric([reason], count)
    yield refused

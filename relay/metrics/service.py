"""``/metrics`` over HTTP on ``[metrics] listen``, with prometheus-client's Twisted resource.

:func:`build_metrics` is what ``relay.tap`` calls when the section is configured: a
``metrics`` service holding the collector's registration (for as long as the relay
runs) and the HTTP listener.  A port that cannot be bound stops the relay at start, as
an SMTP port does.  Requests are not logged: a scrape every few seconds would drown
the log.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from relay.gateway.service import Gateway
from relay.metrics.collectors import RelayCollector
from relay.queue.service import SpoolService
from relay.runtime.services import attach, named_multiservice

__all__ = ["build_metrics"]


class _Registration(Service):
    """Registers a collector with the default registry while running."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        REGISTRY.register(self._collector)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        REGISTRY.unregister(self._collector)


class _QuietSite(Site):
    """A Site that does not log every request."""

    def log(self, request: Request) -> None:
        """Scrapes are not worth a log line each."""


def build_metrics(listen: str, reactor: Any, spool: SpoolService, gateway: Gateway) -> MultiService:
    """The ``metrics`` service: ``GET /metrics`` on the endpoint ``listen``."""
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsResource(REGISTRY))  # type: ignore[no-untyped-call]
    site = _QuietSite(root)  # type: ignore[no-untyped-call]
    endpoint = serverFromString(reactor, listen)  # type: ignore[no-untyped-call]
    listener = StreamServerEndpointService(endpoint, site)  # type: ignore[no-untyped-call]
    listener._raiseSynchronously = True  # cannot bind: twistd says so and exits
    top = named_multiservice("metrics")
    attach(_Registration(RelayCollector(reactor, spool, gateway)), top, "collector")
    attach(listener, top, f"listen:{listen}")
    return top

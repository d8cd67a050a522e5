"""``[metrics]``: the Prometheus endpoint."""

from __future__ import annotations

from relay.config.model import MetricsSection
from relay.config.reader import _Table
from relay.config.values import _endpoint


def _read_metrics(t: _Table) -> MetricsSection:
    return MetricsSection(listen=t.get("listen", _endpoint, MetricsSection().listen))

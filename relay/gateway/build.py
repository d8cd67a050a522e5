"""The relay's SMTP side as the spool's process runs it: one builder for every user.

:func:`build_smtp` makes the gateway on the configured listeners and, with ``[smtp]
workers``, the gateway worker processes that share those listeners and the limits
(:mod:`relay.gateway.workers`).  ``relay.tap`` calls it for ``twistd relay``, and the
benchmarks call it too, so what they measure is wired as the relay is.  A worker
process builds its own part with :func:`~relay.gateway.service.build_gateway`, from
the configuration the spool's process sends it.
"""

from __future__ import annotations

from typing import Any

from relay.config import Config
from relay.gateway.limits import LocalAuthThrottle
from relay.gateway.service import Gateway, build_auth_throttle, build_gateway
from relay.gateway.workers import Busy, GatewayWorkers
from relay.interfaces import ILocalRecipients, QueueSource
from relay.policy.routing import Router
from relay.runtime.services import attach

__all__ = ["build_smtp"]


def build_smtp(
    config: Config,
    queue: QueueSource,
    local_recipients: ILocalRecipients,
    reactor: Any,
    *,
    router: Router,
    busy: Busy | None = None,
) -> Gateway:
    """The ``smtp`` service tree for ``config``, storing into ``queue`` once it is open.

    ``router`` is the relay's one (its channels are the ones a worker's gateway
    accepts mail for); ``busy`` is the deliverer, whose deliveries in flight leave the
    listeners to the workers (None: this process always accepts too).  The failed-AUTH
    count is this process's, and the workers ask it over their links.  The workers are
    attached last, after the listeners: they start once the ports are bound, and stop
    first.
    """
    auth = build_auth_throttle(config, reactor)
    count = config.smtp.workers
    gateway = build_gateway(
        config,
        queue,
        local_recipients,
        reactor,
        router=router,
        processes=1 + count,
        auth_throttle=LocalAuthThrottle(auth),
    )
    if count:
        workers = GatewayWorkers(
            config, count, gateway, queue, router.channels, reactor, busy, auth=auth
        )
        attach(workers, gateway, "workers")
    return gateway

"""The deliverer as a twistd service (:class:`DelivererService`): IService and IDeliverer.

It wires the parts together (scheduler, session pool, recorder, the shared dead-host
table and claims) once the queue is there.  ``relay.tap`` builds it with
:func:`build_deliverer`; the queue is given as a :class:`~relay.interfaces.QueueSource`
(the spool, once open: :mod:`relay.queue.ready`), and the deliverer starts delivering
when it has opened.

Stopping: no new scans; queued jobs are dropped (their recipients stay as they are in
the queue); transactions in progress get ``stop_grace`` seconds, then are cancelled,
and whatever they had finished is recorded; then every write begun is awaited (DSNs
and their records included); the Deferred ``stopService`` returns fires after that.  So
the spool must close only once it has fired, and the channels must stay open until then:
``relay.tap`` adds the spool and the channels first to an
:class:`~relay.runtime.services.OrderedMultiService`, which stops its children one at a time in
reverse order, each awaited (Twisted's ``MultiService`` would start every stop at once).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.config import Config, DeliverSection
from relay.deliver.history import DeliveryHistory
from relay.deliver.recorder import Recorder
from relay.deliver.scheduler import Scheduler
from relay.deliver.sequencer import TEXT_CHUNK
from relay.deliver.session_pool import PoolLimits, SessionPool
from relay.deliver.work import Claims
from relay.interfaces import IChannel, IDeliverer, IQueue, QueueSource
from relay.policy.retry import DeadHosts
from relay.policy.routing import Router

__all__ = ["DelivererService", "build_deliverer"]

_log = Logger()


@implementer(IDeliverer)
class DelivererService(Service):
    """MMDF's deliver for every channel; see the package docstring for how it works."""

    def __init__(
        self,
        queue: QueueSource,
        channels: Mapping[str, IChannel],
        settings: DeliverSection,
        router: Router,
        clock: IReactorTime,
        rng: random.Random,
        *,
        hostname: str,
        postmaster: str,
        channel_limits: Mapping[str, int] | None = None,
        idle_timeout: float = 5.0,
        stop_grace: float = 10.0,
        active_limit: int = 20_000,
        text_chunk: int = TEXT_CHUNK,
        log: Logger | None = None,
    ) -> None:
        for name, channel in channels.items():
            if channel.name != name:
                raise ValueError(f"channel {channel.name!r} registered as {name!r}")
        self.channels = dict(channels)
        self.settings = settings
        self.clock = clock
        self.dead_hosts = DeadHosts(settings.dead_host_delay)
        self.claims = Claims()
        self.history = DeliveryHistory()  # the last delivery and failure per channel
        self.pool = SessionPool(
            clock,
            self.channels,
            self.dead_hosts,
            PoolLimits(
                initial_per_destination=settings.initial_destination_concurrency,
                per_destination=settings.concurrency_per_destination,
                total=settings.concurrency_total,
                per_channel=dict(channel_limits or {}),
                idle_timeout=idle_timeout,
            ),
            log=log,
        )
        self._source = queue
        self._router = router
        self._rng = rng
        self._hostname = hostname
        self._postmaster = postmaster
        self._stop_grace = stop_grace
        self._active_limit = active_limit
        self._text_chunk = text_chunk
        self._log = log if log is not None else _log
        self.queue: IQueue | None = None
        self.recorder: Recorder | None = None
        self.scheduler: Scheduler | None = None

    @property
    def busy(self) -> bool:
        """Whether any message is being delivered (or waits for a session) right now."""
        return len(self.claims) > 0

    def _attach(self, queue: IQueue) -> None:
        self.queue = queue

        def make_recorder(scheduler: Scheduler) -> Recorder:
            return Recorder(
                queue,
                self.clock,
                self.settings,
                self._rng,
                self.claims,
                hostname=self._hostname,
                postmaster=self._postmaster,
                on_work_done=scheduler.work_done,
                on_released=scheduler.wake,
                log=self._log,
                history=self.history,
            )

        self.scheduler = Scheduler(
            queue,
            self.channels,
            self._router,
            self.pool,
            make_recorder,
            self.claims,
            self.dead_hosts,
            self.clock,
            recipients_per_transaction=self.settings.recipients_per_transaction,
            active_limit=self._active_limit,
            text_chunk=self._text_chunk,
            log=self._log,
        )
        self.recorder = self.scheduler.recorder

    # --- IService -------------------------------------------------------------------------

    def startService(self) -> None:
        """Start scanning the queue (once it is open)."""
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()
        ready = self._source.when_ready()
        ready.addCallback(self._opened)
        ready.addErrback(lambda f: self._log.failure("deliver: no queue to deliver from", f))

    def _opened(self, queue: IQueue) -> None:
        if not self.running:
            return
        if self.scheduler is None:
            self._attach(queue)
        assert self.scheduler is not None
        self.scheduler.start()

    def stopService(self) -> Deferred[None]:
        """Stop scanning; let transactions finish (``stop_grace``), record what they did."""
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        await self.pool.stop(self._stop_grace)
        if self.recorder is not None:
            await self.recorder.drain()

    # --- IDeliverer -----------------------------------------------------------------------

    def wake(self) -> None:
        """New mail arrived or something fell due: look at the queue soon."""
        if self.scheduler is not None:
            self.scheduler.wake()

    def flush(
        self, queue_ids: Iterable[str] | None = None, channel: str | None = None
    ) -> Deferred[int]:
        """Revive the matching resting destinations and make their deferred mail due now."""
        if self.queue is None or self.scheduler is None:
            return defer.fail(RuntimeError("the deliverer has no queue yet"))
        ids = None if queue_ids is None else list(queue_ids)
        return ensureDeferred(self._flush(self.queue, self.scheduler, ids, channel))

    async def _flush(
        self, queue: IQueue, scheduler: Scheduler, ids: list[str] | None, channel: str | None
    ) -> int:
        await scheduler.revive_matching(channel, ids)
        count: int = await queue.flush(ids, channel)
        scheduler.wake()
        return count


def build_deliverer(
    config: Config,
    queue: QueueSource,
    channels: Mapping[str, IChannel],
    reactor: IReactorTime,
    rng: random.Random | None = None,
    *,
    channel_limits: Mapping[str, int] | None = None,
    idle_timeout: float = 5.0,
    stop_grace: float = 10.0,
    active_limit: int = 20_000,
    log: Logger | None = None,
    router: Router | None = None,
) -> DelivererService:
    """The deliverer for ``config``, delivering from ``queue`` through ``channels``.

    ``channels`` maps each running channel's name to it (routes to other channels fail);
    ``reactor`` gives the time and timers; ``rng`` the retry jitter (seeded from the
    system if None).  ``channel_limits`` caps the sessions of some channels;
    ``idle_timeout`` is how long an idle session stays open; ``stop_grace`` how long a
    stop waits for transactions in progress; ``active_limit`` how many messages are
    worked on at once.
    """
    if router is None:
        router = Router(config, channels=frozenset(channels))
    return DelivererService(
        queue,
        channels,
        config.deliver,
        router,
        reactor,
        rng if rng is not None else random.Random(),
        hostname=config.relay.hostname,
        postmaster=config.relay.postmaster,
        channel_limits=channel_limits,
        idle_timeout=idle_timeout,
        stop_grace=stop_grace,
        active_limit=active_limit,
        log=log,
    )

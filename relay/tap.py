"""``twistd relay``: build the relay's service tree from its configuration.

This is the one place that wires classes together.  The tree is an
:class:`~relay.runtime.services.OrderedMultiService` named ``relay`` whose children are the
relay's parts, each a named service (``status``, ``spool``, ``channels``, ``deliverer``,
with the phone channel ``phone``, then ``smtp`` with its gateway worker processes under
``workers``, then ``report``, ``pickup`` and, if configured, ``metrics``), so an
operator's ``twistd`` log and a test can find each by name.
They start in that order and stop one after another in the reverse order, each stop
waited for (see :func:`build_service`): a SIGTERM never closes the spool under a
delivery that is still finishing, so what was delivered is recorded and not sent again
after a restart.
Configuration problems are found in ``Options.postOptions``, before anything starts,
and reported all at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from relay import __version__
from relay.channels.local import LocalChannel, build_local_channel
from relay.channels.local.users import LocalRecipients, build_local_recipients
from relay.channels.phone.service import build_phone, build_phone_channel
from relay.channels.smtp.channel import SmtpChannel, build_smtp_channel
from relay.config import Config, ConfigError, default_config, load_config
from relay.deliver.service import build_deliverer
from relay.gateway.build import build_smtp
from relay.gateway.service import Gateway
from relay.interfaces import IChannel
from relay.maildrop.pickup import build_pickup
from relay.metrics.service import build_metrics
from relay.policy.routing import Router
from relay.preflight import PreflightError, advise, preflight
from relay.queue.ready import QueueReady
from relay.queue.service import SpoolService
from relay.queue.store import SpoolQueue
from relay.report import DaemonReport
from relay.runtime.services import attach, named_multiservice

_log = Logger()

__all__ = ["Options", "StatusService", "build_service", "config_for_twistd", "makeService"]


class Options(usage.Options):
    """Command-line options of ``twistd relay``."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mail relay: SMTP listeners, the deliverer, the channels and the phone "
        "call scheduler.  Without --config, the embedded default runs (`relay config "
        "--default` prints it; its spool and mailboxes are under the current directory)."
    )
    optParameters = [
        ["config", "c", None, "configuration file (TOML); default: the embedded default"],
    ]

    config: Config
    local_recipients: LocalRecipients

    def postOptions(self) -> None:
        """Load and validate the configuration (and aliases) now, before anything starts."""
        self.config = config_for_twistd(self["config"])
        self.local_recipients = local_recipients_for_twistd(self.config)


def config_for_twistd(path: str | None) -> Config:
    """The configuration at ``path`` (or the default); every problem as a UsageError."""
    try:
        return default_config() if path is None else load_config(Path(path))
    except ConfigError as e:
        where = path if path is not None else "<default>"
        lines = (p if p.startswith(f"{where}:") else f"{where}: {p}" for p in e.problems)
        raise usage.UsageError("\n".join(lines)) from e


def local_recipients_for_twistd(config: Config) -> LocalRecipients:
    """The local users and aliases, after the preflight checks; problems as a UsageError.

    What only ``relay check-config`` refuses (a postmaster nobody receives) is logged as a
    warning: the relay runs, but the operator should hear of it.
    """
    try:
        recipients = preflight(config)
    except PreflightError as e:
        raise usage.UsageError("\n".join(e.problems)) from e
    for problem in advise(config, recipients).problems:
        _log.warn("configuration: {problem}", problem=problem)
    return recipients


class StatusService(Service):
    """Logs what is starting and that it stopped: the operator's first line of the log."""

    log = Logger()

    def __init__(self, config: Config) -> None:
        self.config = config

    def startService(self) -> None:
        """Log the configuration summary."""
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "relay {version} running: {summary}",
            version=__version__,
            summary=self.config.summary(),
        )

    def stopService(self) -> None:
        """Log that the relay stopped (the other children have: it was attached first)."""
        self.log.info("relay {version} stopped", version=__version__)
        return super().stopService()  # type: ignore[no-untyped-call,no-any-return]


def build_service(
    config: Config,
    reactor: Any = None,
    *,
    local_recipients: LocalRecipients | None = None,
    smtp_options: Mapping[str, Any] | None = None,
    calls_out: bool = True,
) -> MultiService:
    """The relay's whole service tree for ``config``.

    ``reactor`` is the one every part uses (threads, sockets, time); twistd's global
    reactor when None.  Children start in the order they are attached and stop in the
    reverse order, one at a time, each stop awaited before the next begins:

    0. ``metrics`` (if configured), ``pickup`` and ``report``: the endpoint closes, the
       maildrop's pickup finishes its pass (stores, then removals) and takes no more;
    1. ``smtp``: the gateway worker processes exit once their stores in flight are
       answered, the listeners close, then the sessions still open are ended with 421
       (one waiting for the spool gets the store's answer first), so no new mail comes in;
    1a. ``phone`` (with a phone channel): the answerers and the scheduler stop, so no
        new call begins;
    2. ``deliverer``: no new transactions; those in flight get the deliverer's stop grace
       to finish, and what they did is recorded, DSNs and forwarded copies included;
    3. ``channels``: idle SMTP connections say QUIT, the local channel's threads end;
    4. ``spool``: the queued writes finish and the lock is given up;
    5. ``status`` logs that the relay stopped.

    The SMTP channel takes its settings from
    ``[smtp_client]``; ``smtp_options`` override them (tests and benchmarks use them for
    a ``port``, a ``resolver`` or ``ca_file``).  With ``calls_out`` false the phone
    channel only answers (``twistd relay-slave``): no site is called.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if local_recipients is None:
        local_recipients = build_local_recipients(config)
    # Everything is built first, each part given its collaborators in its constructor,
    # then attached in the order the tree starts; nothing is patched after it is built.
    # The queue, once open, is one QueueReady that the spool settles and every other
    # part waits on.
    ready: QueueReady[SpoolQueue] = QueueReady()
    ready.when_ready().addErrback(_stop_without_spool, reactor)
    local = build_local_channel(config, ready, reactor, recipients=local_recipients)
    # One router for the gateway's RCPT checks, the deliverer and the SMTP channel, built
    # with the channels that run: none of them can disagree about where mail goes.
    with_phone = bool(config.phone.sites)
    running = {"local", "smtp"} | ({"phone"} if with_phone else set())
    router = Router(config, channels=frozenset(running))
    smtp = build_smtp_channel(
        config, reactor, **{"route": router.route, **dict(smtp_options or {})}
    )
    channels: dict[str, IChannel] = {"local": local, "smtp": smtp}
    phone_channel = build_phone_channel(config) if with_phone else None
    if phone_channel is not None:
        channels["phone"] = phone_channel
    deliverer = build_deliverer(config, ready, channels, reactor, router=router)
    phone = None
    if phone_channel is not None:
        phone = build_phone(
            config, ready, phone_channel, deliverer, router, local_recipients, reactor
        )
    report = DaemonReport(
        reactor, deliverer.history, phone.site_report if phone is not None else None
    )
    spool = SpoolService(
        config.relay.spool,
        reactor,
        ready=ready,
        flusher=deliverer.flush,
        reporter=report.report,
        caller=phone.call_now if phone is not None else None,
    )
    top = named_multiservice("relay")
    attach(StatusService(config), top, "status")
    attach(spool, top, "spool")
    attach(ChannelsService(local, smtp), top, "channels")
    attach(deliverer, top, "deliverer")
    if phone is not None:
        # After the deliverer: it stops first, and a call's last settlements still find
        # the deliverer's recorder running.
        attach(phone.service(config, reactor, answer=True, call_out=calls_out), top, "phone")
    gateway = build_smtp(config, ready, local_recipients, reactor, router=router, busy=deliverer)
    attach(gateway, top, "smtp")
    _attach_operator_services(top, config, reactor, spool, report, router, gateway)
    return top


def _attach_operator_services(
    top: MultiService,
    config: Config,
    reactor: Any,
    spool: SpoolService,
    report: DaemonReport,
    router: Router,
    gateway: Gateway,
) -> None:
    """``relay status``'s report, the maildrop's pickup (``relay sendmail``), and the
    Prometheus endpoint if ``[metrics] listen`` is set.

    Attached last, so they start once the rest is built and stop first: no new mail is
    picked up while the relay shuts down.
    """
    attach(report, top, "report")
    attach(build_pickup(config, spool.ready, reactor, router.route), top, "pickup")
    if config.metrics.listen is not None:
        attach(build_metrics(config.metrics.listen, reactor, spool, gateway), top, "metrics")


class ChannelsService(Service):
    """Owns the channels' resources: closes them once the deliverer has stopped."""

    def __init__(self, local: LocalChannel, smtp: SmtpChannel) -> None:
        self.local = local
        self.smtp = smtp

    def stopService(self) -> Deferred[None]:
        """QUIT idle SMTP connections and stop the local channel's threads; fire when done."""
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        local = self.local.close()
        try:
            await self.smtp.close_idle()
        finally:
            await local


def _stop_without_spool(failure: Failure, reactor: Any) -> None:
    """A relay that cannot open its spool must not pretend to run: stop the reactor."""
    _log.critical(
        "relay cannot run without its spool: {reason}; stopping",
        reason=failure.getErrorMessage(),
    )
    reactor.callWhenRunning(reactor.stop)


def makeService(options: Options) -> IService:
    """twistd's entry point: the service tree for the loaded configuration."""
    return build_service(options.config, local_recipients=options.local_recipients)

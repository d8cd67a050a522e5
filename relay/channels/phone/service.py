"""Building the phone channel for a relay: the store, the calls, the scheduler, the answerers.

:func:`build_phone` makes the parts from ``[phone]`` once, for :mod:`relay.tap` (the
whole relay, or answering only for ``twistd relay-slave``).  The parts would depend on
each other in a circle: the deliverer needs the channel, the channel asks the scheduler
for calls, the calls settle through the deliverer's claims and recorder.  The circle is
cut at the channel: :func:`build_phone_channel` makes it first, with nothing but the
sites we call; the deliverer is built with it; then :func:`build_phone` makes the rest
with the deliverer, and the scheduler listens to the channel for mail waiting.
:class:`PhonePart` holds the parts; :meth:`PhonePart.service` is their service tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relay.address import Address
from relay.channels.phone.calllog import CallLog
from relay.channels.phone.calls import PhoneCalls, StdioAnswerer
from relay.channels.phone.channel import PhoneChannel
from relay.channels.phone.forgetting import IdForgetting, remember_for
from relay.channels.phone.inbox import SpoolInbox
from relay.channels.phone.outbox import Deliverer, SpoolOutbox
from relay.channels.phone.scheduler import CallScheduler
from relay.channels.phone.store import SpoolPhoneStore
from relay.config import Config, StdioTransport, TcpTransport, Transport
from relay.interfaces import ILocalRecipients, QueueSource
from relay.policy.acceptance import RelayPolicy
from relay.policy.call_schedule import CallPolicy
from relay.policy.routing import Router
from relay.runtime.services import attach, named_multiservice

__all__ = ["LINKS_DIR", "PhonePart", "build_phone", "build_phone_channel", "read_secrets"]

LINKS_DIR = Path("phone") / "links"
"""Where, under the spool, the link keeps each site's remembered ids and partial texts."""

_log = Logger()


def read_secrets(config: Config) -> dict[str, bytes]:
    """Each site's shared secret (the file's content without its final line end)."""
    return {
        name: site.secret_file.read_bytes().rstrip(b"\r\n")
        for name, site in config.phone.sites.items()
    }


def call_policy(config: Config, site: str) -> CallPolicy:
    """A site's calling policy from its section and ``[deliver]``'s retry settings."""
    s = config.phone.sites[site]
    return CallPolicy(
        poll=s.poll,
        poll_times=s.poll_times,
        call_window=s.call_window,
        gather_delay=s.gather_delay,
        retry_min=config.deliver.retry_min,
        retry_max=config.deliver.retry_max,
    )


@dataclass
class PhonePart:
    """The phone channel's pieces for one relay."""

    channel: PhoneChannel
    calls: PhoneCalls
    scheduler: CallScheduler
    inbox: SpoolInbox
    outbox: SpoolOutbox
    queue: QueueSource

    def site_report(self) -> dict[str, Any]:
        """``relay status``'s ``phone_sites``: per site, its last call and the next."""
        report: dict[str, Any] = {}
        for name in sorted(self.calls.sites):
            last = self.calls.last.get(name)
            entry: dict[str, Any] = {
                "calls_out": name in self.scheduler.states,
                "last_call": None if last is None else last.to_dict(),
            }
            if name in self.scheduler.states:
                entry["next_call"] = self.scheduler.next_call_time(name)
                entry["down"] = self.scheduler.is_down(name)
                entry["failures"] = self.scheduler.states[name].failures
            report[name] = entry
        return report

    def call_now(self, site: str) -> Deferred[dict[str, Any]]:
        """``relay call SITE``: fire with the record of the call once it ended (KeyError
        for a site this relay does not call)."""
        if site not in self.scheduler.states:
            raise KeyError(site)
        return self.calls.call(site).addCallback(lambda record: record.to_dict())

    def service(
        self, config: Config, reactor: Any, *, answer: bool, call_out: bool
    ) -> MultiService:
        """The ``phone`` service: recovery at start, forgetting old ids, the answerers
        and the scheduler."""
        top = named_multiservice("phone")
        attach(_Recovery(self.inbox, self.queue), top, "recovery")
        keep = remember_for(config.deliver.give_up_after)
        attach(IdForgetting(self.inbox.forget, keep, reactor), top, "forgetting")
        if answer and config.phone.answer:
            answer_on = [_answer_description(t) for t in config.phone.answer]
            attach(self.calls.answering(answer_on), top, "answer")
            if any(isinstance(t, StdioTransport) for t in config.phone.answer):
                attach(StdioAnswerer(self.calls, reactor, self.queue), top, "stdio")
        if call_out:
            attach(self.scheduler, top, "scheduler")
        return top


def build_phone_channel(config: Config) -> PhoneChannel:
    """The channel the deliverer hands phone mail to: built first (see the module docstring)."""
    return PhoneChannel(_calling(config))


def _calling(config: Config) -> frozenset[str]:
    """The sites this relay calls (those with a transport); the others call in."""
    return frozenset(
        name for name, site in config.phone.sites.items() if site.transport is not None
    )


def build_phone(
    config: Config,
    queue: QueueSource,
    channel: PhoneChannel,
    deliverer: Deliverer,
    router: Router,
    local_recipients: ILocalRecipients,
    reactor: Any,
) -> PhonePart:
    """The phone channel's parts around ``channel``: a call's mail comes from ``queue``
    (once open) through ``deliverer``'s claims and recorder, and mail a site brings is
    answered as the gateway would (``router``, ``local_recipients``)."""
    policy = RelayPolicy(config, local_recipients, router)

    def decide(address: Address) -> Any:
        return policy.decide_recipient(address, may_relay=True).reply

    spool = Path(config.relay.spool)
    outbox = SpoolOutbox(queue, deliverer, router.route)
    inbox = SpoolInbox(
        spool / LINKS_DIR,
        queue,
        decide,
        reactor,
        hostname=config.relay.hostname,
        max_message_size=lambda site: _site_limit(config, site),
    )
    store = SpoolPhoneStore(outbox, inbox)
    calls = PhoneCalls(
        config.phone.name,
        config.phone.sites,
        read_secrets(config),
        store,
        CallLog(spool, reactor),
        reactor,
        modem_init=config.phone.modem_init,
        lock_dir=config.phone.lock_dir,
        handshake_timeout=config.phone.handshake_timeout,
    )
    policies = {name: call_policy(config, name) for name in sorted(_calling(config))}
    scheduler = CallScheduler(policies, calls.call, reactor)
    calls.add_listener(scheduler.call_ended)
    channel.add_listener(scheduler.mail_waiting)
    return PhonePart(channel, calls, scheduler, inbox, outbox, queue)


def _site_limit(config: Config, site: str) -> int | None:
    found = config.phone.sites.get(site)
    if found is not None and found.max_message_size is not None:
        return found.max_message_size
    return config.smtp.max_message_size


def _answer_description(transport: Transport) -> str:
    """An ``answer`` entry as :mod:`relay.transport` reads it (Twisted's server syntax
    for TCP: ``tcp:PORT:interface=ADDRESS``)."""
    if isinstance(transport, TcpTransport):
        interface = transport.host.replace(":", "\\:")
        return f"tcp:{transport.port}" + (f":interface={interface}" if interface else "")
    return str(transport)


class _Recovery(Service):
    """At start: store what a crash left between the link's commit and the queue; at
    stop: cancel the stores waiting to be tried again (the next start recovers them)."""

    def __init__(self, inbox: SpoolInbox, queue: QueueSource) -> None:
        self._inbox = inbox
        self._queue = queue

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        d = self._queue.when_ready().addCallback(lambda _: self._inbox.recover())
        d.addCallback(_recovered)
        d.addErrback(lambda f: _log.failure("phone: recovery failed", f))

    def stopService(self) -> Any:
        self._inbox.stop_retries()
        return super().stopService()  # type: ignore[no-untyped-call]


def _recovered(count: int) -> None:
    if count:
        _log.info("phone: {count} messages recovered", count=count)

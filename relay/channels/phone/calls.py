"""Placing and answering calls: the link's driver on a transport, with the relay's store.

:class:`PhoneCalls` makes a :class:`~relay.phone.driver.PhoneProtocol` for each call,
either end, over the relay's :class:`~relay.channels.phone.store.SpoolPhoneStore`:

* **placing** (:meth:`PhoneCalls.call`): connect to the site's transport (TCP through a
  client endpoint, a serial device through Twisted's ``SerialPort``), the call bounded
  by the site's ``max_call_time``; one call at a time per serial port (and per site);
* **answering**: :meth:`PhoneCalls.answer_protocol` for a listener (TCP, stdio), and
  :class:`SerialAnswerer`, which opens a serial device, answers one call, and opens it
  again for the next, for as long as the service runs.

When a call ends, whatever the link did not settle stays queued
(:meth:`~relay.channels.phone.outbox.SpoolOutbox.release`), the call gets one log line
and a :class:`~relay.channels.phone.calllog.CallRecord` in the call log and the metrics,
and the listeners given to :meth:`PhoneCalls.add_listener` hear of it (the scheduler's
backoff, the deliverer's flush).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.channels.phone.calllog import CallLog, CallRecord
from relay.channels.phone.store import SpoolPhoneStore
from relay.config import PhoneSite, SerialTransport, TcpTransport
from relay.metrics.series import PHONE_CALL_BYTES, PHONE_CALLS
from relay.oneline import escape
from relay.phone.driver import PhoneProtocol, session_factory
from relay.sansio.phone.link import Link, LinkParams
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import SessionOptions

__all__ = ["CallProtocol", "PhoneCalls", "SerialAnswerer", "StdioAnswerer"]

_log = Logger()
REOPEN_DELAY: Final = 1.0
"""Seconds an answering serial line rests between one call and opening for the next."""


class CallProtocol(PhoneProtocol):
    """The link's driver, telling when its transport closed (an answering line reopens
    then, not before: the port must be free)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)


def _new_link(now: float) -> tuple[Link, LinkParams]:
    params = LinkParams()
    return Link(params, now), params


class PhoneCalls:
    """Runs calls for one relay (see the module docstring)."""

    def __init__(
        self,
        local_name: str,
        sites: Mapping[str, PhoneSite],
        secrets: Mapping[str, bytes],
        store: SpoolPhoneStore,
        call_log: CallLog,
        reactor: Any,
    ) -> None:
        self.local_name = local_name
        self.sites = sites
        self._secrets = dict(secrets)
        self.store = store
        self._call_log = call_log
        self._reactor = reactor
        self._ports: dict[str, DeferredLock] = {}
        self._listeners: list[Callable[[CallRecord], object]] = []
        self.active: dict[str, Deferred[CallRecord]] = {}
        self.last: dict[str, CallRecord] = {}  # the last call of each site, since start

    def add_listener(self, listener: Callable[[CallRecord], object]) -> None:
        """Call ``listener(record)`` at the end of every call, either direction."""
        self._listeners.append(listener)

    # --- placing ----------------------------------------------------------------------------

    def call(self, site: str) -> Deferred[CallRecord]:
        """Call ``site`` now (once its port is free); fire with the call's record.

        A call to a site already in a call shares that call's result."""
        running = self.active.get(site)
        if running is not None:
            shared: Deferred[CallRecord] = Deferred()
            _share(running, shared)
            return shared
        d = ensureDeferred(self._call(self.sites[site]))
        self.active[site] = d

        def forget(result: object) -> object:
            if self.active.get(site) is d:
                del self.active[site]
            return result

        d.addBoth(forget)
        return d

    async def _call(self, site: PhoneSite) -> CallRecord:
        transport = site.transport
        if transport is None:
            raise ValueError(f"site {site.name} only calls in")
        lock = self._ports.setdefault(_port_key(transport), DeferredLock())
        await lock.acquire()
        start = self._reactor.seconds()
        try:
            protocol = self._protocol(Role.CALLER, site)
            try:
                await self._connect(protocol, transport)
            except Exception as e:
                record = CallRecord(
                    site.name,
                    "out",
                    start,
                    self._reactor.seconds() - start,
                    "no-connection",
                    escape(str(e)),
                )
            else:
                record = await self._run(protocol, "out", start, site.max_call_time)
        finally:
            lock.release()
        self._ended(record, site.name)
        return record

    async def _connect(
        self, protocol: PhoneProtocol, transport: SerialTransport | TcpTransport
    ) -> None:
        if isinstance(transport, TcpTransport):
            endpoint = HostnameEndpoint(self._reactor, transport.host, transport.port, timeout=30)
            await connectProtocol(endpoint, protocol)  # type: ignore[no-untyped-call]
        else:
            from twisted.internet.serialport import SerialPort

            SerialPort(  # type: ignore[no-untyped-call]
                protocol, transport.device, self._reactor, baudrate=transport.baudrate
            )

    def _protocol(
        self, role: Role, site: PhoneSite | None, line_rate: int | None = None
    ) -> CallProtocol:
        rate = line_rate
        if site is not None and isinstance(site.transport, SerialTransport):
            rate = site.transport.baudrate
        options = SessionOptions(
            max_message_size=(
                site.max_message_size if site and site.max_message_size else 64 << 20
            ),
            compression=site.compression if site else True,
            encryption=site.encryption if site else False,
            line_rate=rate,
        )
        factory = session_factory(
            role=role,
            local_name=self.local_name,
            secrets=self._secrets,
            new_link=_new_link,
            peer_name=site.name if role is Role.CALLER and site else None,
            options=options,
        )
        return CallProtocol(factory, self.store, self._reactor)

    async def _run(
        self, protocol: PhoneProtocol, direction: str, start: float, limit: float
    ) -> CallRecord:
        timer: IDelayedCall = self._reactor.callLater(limit, _hang_up, protocol)
        try:
            summary = await protocol.ended
        finally:
            if timer.active():
                timer.cancel()
        return CallRecord.from_summary(direction, start, summary)

    # --- answering --------------------------------------------------------------------------

    def answer_protocol(self, *, line_rate: int | None = None) -> CallProtocol:
        """A protocol that answers one call (for a listener's factory, or stdio)."""
        protocol = self._protocol(Role.ANSWERER, None, line_rate)
        start = self._reactor.seconds()
        limit = max((s.max_call_time for s in self.sites.values()), default=3600.0)
        timer: IDelayedCall = self._reactor.callLater(limit, _hang_up, protocol)

        def ended(summary: Any) -> None:
            if timer.active():
                timer.cancel()
            if summary.peer or summary.wire_bytes_received:
                record = CallRecord.from_summary("in", start, summary)
                self._ended(record, summary.peer)

        protocol.ended.addCallback(ended)
        protocol.ended.addErrback(lambda f: _log.failure("phone: answering failed", f))
        return protocol

    # --- the end of a call -------------------------------------------------------------------

    def _ended(self, record: CallRecord, site: str | None) -> None:
        self.last[record.site] = record
        if site:
            kept = self.store.outbox.release(site)
            if kept:
                _log.info("phone: {count} messages for {site} stay queued", count=kept, site=site)
        _log.info(
            "phone: site={site} direction={direction} result={result} duration={seconds:.1f}s "
            "sent={sent}/{bytes_sent}B received={received}/{bytes_received}B "
            "efficiency={efficiency} resent={resent}{reason}",
            site=escape(record.site),
            direction=record.direction,
            result=record.result,
            seconds=record.seconds,
            sent=record.messages_sent,
            bytes_sent=record.bytes_sent,
            received=record.messages_received,
            bytes_received=record.bytes_received,
            efficiency="-" if record.efficiency is None else f"{record.efficiency:.3f}",
            resent=record.frames_resent,
            reason=f" ({escape(record.reason)})" if record.reason else "",
        )
        PHONE_CALLS.labels(record.site, record.result).inc()
        PHONE_CALL_BYTES.labels(record.site, "sent").inc(record.bytes_sent)
        PHONE_CALL_BYTES.labels(record.site, "received").inc(record.bytes_received)
        self._call_log.append(record).addErrback(
            lambda f: _log.failure("phone: cannot write the call log", f)
        )
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                _log.failure("phone: a call listener failed")


def _share(running: Deferred[CallRecord], shared: Deferred[CallRecord]) -> None:
    """Fire ``shared`` with ``running``'s result, leaving ``running``'s chain as it was."""

    def copy(result: Any) -> Any:
        if isinstance(result, Failure):
            shared.errback(result)
        else:
            shared.callback(result)
        return result

    running.addBoth(copy)


def _hang_up(protocol: PhoneProtocol) -> None:
    """``max_call_time`` is over: drop the line (what was not settled stays queued)."""
    _log.warn("phone: call over its time limit; hanging up")
    if protocol.transport is not None:
        protocol.transport.loseConnection()


def _port_key(transport: SerialTransport | TcpTransport) -> str:
    """Calls sharing a key are made one at a time: a serial device, a TCP peer."""
    return transport.device if isinstance(transport, SerialTransport) else str(transport)


class SerialAnswerer(Service):
    """Answers calls on a serial device, one after another, while running."""

    def __init__(self, calls: PhoneCalls, transport: SerialTransport, reactor: Any) -> None:
        self._calls = calls
        self._transport = transport
        self._reactor = reactor
        self._port: Any = None
        self._reopen: IDelayedCall | None = None
        self.calls_answered = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._open()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._reopen is not None and self._reopen.active():
            self._reopen.cancel()
        if self._port is not None:
            self._port.loseConnection()

    def _open(self) -> None:
        self._reopen = None
        if not self.running:
            return
        from twisted.internet.serialport import SerialPort

        protocol = self._calls.answer_protocol(line_rate=self._transport.baudrate)

        def closed(_: object) -> None:
            self._port = None
            self.calls_answered += 1
            if self.running:
                self._reopen = self._reactor.callLater(REOPEN_DELAY, self._open)

        protocol.closed.addCallback(closed)
        try:
            self._port = SerialPort(  # type: ignore[no-untyped-call]
                protocol, self._transport.device, self._reactor, baudrate=self._transport.baudrate
            )
        except Exception as e:
            _log.warn(
                "phone: cannot open {device}: {error}; trying again",
                device=escape(self._transport.device),
                error=escape(str(e)),
            )
            self._reopen = self._reactor.callLater(REOPEN_DELAY * 5, self._open)


class StdioAnswerer(Service):
    """Answers one call on standard input and output (the login shell of a calling
    site's account), then stops the reactor: the call is the process's whole life."""

    def __init__(
        self, calls: PhoneCalls, reactor: Any, when_ready: Callable[[], Deferred[Any]]
    ) -> None:
        self._calls = calls
        self._reactor = reactor
        self._when_ready = when_ready
        self.protocol: CallProtocol | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._when_ready().addCallbacks(self._answer, self._cannot)

    def _answer(self, _: object) -> None:
        from twisted.internet.stdio import StandardIO

        protocol = self.protocol = self._calls.answer_protocol()
        protocol.closed.addCallback(lambda _: self._reactor.callLater(0, self._reactor.stop))
        StandardIO(protocol, reactor=self._reactor)  # type: ignore[no-untyped-call]

    def _cannot(self, failure: Failure) -> None:
        _log.error("phone: cannot answer on stdio: {reason}", reason=failure.getErrorMessage())
        self._reactor.callLater(0, self._reactor.stop)

"""Placing and answering calls: the link's driver on a transport, with the relay's store.

:class:`PhoneCalls` makes a :class:`~relay.phone.driver.PhoneProtocol` for each call,
either end, over the relay's :class:`~relay.channels.phone.store.SpoolPhoneStore`:

* **placing** (:meth:`PhoneCalls.call`): open the site's transport through
  :mod:`relay.transport` (a locked serial device, a Hayes modem that dials, a login
  chat, or TCP; never blocking), then run the call, bounded by the site's
  ``max_call_time``; one call at a time per serial port (and per site);
* **answering**: :meth:`PhoneCalls.answering` on every ``[phone] answer`` entry (serial
  devices re-opened after each call, TCP listeners), :class:`StdioAnswerer` for
  ``relay slave --stdio``; each call gets a fresh :meth:`PhoneCalls.answer_protocol`.

Each call has its own view of the store (:meth:`SpoolPhoneStore.for_call`), so calls
with one site at once (it calls in while we call it) keep their offers apart.  When a
call ends, whatever it offered and the link did not settle stays queued
(:meth:`~relay.channels.phone.outbox.SpoolOutbox.release`), the call gets one log line
and a :class:`~relay.channels.phone.calllog.CallRecord` in the call log and the metrics,
and the listeners given to :meth:`PhoneCalls.add_listener` hear of it (the scheduler's
backoff, the deliverer's flush).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.channels.phone.calllog import CallLog, CallRecord
from relay.channels.phone.store import SpoolPhoneStore
from relay.config import PhoneSite, SerialTransport, TcpTransport, field_default
from relay.instruments.series import PHONE_CALL_BYTES, PHONE_CALLS
from relay.interfaces import QueueSource
from relay.oneline import escape
from relay.phone.driver import PhoneProtocol, session_factory
from relay.runtime.services import attach, named_multiservice
from relay.sansio.phone import defaults as phone_defaults
from relay.sansio.phone.accounting import CallSummary
from relay.sansio.phone.link import Link, LinkParams
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import SessionOptions
from relay.transport import (
    DEFAULT_LOCK_DIR,
    CallFailed,
    ChatError,
    TransportError,
    answering_service,
    client_endpoint,
    dial_plan,
    is_serial,
    is_stdio,
    parse_serial,
    place_call,
    serve_stdio,
)

__all__ = ["CallProtocol", "PhoneCalls", "StdioAnswerer"]

_log = Logger()
_MAX_CALL_TIME: float = field_default(PhoneSite, "max_call_time")


class CallProtocol(PhoneProtocol):
    """The link's driver, bounded by a time limit from the moment it has the line, and
    telling when its transport closed."""

    def __init__(
        self,
        new_session: Any,
        store: SpoolPhoneStore,
        clock: Any,
        *,
        time_limit: float,
    ) -> None:
        super().__init__(new_session, store, clock)
        self.call_store = store
        self._time_limit = time_limit
        self._limit_timer: IDelayedCall | None = None
        self.started: float | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        clock: Any = self._clock
        self.started = clock.seconds()
        self._limit_timer = clock.callLater(self._time_limit, self._over_time)
        super().connectionMade()

    def _over_time(self) -> None:
        """``max_call_time`` is over: drop the line (what is not settled stays queued)."""
        self._limit_timer = None
        _log.warn(
            "phone: call over its time limit of {limit:.0f} s; hanging up", limit=self._time_limit
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._limit_timer is not None and self._limit_timer.active():
            self._limit_timer.cancel()
        self._limit_timer = None
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
        *,
        modem_init: Sequence[str] | None = None,
        lock_dir: Path = DEFAULT_LOCK_DIR,
        handshake_timeout: float = phone_defaults.HANDSHAKE_TIMEOUT,
    ) -> None:
        """``modem_init``: AT commands for modems on serial lines (None: direct lines);
        ``lock_dir``: where serial devices are locked UUCP-style; ``handshake_timeout``:
        how long a peer has to prove itself before the line is dropped."""
        self.local_name = local_name
        self._handshake_timeout = handshake_timeout
        self._modem_init = tuple(modem_init) if modem_init is not None else None
        self._lock_dir = lock_dir
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
                endpoint = client_endpoint(self._reactor, str(transport), self._lock_dir)
                plan = dial_plan(
                    modem_init=self._modem_init or ("ATZ",),
                    dial=site.dial,
                    chat=" ".join(site.chat) or None,
                    substitutions={"L": (site.login or self.local_name).encode()},
                )
                setup = await place_call(endpoint, plan, protocol, self._reactor)
            except (CallFailed, TransportError, ChatError) as e:
                reason = str(e.reply) if isinstance(e, CallFailed) else str(e)
                seconds = self._reactor.seconds() - start
                record = CallRecord(
                    site.name, "out", start, seconds, "no-connection", escape(reason)
                )
            else:
                summary = await protocol.ended
                await setup.closed  # the port is free again (the modem hung up)
                record = CallRecord.from_summary("out", protocol.started or start, summary)
        finally:
            lock.release()
        self._ended(record, site.name, protocol.call_store)
        return record

    def _protocol(
        self, role: Role, site: PhoneSite | None, line_rate: int | None = None
    ) -> CallProtocol:
        rate = line_rate
        if site is not None and isinstance(site.transport, SerialTransport):
            rate = site.transport.baudrate
        options = SessionOptions(
            max_message_size=(
                site.max_message_size
                if site and site.max_message_size
                else phone_defaults.MAX_MESSAGE_SIZE
            ),
            compression=site.compression if site else phone_defaults.COMPRESSION,
            encryption=site.encryption if site else phone_defaults.ENCRYPTION,
            line_rate=rate,
            handshake_timeout=self._handshake_timeout,
        )
        factory = session_factory(
            role=role,
            local_name=self.local_name,
            secrets=self._secrets,
            new_link=_new_link,
            peer_name=site.name if role is Role.CALLER and site else None,
            options=options,
        )
        limit = (
            site.max_call_time
            if site is not None
            else max((s.max_call_time for s in self.sites.values()), default=_MAX_CALL_TIME)
        )
        return CallProtocol(factory, self.store.for_call(), self._reactor, time_limit=limit)

    # --- answering --------------------------------------------------------------------------

    def answer_protocol(self, *, line_rate: int | None = None) -> CallProtocol:
        """A protocol that answers one call (for a listener, a serial line or stdio)."""
        protocol = self._protocol(Role.ANSWERER, None, line_rate)

        def ended(summary: CallSummary) -> None:
            if summary.peer or summary.wire_bytes_received:  # not a line that stayed silent
                start = protocol.started or self._reactor.seconds()
                record = CallRecord.from_summary("in", start, summary)
                self._ended(record, summary.peer, protocol.call_store)

        protocol.ended.addCallback(ended)
        protocol.ended.addErrback(lambda f: _log.failure("phone: answering failed", f))
        return protocol

    def answering(self, answer: Sequence[str]) -> IService:
        """A service answering on each non-stdio ``[phone] answer`` entry, call after call
        (serial lines re-opened after each call, with the modem reset if there is one).

        A call answered on a serial line is told the line's configured ``baudrate`` (the
        summary's efficiency is measured against it); TCP has no line rate, so a call
        answered there has no efficiency."""
        top = named_multiservice("answering")
        for description in answer:
            if is_stdio(description):
                continue
            rate = parse_serial(description).baudrate if is_serial(description) else None
            child = answering_service(
                self._reactor,
                [description],
                partial(self.answer_protocol, line_rate=rate),
                modem_init=self._modem_init,
                lock_dir=self._lock_dir,
            )
            attach(child, top, description)
        return top

    # --- the end of a call -------------------------------------------------------------------

    def _ended(self, record: CallRecord, site: str | None, store: SpoolPhoneStore) -> None:
        self.last[record.site] = record
        if site:
            kept = store.release(site)
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


def _port_key(transport: SerialTransport | TcpTransport) -> str:
    """Calls sharing a key are made one at a time: a serial device, a TCP peer."""
    return transport.device if isinstance(transport, SerialTransport) else str(transport)


class StdioAnswerer(Service):
    """Answers one call on standard input and output (the login shell of a calling
    site's account), then stops the reactor: the call is the process's whole life."""

    def __init__(self, calls: PhoneCalls, reactor: Any, queue: QueueSource) -> None:
        """The call is answered once ``queue`` (the spool) is open."""
        self._calls = calls
        self._reactor = reactor
        self._queue = queue
        self.protocol: CallProtocol | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._queue.when_ready().addCallbacks(self._answer, self._cannot)

    def _answer(self, _: object) -> None:
        protocol = self.protocol = self._calls.answer_protocol()
        setup = serve_stdio(self._reactor, protocol)
        setup.closed.addCallback(lambda _: self._reactor.callLater(0, self._reactor.stop))

    def _cannot(self, failure: Failure) -> None:
        _log.error("phone: cannot answer on stdio: {reason}", reason=failure.getErrorMessage())
        self._reactor.callLater(0, self._reactor.stop)

"""The Twisted driver over real transports: TCP loopback, and a pty through SerialPort."""

from __future__ import annotations

import os
import tty
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.serialport import SerialPort
from twisted.internet.stdio import StandardIO
from twisted.internet.task import deferLater

from relay.phone.driver import PhoneProtocol, session_factory
from relay.phone.filestore import FilePhoneStore
from relay.sansio.phone.accounting import CallOutcome, CallSummary
from relay.sansio.phone.link import Link, LinkParams
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import SessionOptions

from support.phone.session_harness import HUB, SECRET, SITE, envelope


def _new_link(now: float) -> tuple[Link, LinkParams]:
    params = LinkParams()
    return Link(params, now), params


def _protocol(
    role: Role, store: FilePhoneStore, options: SessionOptions | None = None
) -> PhoneProtocol:
    caller = role is Role.CALLER
    factory = session_factory(
        role=role,
        local_name=HUB if caller else SITE,
        secrets={SITE if caller else HUB: SECRET},
        new_link=_new_link,
        peer_name=SITE if caller else None,
        options=options,
    )
    return PhoneProtocol(factory, store, reactor)


async def _queue(
    hub: FilePhoneStore, site: FilePhoneStore
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    to_site = {f"h{i}": os.urandom(3000 + 5000 * i) for i in range(3)}
    to_hub = {
        f"s{i}": b"Subject: pickup %d\r\n\r\n" % i + b"line\r\n" * (200 * (i + 1)) for i in range(2)
    }
    for mid, text in to_site.items():
        await hub.put_outgoing(SITE, mid, envelope(), text)
    for mid, text in to_hub.items():
        await site.put_outgoing(HUB, mid, envelope("<alice@hub.example>"), text)
    return to_site, to_hub


def _check(
    hub: FilePhoneStore,
    site: FilePhoneStore,
    to_site: dict[str, bytes],
    to_hub: dict[str, bytes],
    summaries: list[CallSummary],
) -> None:
    assert {m: t for m, (_, t) in site.received(HUB).items()} == to_site
    assert {m: t for m, (_, t) in hub.received(SITE).items()} == to_hub
    assert hub.pending(SITE) == [] and site.pending(HUB) == []
    for summary in summaries:
        assert summary.outcome is CallOutcome.COMPLETED, summary


async def _call_over_tcp(caller: PhoneProtocol, answerer: PhoneProtocol) -> list[CallSummary]:
    """Run one call over TCP loopback; both ends' summaries."""
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: answerer), interface="127.0.0.1")
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, caller)
        results = await DeferredList([caller.ended, answerer.ended], fireOnOneErrback=True)
    finally:
        await port.stopListening()
    return [summary for _, summary in results]


@pytest_twisted.ensureDeferred
async def test_a_call_over_tcp_loopback_moves_mail_both_ways(tmp_path: Path) -> None:
    """Caller and answerer on TCP loopback, each with a file store, exchange their mail."""
    hub, site = (
        FilePhoneStore(tmp_path / "hub", reactor),
        FilePhoneStore(tmp_path / "site", reactor),
    )
    to_site, to_hub = await _queue(hub, site)
    summaries = await _call_over_tcp(_protocol(Role.CALLER, hub), _protocol(Role.ANSWERER, site))
    _check(hub, site, to_site, to_hub, summaries)
    assert summaries[0].messages_sent == 3 and summaries[0].messages_received == 2


@pytest_twisted.ensureDeferred
async def test_a_call_over_a_pty_through_serialport(tmp_path: Path) -> None:
    """The caller on a raw pty through SerialPort, the answerer on its master side."""
    hub, site = (
        FilePhoneStore(tmp_path / "hub", reactor),
        FilePhoneStore(tmp_path / "site", reactor),
    )
    to_site, to_hub = await _queue(hub, site)
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    device = os.ttyname(slave)
    options = SessionOptions(encryption=True, line_rate=115_200)
    caller = _protocol(Role.CALLER, hub, options)
    answerer = _protocol(Role.ANSWERER, site, options)
    SerialPort(caller, device, reactor, baudrate=115_200)
    os.close(slave)  # SerialPort holds its own descriptor
    StandardIO(answerer, stdin=master, stdout=os.dup(master), reactor=reactor)
    results = await DeferredList([caller.ended, answerer.ended], fireOnOneErrback=True)
    summaries = [summary for _, summary in results]
    _check(hub, site, to_site, to_hub, summaries)


@pytest_twisted.ensureDeferred
async def test_a_wrong_secret_drops_the_line_after_the_delay_and_moves_nothing(
    tmp_path: Path,
) -> None:
    """Over TCP, a caller with a wrong secret: both ends log, wait, hang up; no mail moves."""
    hub, site = (
        FilePhoneStore(tmp_path / "hub", reactor),
        FilePhoneStore(tmp_path / "site", reactor),
    )
    to_site, _ = await _queue(hub, site)
    options = SessionOptions(failure_delay=0.2)
    caller = PhoneProtocol(
        session_factory(
            role=Role.CALLER,
            local_name=HUB,
            secrets={SITE: b"not the secret" * 3},
            new_link=_new_link,
            peer_name=SITE,
            options=options,
        ),
        hub,
        reactor,
    )
    summaries = await _call_over_tcp(caller, _protocol(Role.ANSWERER, site, options))
    for summary in summaries:
        assert summary.outcome is CallOutcome.AUTH_FAILED
        assert summary.messages_sent == summary.messages_received == 0
    assert site.received(HUB) == {} and sorted(hub.pending(SITE)) == sorted(to_site)
    assert caller.transport is None or not caller.transport.connected


class _SlowWrites:
    """A file store whose text writes wait until :meth:`release` (a store slower than
    the line); everything else goes straight to the file store."""

    def __init__(self, store: FilePhoneStore) -> None:
        self._store = store
        self._held: list[tuple[Deferred[None], tuple[str, str, int, bytes]]] = []
        self.holding = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        if not self.holding:
            return self._store.write_text(site, message_id, offset, data)
        d: Deferred[None] = Deferred()
        self._held.append((d, (site, message_id, offset, data)))
        return d

    def release(self) -> None:
        self.holding = False
        held, self._held = self._held, []
        for d, args in held:
            self._store.write_text(*args).chainDeferred(d)


@pytest_twisted.ensureDeferred
async def test_a_store_slower_than_the_line_pauses_reading_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    """With the receiving store's writes held, the answerer stops reading the line once
    its unstored text passes the bound, holds no more than about that, and the call
    completes with every message intact once the store catches up."""
    hub = FilePhoneStore(tmp_path / "hub", reactor)
    site = _SlowWrites(FilePhoneStore(tmp_path / "site", reactor))
    to_site = {f"big{i}": os.urandom(300_000) for i in range(4)}
    for mid, text in to_site.items():
        await hub.put_outgoing(SITE, mid, envelope(), text)
    options = SessionOptions(compression=False)
    caller = _protocol(Role.CALLER, hub, options)
    answerer = _protocol(Role.ANSWERER, site, options)  # type: ignore[arg-type]
    answerer.max_unstored = 64 * 1024
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: answerer), interface="127.0.0.1")
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, caller)
        most = quiet = 0
        for _ in range(2000):  # until the answerer has held still for a while, paused
            await deferLater(reactor, 0.005, lambda: None)
            quiet = quiet + 1 if answerer.reading_paused and answerer.unstored_bytes == most else 0
            most = max(most, answerer.unstored_bytes)
            if quiet >= 40 or most > 4 * answerer.max_unstored:
                break
        # the bound, plus what one read of the socket and the link's window can bring
        assert answerer.reading_paused and most <= answerer.max_unstored + 2 * 65536
        site.release()
        results = await DeferredList([caller.ended, answerer.ended], fireOnOneErrback=True)
    finally:
        await port.stopListening()
    assert not answerer.reading_paused and answerer.unstored_bytes == 0
    assert {m: t for m, (_, t) in site.received(HUB).items()} == to_site
    for _, summary in results:
        assert summary.outcome is CallOutcome.COMPLETED, summary

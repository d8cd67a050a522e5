"""Lines other than the modem's: serial ports opened and locked, DCD, TCP, stdin/stdout."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest_twisted
from twisted.application.internet import ClientService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from relay.transport import (
    CarrierLost,
    LinePlan,
    LockedSerialPort,
    SerialAnswerer,
    SerialEndpoint,
    answer_factory,
    client_endpoint,
    parse_serial,
    place_call,
)
from relay.transport.lock import lock_name

ROOT = Path(__file__).resolve().parent.parent


class Talker(Protocol):
    """Says its piece on connection, keeps what it hears, notes how it ended."""

    def __init__(self, says: bytes = b"") -> None:
        self.says = says
        self.heard = b""
        self.lost: Failure | None = None
        self.ended: Deferred[None] = Deferred()
        self.heard_enough: Deferred[None] = Deferred()
        self.expect = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.says:
            self.transport.write(self.says)

    def dataReceived(self, data: bytes) -> None:
        self.heard += data
        if self.expect and len(self.heard) >= self.expect and not self.heard_enough.called:
            self.heard_enough.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason
        if not self.ended.called:
            self.ended.callback(None)


def _pty_named(device: Path) -> tuple[int, int]:
    """A raw pty whose slave ``device`` names (a symlink, replaced atomically if there)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    replacement = device.with_name(device.name + ".new")
    replacement.symlink_to(os.ttyname(slave))
    replacement.replace(device)
    return master, slave


async def _read_some(fd: int) -> bytes:
    """What a non-blocking descriptor has, waiting on the reactor until something comes."""
    for _ in range(400):
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("nothing to read")


def test_a_missing_device_is_retried_with_exponential_backoff(tmp_path: Path) -> None:
    """An answer device that cannot be opened is tried again after 1, 2, 4 ... s, at most 8."""
    clock = Clock()
    settings = parse_serial(f"serial:{tmp_path / 'no-such-tty'}")
    answerer = SerialAnswerer(
        clock, settings, Talker, lock_dir=tmp_path, reopen_delay=1.0, retry_max=8.0
    )
    answerer.startService()
    delays = []
    for _ in range(6):
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert answerer.opened == 0 and list(tmp_path.iterdir()) == []  # no lock left behind
    answerer.stopService()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_direct_line_is_answered_and_reopened_after_the_far_end_hangs_up(
    tmp_path: Path,
) -> None:
    """A null-modem answerer (no modem) gets the call at once; after EOF it opens the next."""
    device = tmp_path / "ttyNULL"
    master, slave = _pty_named(device)
    calls: list[Talker] = []

    def new_call() -> Talker:
        calls.append(Talker(b"site here"))
        calls[-1].expect = 5
        return calls[-1]

    settings = parse_serial(f"serial:{device}")
    answerer = SerialAnswerer(reactor, settings, new_call, lock_dir=tmp_path, reopen_delay=0.1)
    answerer.startService()
    try:
        assert answerer.opened == 1 and answerer.calls == 1
        assert (tmp_path / lock_name(str(device))).exists()
        os.set_blocking(master, False)
        os.write(master, b"hello")
        await calls[0].heard_enough
        assert calls[0].heard == b"hello"
        assert await _read_some(master) == b"site here"
        os.close(slave)
        os.close(master)  # the far end hangs up: the answerer's device reads EIO
        await calls[0].ended
        assert calls[0].lost is not None
        master, slave = _pty_named(device)  # a new line under the same name, as an emulator's
        while answerer.calls < 2:
            await deferLater(reactor, 0.05, lambda: None)
        os.set_blocking(master, False)
        assert await _read_some(master) == b"site here"
        assert answerer.opened == 2
        os.close(slave)
    finally:
        await answerer.stopService()
    os.close(master)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("LCK..")]


@contextlib.contextmanager
def _port_watching_dcd(lock_dir: Path, talker: Talker) -> Iterator[LockedSerialPort]:
    """A pty opened with carrier=yes through the serial endpoint, ``talker`` on it."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        endpoint = SerialEndpoint(
            reactor, parse_serial(f"serial:{os.ttyname(slave)}:carrier=yes"), lock_dir
        )
        endpoint.connect(answer_factory(lambda: talker, reactor))
        assert endpoint.port is not None
        yield endpoint.port
    finally:
        os.close(master)
        os.close(slave)


def test_a_falling_dcd_ends_the_call_and_releases_the_lock(tmp_path: Path) -> None:
    """With carrier=yes, DCD seen high then low drops the line with CarrierLost."""
    talker = Talker()
    with _port_watching_dcd(tmp_path, talker) as port:
        carrier = iter([True, True, False])
        port.getCD = lambda: next(carrier)  # type: ignore[method-assign]
        port._check_carrier()
        port._check_carrier()
        assert talker.lost is None
        port._check_carrier()
        assert talker.lost is not None and talker.lost.check(CarrierLost)
        assert list(tmp_path.iterdir()) == []


def test_a_pty_without_dcd_stops_watching_and_keeps_the_line(tmp_path: Path) -> None:
    """A pty cannot report DCD: the watch stops, the line stays up (EOF will tell a drop)."""
    talker = Talker()
    with _port_watching_dcd(tmp_path, talker) as port:
        assert port._watch is None
        assert talker.lost is None and port.connected
        port.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_call_over_tcp_is_answered_by_the_listening_factory() -> None:
    """tcp: descriptions are Twisted's: a call placed on one reaches a listener's call."""
    answered: list[Talker] = []

    def new_call() -> Talker:
        answered.append(Talker(b"answerer"))
        answered[-1].expect = 6
        return answered[-1]

    port = reactor.listenTCP(0, answer_factory(new_call, reactor), interface="127.0.0.1")
    try:
        caller = Talker(b"caller")
        caller.expect = 8
        endpoint = client_endpoint(reactor, f"tcp:127.0.0.1:{port.getHost().port}")
        setup = await place_call(endpoint, LinePlan(), caller, reactor)
        await caller.heard_enough
        await answered[0].heard_enough
        assert caller.heard == b"answerer" and answered[0].heard == b"caller"
        assert caller.transport is not None
        caller.transport.loseConnection()
        await setup.closed
        await answered[0].ended
    finally:
        await port.stopListening()


def test_stdio_answers_one_call_as_a_login_shell_would() -> None:
    """serve_stdio runs a call on stdin/stdout; the process ends when the line closes."""
    script = textwrap.dedent(
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Protocol
        from relay.transport import serve_stdio

        class Upper(Protocol):
            def dataReceived(self, data):
                self.transport.write(data.upper())

        setup = serve_stdio(reactor, Upper())
        setup.closed.addCallback(lambda _: reactor.stop())
        reactor.run()
        """
    )
    shell = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(b"login shell\n")
    shell.stdin.flush()
    assert shell.stdout.readline() == b"LOGIN SHELL\n"
    shell.stdin.close()  # the caller hangs up: end of input ends the call and the process
    assert shell.wait(timeout=60) == 0, shell.stderr.read()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_client_service_reconnects_a_serial_line_like_tcp(tmp_path: Path) -> None:
    """ClientService over a SerialEndpoint: the line drops, the device comes back, it reopens."""
    device = tmp_path / "ttyLINK"
    master, slave = _pty_named(device)
    protocols: list[Talker] = []

    def new_protocol() -> Talker:
        protocols.append(Talker(b"up %d" % (len(protocols) + 1)))
        return protocols[-1]

    endpoint = SerialEndpoint(reactor, parse_serial(f"serial:{device}"), tmp_path)
    service = ClientService(
        endpoint, Factory.forProtocol(new_protocol), retryPolicy=lambda attempt: 0.05
    )
    service.startService()
    try:
        await service.whenConnected()
        os.set_blocking(master, False)
        assert await _read_some(master) == b"up 1"
        os.close(slave)
        os.close(master)  # the line drops
        await protocols[0].ended
        master, slave = _pty_named(device)  # and comes back under the same name
        while len(protocols) < 2 or protocols[-1].transport is None:
            await deferLater(reactor, 0.05, lambda: None)
        os.set_blocking(master, False)
        assert await _read_some(master) == b"up 2"
    finally:
        await service.stopService()
        os.close(master)
        os.close(slave)


@pytest_twisted.ensureDeferred
async def test_stopping_an_answerer_whose_line_stopped_draining_does_not_hang(
    tmp_path: Path,
) -> None:
    """Stopping a serial answerer while its far end has stopped reading (bytes stuck in
    the transport's buffer) waits for the drain only ``close_grace`` seconds, then drops
    the line: the stop completes, the call ends, and the device is closed and unlocked."""
    device = tmp_path / "ttyFULL"
    master, slave = _pty_named(device)
    calls: list[Talker] = []

    def new_call() -> Talker:
        calls.append(Talker(b"x" * (1 << 20)))  # far more than the pty holds
        return calls[-1]

    settings = parse_serial(f"serial:{device}")
    answerer = SerialAnswerer(reactor, settings, new_call, lock_dir=tmp_path, close_grace=0.2)
    answerer.startService()
    try:
        assert answerer.opened == 1 and answerer.calls == 1
        port = answerer.setup.transport if answerer.setup is not None else None
        assert isinstance(port, LockedSerialPort)
        await deferLater(reactor, 0.2, lambda: None)  # the pty fills up: nobody reads it
        stopped = answerer.stopService()
        for _ in range(200):
            if stopped.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert stopped.called, "the stop waited for a drain that never comes"
        assert calls[0].ended.called and calls[0].lost is not None
        assert not port.connected and not (tmp_path / lock_name(str(device))).exists()
    finally:
        os.close(slave)
        os.close(master)

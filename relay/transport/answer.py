"""Answering calls, one after another: on serial devices, TCP ports and stdin/stdout.

A serial device is answered by :class:`SerialAnswerer`, a service that keeps one call's
line open at a time: it locks and opens the device, runs the answer side of the line
(with a modem: the init commands, ``RING``, ``ATA``, ``CONNECT``; on a direct line the
call begins at once), hands the line to a fresh call protocol, and when the call ends
or the line drops, closes the device (which drops DTR and hangs the modem up),
re-opens it after a short pause (the modem is reset by its init commands again) and
waits for the next call.  A device that cannot be opened (gone, busy with another
program's lock) is tried again with exponential backoff, so a USB adapter plugged back
in, or an emulator that re-creates its device, is picked up again.  Stopping closes the
line gracefully, but a line that has stopped draining (a far end that no longer reads,
flow control held) would keep the close waiting for ever, and ``twistd`` with it: after
``close_grace`` seconds the line is dropped without its unsent bytes.

A TCP port is answered by a Twisted server endpoint (:func:`answer_factory` gives the
factory); standard input/output by :func:`serve_stdio`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import serial
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.oneline import escape
from relay.sansio.modem import answer_script, hangup_script
from relay.transport.description import SerialSettings, is_serial, parse_serial
from relay.transport.endpoints import server_endpoint
from relay.transport.lock import DEFAULT_LOCK_DIR
from relay.transport.serial import LockedSerialPort, open_serial
from relay.transport.setup import CallFailed, LinePlan, LineSetup

__all__ = [
    "CallFactory",
    "SerialAnswerer",
    "answer_factory",
    "answer_plan",
    "answering_service",
    "serve_stdio",
]

log = Logger()
CallFactory = Callable[[], IProtocol]  # a fresh call protocol (a PhoneProtocol) per call
REOPEN_DELAY: Final = 1.0  # seconds the device stays closed between calls (DTR low)
RETRY_MAX: Final = 60.0  # longest wait between attempts to open a device that fails
CLOSE_GRACE: Final = 5.0  # seconds a stop waits for the line to drain before dropping it


def answer_plan(modem_init: Sequence[str] | None) -> LinePlan:
    """The answer side's plan: with a modem (init given, maybe empty) or a direct line."""
    if modem_init is None:
        return LinePlan()
    return LinePlan.for_modem(answer_script(modem_init), None, hangup_script())


class SerialAnswerer(Service):
    """Answers calls on one serial device, call after call, until stopped."""

    def __init__(
        self,
        reactor: Any,
        settings: SerialSettings,
        new_call: CallFactory,
        *,
        modem_init: Sequence[str] | None = None,
        lock_dir: Path | str = DEFAULT_LOCK_DIR,
        reopen_delay: float = REOPEN_DELAY,
        retry_max: float = RETRY_MAX,
        close_grace: float = CLOSE_GRACE,
    ) -> None:
        self._reactor = reactor
        self._close_grace = close_grace
        self._clock: IReactorTime = reactor
        self.settings = settings
        self._new_call = new_call
        self._plan = answer_plan(modem_init)
        self._lock_dir = Path(lock_dir)
        self._reopen_delay = reopen_delay
        self._retry_max = retry_max
        self._failures = 0
        self._timer: IDelayedCall | None = None
        self.setup: LineSetup | None = None  # the line now open, if any
        self.calls = 0  # calls handed to a call protocol so far
        self.opened = 0  # times the device was opened
        self.name = f"answer {settings.device}"

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._open()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._cancel_timer()
        setup = self.setup
        if setup is None or setup.closed.called:
            return succeed(None)
        if setup.transport is not None:
            setup.transport.loseConnection()
            if not setup.closed.called:
                grace = self._clock.callLater(self._close_grace, self._drop_stuck, setup)
                setup.closed.addBoth(_cancelling, grace)
        return setup.closed

    def _drop_stuck(self, setup: LineSetup) -> None:
        """The line did not drain within the grace: drop it, unsent bytes and all."""
        port = setup.transport
        if not isinstance(port, LockedSerialPort) or not port.connected:
            return
        log.warn(
            "answer: {device} did not drain within {grace:.1f} s of the stop; dropping it",
            device=escape(self.settings.device),
            grace=self._close_grace,
        )
        port.drop(ConnectionAborted("the line did not drain"))

    def _open(self) -> None:
        self._timer = None
        if not self.running:
            return
        setup = LineSetup(self._plan, self._new_call(), self._clock)
        try:
            open_serial(self._reactor, setup, self.settings, self._lock_dir)
        except (OSError, serial.SerialException) as error:
            self._failures += 1
            delay = self._delay()
            log.warn(
                "answer: cannot open {device}: {error}; trying again in {delay:.0f} s",
                device=escape(self.settings.device),
                error=escape(str(error)),
                delay=delay,
            )
            self._timer = self._clock.callLater(delay, self._open)
            return
        self.opened += 1
        self.setup = setup
        setup.handed_over.addCallbacks(self._answered, self._not_answered)
        setup.closed.addCallback(self._closed, setup)

    def _answered(self, setup: LineSetup) -> None:
        self.calls += 1
        self._failures = 0

    def _not_answered(self, failure: Failure) -> None:
        failure.trap(CallFailed)  # type: ignore[no-untyped-call]
        self._failures += 1

    def _closed(self, _: object, setup: LineSetup) -> None:
        if self.setup is setup:
            self.setup = None
        if not self.running:
            return
        delay = self._delay() if self._failures else self._reopen_delay
        log.info(
            "answer: {device} closed; waiting for the next call in {delay:.1f} s",
            device=escape(self.settings.device),
            delay=delay,
        )
        self._timer = self._clock.callLater(delay, self._open)

    def _delay(self) -> float:
        exponent = min(self._failures, 16)
        return float(min(self._retry_max, self._reopen_delay * 2 ** max(exponent - 1, 0)))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _cancelling(result: object, call: IDelayedCall) -> object:
    """Cancel ``call`` if it is still to come; pass ``result`` on."""
    if call.active():
        call.cancel()
    return result


def _ignore_call_failed(failure: Failure) -> None:
    """A call that did not get through is logged by the line already."""
    failure.trap(CallFailed)  # type: ignore[no-untyped-call]


class _AnswerFactory(Factory):
    def __init__(self, new_call: CallFactory, clock: IReactorTime, plan: LinePlan) -> None:
        self._new_call = new_call
        self._clock = clock
        self._plan = plan

    def buildProtocol(self, addr: object) -> LineSetup:
        setup = LineSetup(self._plan, self._new_call(), self._clock)
        setup.handed_over.addErrback(_ignore_call_failed)
        return setup


def answer_factory(
    new_call: CallFactory, clock: IReactorTime, plan: LinePlan | None = None
) -> Factory:
    """A factory for a listening endpoint: each connection is one call."""
    return _AnswerFactory(new_call, clock, plan or LinePlan())


def answering_service(
    reactor: Any,
    descriptions: Sequence[str],
    new_call: CallFactory,
    *,
    modem_init: Sequence[str] | None = None,
    lock_dir: Path | str = DEFAULT_LOCK_DIR,
) -> MultiService:
    """One service answering on every ``[phone] answer`` entry (serial or Twisted string).

    ``modem_init`` applies to the serial entries: None for direct lines (null modem),
    a list of AT commands (each answered OK) where a modem is attached."""
    parent = MultiService()  # type: ignore[no-untyped-call]
    for description in descriptions:
        child: IService
        if is_serial(description):
            child = SerialAnswerer(
                reactor,
                parse_serial(description),
                new_call,
                modem_init=modem_init,
                lock_dir=lock_dir,
            )
        else:
            endpoint = server_endpoint(reactor, description)
            child = StreamServerEndpointService(endpoint, answer_factory(new_call, reactor))  # type: ignore[no-untyped-call]
        child.setServiceParent(parent)  # type: ignore[no-untyped-call]
    return parent


def serve_stdio(reactor: Any, call: IProtocol, plan: LinePlan | None = None) -> LineSetup:
    """Answer one call on standard input/output (the login shell of a calling site).

    The caller stops the process when :attr:`LineSetup.closed` fires."""
    setup = LineSetup(plan or LinePlan(), call, reactor)
    setup.handed_over.addErrback(_ignore_call_failed)
    StandardIO(setup, reactor=reactor)  # type: ignore[no-untyped-call]
    return setup

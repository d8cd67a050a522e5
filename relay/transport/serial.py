"""A serial port as a Twisted transport and as a client endpoint, locked while open.

Twisted's ``SerialPort`` is a transport, not an endpoint; :class:`SerialEndpoint` is the
small endpoint around it, so that code written for endpoints (``ClientService``, a
call that retries) opens a serial line as it would connect over TCP.  Opening takes
the device's UUCP lock first (:mod:`relay.transport.lock`) and releases it when the
port closes.  pyserial opens the device without blocking (``O_NONBLOCK``), so opening
never waits for a carrier.

Carrier loss: a port opened with ``carrier=yes`` polls DCD while open; once it has been
seen high, its fall ends the connection (``CarrierLost``).  Devices without modem
lines (a pseudo-terminal, a USB adapter without DCD) do not support the query; the
port then relies on end of file and EIO, which Twisted's port already turns into a
lost connection, and on the modem's ``NO CARRIER`` (:mod:`relay.transport.setup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import serial
from twisted.internet import abstract
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.serialport import SerialPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.oneline import escape
from relay.transport.description import SerialSettings
from relay.transport.lock import DEFAULT_LOCK_DIR, DeviceLock

__all__ = ["CarrierLost", "LockedSerialPort", "SerialAddress", "SerialEndpoint", "open_serial"]

log = Logger()
CARRIER_POLL: Final = 0.5  # seconds between DCD checks


class CarrierLost(internet_error.ConnectionLost):
    """The modem dropped DCD: the call is gone."""


@implementer(IAddress)
class SerialAddress:
    """The address of a serial connection: its device name."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"SerialAddress({self.device!r})"


class LockedSerialPort(SerialPort):
    """A ``SerialPort`` that holds the device's lock while open and may watch DCD."""

    def __init__(
        self,
        protocol: IProtocol,
        settings: SerialSettings,
        reactor: Any,
        lock: DeviceLock,
    ) -> None:
        self.settings = settings
        self._lock = lock
        self._watch: LoopingCall | None = None
        self._carrier_seen = False
        lock.acquire()
        try:
            super().__init__(protocol, settings.device, reactor, **settings.pyserial_options())  # type: ignore[no-untyped-call]
        except BaseException:
            lock.release()
            raise
        if settings.carrier and self.connected:
            self._watch = LoopingCall(self._check_carrier)
            self._watch.clock = reactor
            self._watch.start(CARRIER_POLL, now=True)

    def set_dtr(self, on: bool) -> bool:
        """Raise or drop DTR; False if the device has no modem lines (a pty)."""
        try:
            self.setDTR(on)  # type: ignore[no-untyped-call]
        except (OSError, serial.SerialException):
            return False
        return True

    def _check_carrier(self) -> None:
        try:
            carrier = bool(self.getCD())  # type: ignore[no-untyped-call]
        except (OSError, serial.SerialException) as error:
            log.info(
                "serial: {device} cannot report DCD ({error}); watching for end of file",
                device=escape(self.settings.device),
                error=escape(str(error)),
            )
            self._stop_watch()
            return
        if carrier:
            self._carrier_seen = True
        elif self._carrier_seen:
            log.info("serial: carrier lost on {device}", device=escape(self.settings.device))
            self._stop_watch()
            self.drop(CarrierLost("carrier lost"))

    def drop(self, reason: Exception) -> None:
        """End the connection now, without waiting for buffered bytes (the line is gone)."""
        if not self.connected:
            return
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self.connectionLost(Failure(reason))  # type: ignore[no-untyped-call]

    def _stop_watch(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None

    def connectionLost(self, reason: Failure) -> None:
        """Close the device and release its lock before the protocol hears of it, so that
        whoever is told the line closed can open the port again at once."""
        self._stop_watch()
        try:
            abstract.FileDescriptor.connectionLost(self, reason)  # type: ignore[no-untyped-call]
            self._serial.close()
        finally:
            self._lock.release()
        self.protocol.connectionLost(reason)

    def getPeer(self) -> SerialAddress:
        return SerialAddress(self.settings.device)

    def getHost(self) -> SerialAddress:
        return SerialAddress(self.settings.device)


def open_serial(
    reactor: Any,
    protocol: IProtocol,
    settings: SerialSettings,
    lock_dir: Path | str = DEFAULT_LOCK_DIR,
) -> LockedSerialPort:
    """Lock and open the device with ``protocol`` on it; raises if busy or unopenable.

    Raises :class:`~relay.transport.lock.DeviceLocked` (another process holds it),
    :class:`~relay.transport.lock.DeviceLockError`, ``OSError`` or
    ``serial.SerialException`` (no such device, no permission)."""
    return LockedSerialPort(protocol, settings, reactor, DeviceLock(settings.device, lock_dir))


@implementer(IStreamClientEndpoint)
class SerialEndpoint:
    """An ``IStreamClientEndpoint``-like opener of one serial port (``connect(factory)``)."""

    def __init__(
        self,
        reactor: Any,
        settings: SerialSettings,
        lock_dir: Path | str = DEFAULT_LOCK_DIR,
    ) -> None:
        self._reactor = reactor
        self.settings = settings
        self.lock_dir = Path(lock_dir)
        self.port: LockedSerialPort | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open the port with a protocol from ``factory``; fails if busy or unopenable."""
        protocol = factory.buildProtocol(SerialAddress(self.settings.device))
        if protocol is None:
            return fail(internet_error.ConnectError("the factory refused the connection"))  # type: ignore[no-untyped-call]
        try:
            self.port = open_serial(self._reactor, protocol, self.settings, self.lock_dir)
        except (OSError, serial.SerialException) as error:
            return fail(error)
        return succeed(protocol)

    def __repr__(self) -> str:
        return f"<SerialEndpoint {escape(self.settings.device)}>"

"""Transport descriptions: serial settings parsed in one place, the rest Twisted's strings."""

from __future__ import annotations

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactor
from zope.interface.verify import verifyObject

from relay.transport import (
    SerialEndpoint,
    SerialSettings,
    TransportError,
    check_description,
    client_endpoint,
    parse_serial,
    server_endpoint,
)


def test_a_serial_description_gives_its_pyserial_settings() -> None:
    """serial:DEVICE:key=value... sets the rate, framing, flow control and carrier watch."""
    parsed = parse_serial(
        "serial:/dev/ttyS0:baudrate=57600:bytesize=7:parity=e:stopbits=2:rtscts=yes:carrier=true"
    )
    assert parsed == SerialSettings("/dev/ttyS0", 57600, 7, "E", 2, False, True, True)
    assert parsed.pyserial_options() == {
        "baudrate": 57600,
        "bytesize": 7,
        "parity": serial.PARITY_EVEN,
        "stopbits": 2,
        "xonxoff": False,
        "rtscts": True,
    }


def test_defaults_and_an_escaped_colon() -> None:
    """Without keys: 115200 8N1, no flow control, no carrier watch; ``\\:`` is a colon."""
    assert parse_serial(r"serial:/dev/serial/by-path/pci-0\:1") == SerialSettings(
        "/dev/serial/by-path/pci-0:1"
    )


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("serial:", "needs a device"),
        ("serial:/dev/ttyS0:baudrate=12345", "unsupported baud rate"),
        ("serial:/dev/ttyS0:baudrate=fast", "must be a number"),
        ("serial:/dev/ttyS0:baudrate=9600.5", "whole number"),
        ("serial:/dev/ttyS0:bytesize=9", "bytesize"),
        ("serial:/dev/ttyS0:parity=X", "parity"),
        ("serial:/dev/ttyS0:stopbits=3", "stopbits"),
        ("serial:/dev/ttyS0:rtscts=maybe", "yes or no"),
        ("serial:/dev/ttyS0:speed=9600", "unknown serial setting"),
        ("serial:/dev/ttyS0:baudrate", "key=value"),
        ("serial:/dev/ttyS0:baudrate=9600:baudrate=9600", "twice"),
        ("tcp:host:1", "not a serial description"),
    ],
)
def test_bad_serial_descriptions_say_what_is_wrong(description: str, message: str) -> None:
    """Each mistake in a serial description is a TransportError naming it."""
    with pytest.raises(TransportError, match=message):
        parse_serial(description)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_transport_error(text: str) -> None:
    """Whatever follows serial:, the parser returns settings or a TransportError."""
    try:
        parsed = parse_serial("serial:" + text)
    except TransportError:
        return
    assert parsed.device and parsed.baudrate > 0


def test_endpoints_for_each_kind_of_description(tmp_path: object) -> None:
    """serial: gives our SerialEndpoint, tcp: Twisted's; stdio cannot be called."""
    reactor = MemoryReactor()
    serial_endpoint = client_endpoint(reactor, "serial:/dev/ttyS0", "/tmp")
    assert isinstance(serial_endpoint, SerialEndpoint)
    assert verifyObject(IStreamClientEndpoint, serial_endpoint)
    assert verifyObject(IStreamClientEndpoint, client_endpoint(reactor, "tcp:127.0.0.1:2600"))
    server_endpoint(reactor, "tcp:2600:interface=127.0.0.1")
    for bad in ("stdio", "nonsense:1:2", "tcp:"):
        with pytest.raises(TransportError):
            client_endpoint(reactor, bad)
    with pytest.raises(TransportError):
        server_endpoint(reactor, "serial:/dev/ttyS0")


def test_check_description_accepts_what_the_endpoints_accept() -> None:
    """A configuration check refuses a bad serial entry and a word that is no description."""
    check_description("serial:/dev/ttyS0:baudrate=115200")
    check_description("tcp:2600")
    check_description("stdio")
    for bad in ("serial:/dev/ttyS0:baudrate=1", "ttyS0"):
        with pytest.raises(TransportError):
            check_description(bad)

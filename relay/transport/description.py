"""Where a call goes or is answered, written as one string: parsed here and nowhere else.

``serial:DEVICE[:key=value]...`` names a serial port and its pyserial settings, e.g.
``serial:/dev/ttyS0:baudrate=115200:rtscts=yes:carrier=yes``.  The keys are
``baudrate`` (default 115200), ``bytesize`` (5 to 8, default 8), ``parity`` (N, E, O,
M or S, default N), ``stopbits`` (1, 1.5 or 2), ``xonxoff`` and ``rtscts`` (flow
control, default off; never xonxoff under the 8-bit phone link) and ``carrier``
(watch DCD and end the call when it drops; default off, for cables that do not wire
it; a modem set ``&C1`` wants it on).  A colon in the device name is written ``\\:``.

Anything else is a Twisted endpoint string (``tcp:host:port`` to call,
``tcp:2600`` to answer), given to Twisted's own parsers unchanged.  ``stdio`` is the
standard input and output of the process (``relay slave --stdio`` as a login shell).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import serial

from relay.sansio.fields import split_unescaped

__all__ = ["SerialSettings", "TransportError", "is_serial", "is_stdio", "parse_serial"]

_PARITIES: Final = {
    "N": serial.PARITY_NONE,
    "E": serial.PARITY_EVEN,
    "O": serial.PARITY_ODD,
    "M": serial.PARITY_MARK,
    "S": serial.PARITY_SPACE,
}
_BOOLEANS: Final = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_RATES: Final = frozenset(serial.Serial.BAUDRATES) | {230400, 460800, 921600}


class TransportError(ValueError):
    """A transport description that cannot be used (the message says which part)."""


@dataclass(frozen=True)
class SerialSettings:
    """A serial port and how to set it up."""

    device: str
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False
    carrier: bool = False

    def __post_init__(self) -> None:
        if not self.device or "\0" in self.device:
            raise TransportError("a serial description needs a device name")
        if self.baudrate not in _RATES:
            raise TransportError(f"unsupported baud rate {self.baudrate}")
        if self.bytesize not in (5, 6, 7, 8):
            raise TransportError(f"bytesize must be 5 to 8, not {self.bytesize}")
        if self.parity not in _PARITIES:
            raise TransportError(f"parity must be one of N E O M S, not {self.parity!r}")
        if self.stopbits not in (1, 1.5, 2):
            raise TransportError(f"stopbits must be 1, 1.5 or 2, not {self.stopbits}")

    def pyserial_options(self) -> dict[str, object]:
        """Keyword arguments for ``serial.Serial`` / Twisted's ``SerialPort``."""
        return {
            "baudrate": self.baudrate,
            "bytesize": self.bytesize,
            "parity": _PARITIES[self.parity],
            "stopbits": self.stopbits,
            "xonxoff": self.xonxoff,
            "rtscts": self.rtscts,
        }


def is_serial(description: str) -> bool:
    """True for a ``serial:`` description."""
    return description.startswith("serial:")


def is_stdio(description: str) -> bool:
    """True for the ``stdio`` description."""
    return description == "stdio"


def _number(key: str, value: str) -> float:
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise TransportError(f"{key} must be a number, not {value!r}") from None


def parse_serial(description: str) -> SerialSettings:
    """The settings of a ``serial:DEVICE:key=value...`` description."""
    if not is_serial(description):
        raise TransportError(f"not a serial description: {description!r}")
    fields = split_unescaped(description[len("serial:") :], ":")
    device, *options = (field.replace("\\:", ":") for field in fields)
    values: dict[str, object] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals:
            raise TransportError(f"expected key=value, not {option!r} in {description!r}")
        if key in values:
            raise TransportError(f"{key} given twice in {description!r}")
        if key in ("baudrate", "bytesize"):
            number = _number(key, value)
            if not isinstance(number, int):
                raise TransportError(f"{key} must be a whole number, not {value!r}")
            values[key] = number
        elif key == "stopbits":
            values[key] = _number(key, value)
        elif key == "parity":
            values[key] = value.upper()
        elif key in ("xonxoff", "rtscts", "carrier"):
            if value.lower() not in _BOOLEANS:
                raise TransportError(f"{key} must be yes or no, not {value!r}")
            values[key] = _BOOLEANS[value.lower()]
        else:
            raise TransportError(f"unknown serial setting {key!r} in {description!r}")
    return SerialSettings(device, **values)  # type: ignore[arg-type]

"""Value conversion: one TOML value in, one finished value out, or :class:`_Invalid`.

Each converter takes what ``tomllib`` produced for one key (any type: the file may say
anything) and returns the value the model holds, or raises :class:`_Invalid` with the
text after the key's name in the problem line ("expected ..., got ...").  Converters
never record a problem themselves and never see a table: the reader
(:class:`relay.config.reader._Table`) calls them and turns an ``_Invalid`` into a
problem.  Transports (``serial:``, ``tcp:``, ``stdio``) are parsed here too, for the
configuration and for ``relay slave``'s command line (:func:`parse_transport`).

The underscore names are private to :mod:`relay.config`: its modules share them,
nothing outside does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import date, datetime, time
from enum import StrEnum
from pathlib import Path
from typing import Final

from relay.address import AddressError, parse_mailbox
from relay.config.model import (
    Channel,
    IPNetwork,
    MailboxFormat,
    SerialTransport,
    Smarthost,
    StdioTransport,
    TcpTransport,
    TlsPolicy,
    Transport,
    field_default,
)
from relay.durations import DurationError, parse_duration

__all__ = ["parse_transport"]


class _Invalid(Exception):
    """One value is wrong; the message says what was expected."""


def _describe(value: object) -> str:
    """``value`` as the problem line shows it after "got"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _expected(what: str, value: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {_describe(value)}")


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string", value)
    return value


def _any_string(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _worker_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise _expected("a number of processes from 0 to 64", value)
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _expected("a positive integer", value)
    return value


def _line_length_limit(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value >= 2):
        return value
    raise _expected("0 (never break lines) or a length of at least 2 octets", value)


_DURATION_EXAMPLES = "a duration like '30s', '5m', '4h', '5d' or seconds"


def _duration(value: object) -> float:
    """A duration of at least zero seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _expected(_DURATION_EXAMPLES, value)
    try:
        return parse_duration(value)
    except DurationError:
        raise _expected(_DURATION_EXAMPLES, value) from None


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise _expected("a duration longer than zero", value)
    return seconds


def _enum(kind: type[StrEnum]) -> Callable[[object], str]:
    choices = ", ".join(repr(member.value) for member in kind)

    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in kind._value2member_map_:
            raise _expected(f"one of {choices}", value)
        return value

    return convert


def _mailbox_format(value: object) -> MailboxFormat:
    return MailboxFormat(_enum(MailboxFormat)(value))


def _channel(value: object) -> Channel:
    return Channel(_enum(Channel)(value))


def _tls_policy(value: object) -> TlsPolicy:
    return TlsPolicy(_enum(TlsPolicy)(value))


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _is_domain(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _domain(value: object) -> str:
    """A domain name (ASCII, lowercased; a single label such as ``localhost`` is fine)."""
    if isinstance(value, str) and value.isascii() and _is_domain(value.lower()):
        return value.lower()
    raise _expected("a domain name", value)


def _domain_pattern(value: object) -> str:
    """A route's domain: ``example.test`` or ``*.example.test``."""
    if isinstance(value, str) and value.isascii():
        lowered = value.lower()
        name = lowered[2:] if lowered.startswith("*.") else lowered
        if _is_domain(name):
            return lowered
    raise _expected("a domain like 'partner.test' or '*.partner.test'", value)


def _address(value: object) -> str:
    """A mail address ``local@domain`` as the gateway and the DSN builder parse it."""
    if isinstance(value, str):
        try:
            return str(parse_mailbox(value))
        except AddressError:
            pass
    raise _expected("an address like 'postmaster@example.test'", value)


_USER = re.compile(r"[^\s/@:\x00-\x1f\x7f]+")
_USER_RULE = "no whitespace, '/', '@' or ':'"


def _is_user_name(text: str) -> bool:
    """One safe path component that can be a local part: no '@', no whitespace."""
    return bool(_USER.fullmatch(text)) and text not in (".", "..")


def _user_name(value: object) -> str:
    if isinstance(value, str) and _is_user_name(value):
        return value
    raise _expected(f"a user name ({_USER_RULE})", value)


_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SITE_RULE = "letters, digits, '.', '_' and '-'"


def _is_site_name(text: str) -> bool:
    """A phone site or login name: short, and safe to name files with."""
    return bool(_SITE.fullmatch(text)) and len(text) <= 64


def _site_name(value: object) -> str:
    if isinstance(value, str) and _is_site_name(value):
        return value
    raise _expected(f"a name of {_SITE_RULE}", value)


def _delimiter(value: object) -> str:
    """``""`` (no extensions) or one punctuation character."""
    if isinstance(value, str) and (
        value == ""
        or (len(value) == 1 and value.isprintable() and value not in " @" and not value.isalnum())
    ):
        return value
    raise _expected("'' or one punctuation character such as '+' or '-'", value)


def _network(value: object) -> IPNetwork:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise _expected("a network like '192.0.2.0/24' or '::1/128'", value)


_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def _endpoint(value: object) -> str:
    """A Twisted server endpoint description, lightly checked (type and port)."""
    what = "a server endpoint like 'tcp:2525:interface=127.0.0.1'"
    if not isinstance(value, str):
        raise _expected(what, value)
    kind, *args = _UNESCAPED_COLON.split(value)
    if kind not in _ENDPOINT_TYPES or not any(args):
        raise _expected(f"{what} (one of {', '.join(_ENDPOINT_TYPES)})", value)
    if kind in ("tcp", "tcp6", "ssl"):
        positional = [a for a in args if "=" not in a]
        named = [a.partition("=")[2] for a in args if a.startswith("port=")]
        port = (named or positional or [""])[0]
        if not port.isdigit() or not port.isascii() or int(port) > 65535:
            raise _expected(f"{what} (with a port number)", value)
    return value


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and 0 < int(text) <= 65535:
        return int(text)
    raise ValueError(f"bad port {text!r}")


def _host(text: str) -> str:
    """A host name or an IP address (lowercased)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text.isascii() and _is_domain(text.lower()):
        return text.lower()
    raise ValueError(f"bad host {text!r}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_SMARTHOST_PORT: Final[int] = field_default(Smarthost, "port")
_DNS_PORT: Final = 53
_BRACKETED = re.compile(r"\[([^\]]+)\](?::([^:]*))?")


def _split_host_port(text: str, *, default_port: int | None) -> tuple[str, int, bool]:
    """``host``, ``host:port``, ``[host]`` or ``[host]:port`` → (host, port, bracketed)."""
    match = _BRACKETED.fullmatch(text)
    if match:
        host, port = match.group(1), match.group(2)
    elif text.count(":") > 1:
        raise ValueError("an IPv6 address must be written in [brackets]")
    elif ":" in text:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise ValueError("a port is required")
        return _host(host), default_port, match is not None
    return _host(host), _port(port), match is not None


def _smarthost(value: object) -> Smarthost:
    what = "a host like 'mail.example.test', 'mail.example.test:587' or '[192.0.2.1]:25'"
    if not isinstance(value, str):
        raise _expected(what, value)
    try:
        host, port, bracketed = _split_host_port(value, default_port=_SMARTHOST_PORT)
    except ValueError:
        raise _expected(what, value) from None
    return Smarthost(host, port, mx_lookup=not bracketed and not _is_ip(host))


def _dns_server(value: object) -> tuple[str, int]:
    """A name server: ``"IP"`` or ``"IP:PORT"`` (IPv6 as ``"::1"`` or ``"[::1]:53"``)."""
    what = "a name server address like '192.0.2.53', '127.0.0.1:5353' or '[::1]:53'"
    if not isinstance(value, str):
        raise _expected(what, value)
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        if _is_ip(text):  # a bare address, IPv6 included
            return str(ipaddress.ip_address(text)), _DNS_PORT
        host, port, _ = _split_host_port(value, default_port=_DNS_PORT)
    except ValueError:
        raise _expected(what, value) from None
    if not _is_ip(host):  # a name would need a resolver to find the resolver
        raise _expected(what, value)
    return host, port


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _ca_file(path: Path) -> Path:
    """A file of PEM certificates: checked now, so a wrong file fails the check, not a start."""
    try:
        with path.open("rb") as f:
            found = _PEM_CERTIFICATE in f.read(4 * 1024 * 1024)
    except OSError as error:
        raise _Invalid(f"cannot read {_shown(path)}: {error.strerror}") from None
    if not found:
        raise _Invalid(f"no PEM certificate in {_shown(path)}")
    return path


def parse_transport(text: str) -> Transport:
    """``serial:DEVICE[:baudrate=N]``, ``tcp:[HOST:]PORT`` or ``stdio``; ValueError if not."""
    kind, _, rest = text.partition(":")
    if kind == "serial":
        return _serial_transport(rest)
    if kind == "tcp":
        host, port, _ = (
            ("", _port(rest), False)
            if rest.isdigit()
            else _split_host_port(rest, default_port=None)
        )
        return TcpTransport(host, port)
    if text == "stdio":
        return StdioTransport()
    raise ValueError(f"unknown transport {text!r}")


def _serial_transport(rest: str) -> SerialTransport:
    device, *options = rest.split(":")
    if not device:
        raise ValueError("a serial device is required")
    settings: dict[str, int] = {}  # without a baudrate option: SerialTransport's default
    for option in options:
        name, _, number = option.partition("=")
        if name != "baudrate" or not (number.isascii() and number.isdigit()) or int(number) == 0:
            raise ValueError(f"bad serial option {option!r}")
        settings[name] = int(number)
    return SerialTransport(device, **settings)


def _answer_transport(value: object) -> Transport:
    what = "a transport like 'serial:/dev/ttyS1:baudrate=115200', 'tcp:2600' or 'stdio'"
    if not isinstance(value, str):
        raise _expected(what, value)
    try:
        return parse_transport(value)
    except ValueError:
        raise _expected(what, value) from None


def _site_transport(value: object) -> SerialTransport | TcpTransport:
    what = "a transport like 'serial:/dev/ttyS0:baudrate=115200' or 'tcp:host:port'"
    if not isinstance(value, str):
        raise _expected(what, value)
    try:
        transport = parse_transport(value)
    except ValueError:
        raise _expected(what, value) from None
    if isinstance(transport, StdioTransport) or (
        isinstance(transport, TcpTransport) and not transport.host
    ):
        raise _expected(what, value)
    return transport


def _shown(path: Path) -> str:
    """``path`` for a problem line: as is, or quoted if it would break the line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def _time_of_day(value: object) -> int:
    """``"HH:MM"`` (UTC) as seconds after midnight."""
    if not isinstance(value, str) or (match := _TIME_OF_DAY.fullmatch(value)) is None:
        raise _expected("a time of day like '02:30' (UTC)", value)
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60


def _time_window(value: object) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (UTC; may wrap past midnight) as two times of day."""
    what = "a window like '22:00-06:00' (UTC)"
    if not isinstance(value, str) or value.count("-") != 1:
        raise _expected(what, value)
    start, end = value.split("-")
    try:
        window = (_time_of_day(start.strip()), _time_of_day(end.strip()))
    except _Invalid:
        raise _expected(what, value) from None
    if window[0] == window[1]:
        raise _expected(what + " that is not empty", value)
    return window

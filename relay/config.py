"""The configuration: one TOML file read into frozen, typed objects.

Why it is built this way:

* **Every problem at once.** The whole file is read and checked before anything starts,
  and :class:`ConfigError` lists *every* problem, one line each, naming the key. An
  operator should not have to fix a file one restart at a time. To make that easy to
  get right, a small reader (:class:`_Table`) records a problem and hands back the key's
  default, so reading always goes on to the end; if anything was recorded, the
  half-built result is thrown away.
* **No separate schema.** Every key is read through the reader, so the reader learns the
  legal names of its table as the code asks for them; whatever is left over is an
  unknown key, reported with a "did you mean". The list of keys cannot drift from the
  code that uses them.
* **Converted once, here.** The objects hold finished values: durations in seconds,
  absolute paths, ``ipaddress`` networks, enums, transports as small classes. Code that
  uses the configuration never parses a string, and because everything is a frozen
  dataclass (with slots) nothing can change the configuration under a running service.
* **Paths are anchored to the file.** Relative paths resolve against the directory of
  the configuration file (``twistd`` changes directory when it daemonizes, so a path
  relative to the working directory would move). Files the relay must *read* (TLS
  keys, secrets, aliases, password files) are checked now; directories it *creates*
  (the spool, the mail root) are not.

The key names of SPEC.md's "The configuration's shape" are fixed; ``docs/configuration.md``
documents every key. ``relay/default.toml`` is the embedded default (:data:`DEFAULT_TOML`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from relay.address import AddressError, parse_mailbox
from relay.durations import DurationError, format_duration, parse_duration
from relay.errors import RelayError
from relay.sansio.smtp.server import Limits

__all__ = [
    "DEFAULT_TOML",
    "Channel",
    "Config",
    "ConfigError",
    "DeliverSection",
    "LocalSection",
    "MailboxFormat",
    "MetricsSection",
    "PhoneSection",
    "PhoneSite",
    "RelaySection",
    "Route",
    "SerialTransport",
    "Smarthost",
    "SmtpClientSection",
    "SmtpSection",
    "StdioTransport",
    "TcpTransport",
    "TlsPolicy",
    "Transport",
    "default_config",
    "domain_matches",
    "load_config",
    "parse_config",
    "parse_transport",
]

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
_ENGINE_LIMITS = Limits()

DEFAULT_TOML: str = resources.files("relay").joinpath("default.toml").read_text(encoding="utf-8")
"""The text of ``relay/default.toml``: the embedded default, commented as a sample file."""


class ConfigError(RelayError):
    """A configuration that cannot be used; ``problems`` lists every reason, one line each."""

    problems: tuple[str, ...]

    def __init__(self, problems: str | Iterable[str]) -> None:
        if isinstance(problems, str):
            problems = problems.splitlines()
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- the objects


class MailboxFormat(StrEnum):
    """How ``[local]`` stores a user's mail under ``mail_root``."""

    MAILDIR = "maildir"
    MBOX = "mbox"


class Channel(StrEnum):
    """The channel a ``[[route]]`` sends matching mail to."""

    SMTP = "smtp"
    LOCAL = "local"
    PHONE = "phone"


class TlsPolicy(StrEnum):
    """Whether the SMTP client uses STARTTLS on a route."""

    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class SerialTransport:
    """A serial device (a modem or a null-modem cable): ``serial:DEVICE[:baudrate=N]``."""

    device: str
    baudrate: int = 9600

    def __str__(self) -> str:
        return f"serial:{self.device}:baudrate={self.baudrate}"


@dataclass(frozen=True, slots=True)
class TcpTransport:
    """Serial-over-IP: ``tcp:HOST:PORT`` to call, ``tcp:[INTERFACE:]PORT`` to answer.

    ``host`` is ``""`` for an answering listener bound to every interface.
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}" if host else f"tcp:{self.port}"


@dataclass(frozen=True, slots=True)
class StdioTransport:
    """Standard input and output: the slave run as the login shell of the calling account."""

    def __str__(self) -> str:
        return "stdio"


Transport = SerialTransport | TcpTransport | StdioTransport


@dataclass(frozen=True, slots=True)
class Smarthost:
    """Where a route's SMTP mail goes instead of the recipient domain's MX.

    ``mx_lookup`` is False when the host was written in ``[brackets]`` (as in Postfix) or
    is an IP address: connect to exactly that host.
    """

    host: str
    port: int = 25
    mx_lookup: bool = True

    def __str__(self) -> str:
        host = self.host if self.mx_lookup and ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RelaySection:
    """``[relay]``: who this relay is and where it keeps its queue."""

    hostname: str
    local_domains: tuple[str, ...]
    spool: Path
    postmaster: str
    maildrop: Path = Path("var/maildrop")  # where ``relay sendmail`` drops mail (any user)


@dataclass(frozen=True, slots=True)
class SmtpSection:
    """``[smtp]``: the inbound SMTP server.

    The defaults here are the built-in defaults (the reader takes them from this class);
    the message, recipient and error limits are the SMTP engine's own
    (:class:`relay.sansio.smtp.server.Limits`).
    """

    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    listen_tls: tuple[str, ...] = ()
    trusted_networks: tuple[IPNetwork, ...] = _LOOPBACK
    max_message_size: int = _ENGINE_LIMITS.max_message_size
    max_recipients: int = _ENGINE_LIMITS.max_recipients
    max_errors: int = _ENGINE_LIMITS.max_errors
    max_sessions: int = 100
    max_sessions_per_client: int = 50
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    auth_users_file: Path | None = None
    auth_requires_tls: bool = True
    greet_delay: float = 0.0
    max_text_in_memory: int = 256 * 1024 * 1024
    auth_max_failures: int = 5
    auth_failure_window: float = 900.0
    workers: int = 1
    relay_domains: tuple[str, ...] = ()

    def relays_to(self, domain: str) -> bool:
        """Whether mail for ``domain`` is accepted from anyone and relayed (Postfix's
        ``relay_domains``): it matches an entry, exactly or as ``*.parent``."""
        return any(domain_matches(pattern, domain) for pattern in self.relay_domains)

    def is_trusted(self, address: str) -> bool:
        """Whether a client at IP ``address`` may relay (IPv4-mapped IPv6 counts as IPv4)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_networks)


@dataclass(frozen=True, slots=True)
class SmtpClientSection:
    """``[smtp_client]``: how the SMTP channel talks to other servers (times in seconds).

    The defaults here are the built-in defaults (the reader takes them from this class):
    the timeouts of RFC 5321 §4.5.3.2, Postfix's connection cache time, and its
    ``smtp_line_length_limit`` (998: RFC 5321's text line without its CRLF).
    ``dns_servers`` empty means the system's ``/etc/resolv.conf``; ``ca_file`` None
    means the system trust store.
    """

    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    helo_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_done_timeout: float = 600.0
    connection_cache_time: float = 2.0
    max_messages_per_connection: int = 100
    line_length_limit: int = 998
    dns_servers: tuple[tuple[str, int], ...] = ()
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DeliverSection:
    """``[deliver]``: retry schedule and concurrency of the deliverer (times in seconds)."""

    retry_min: float
    retry_max: float
    warn_after: float
    give_up_after: float
    concurrency_per_destination: int
    initial_destination_concurrency: int
    concurrency_total: int
    recipients_per_transaction: int
    dead_host_delay: float


@dataclass(frozen=True, slots=True)
class LocalSection:
    """``[local]``: the local mailboxes."""

    mail_root: Path
    format: MailboxFormat
    users: tuple[str, ...]
    mailboxes: Mapping[str, Path]
    aliases: Path | None
    recipient_delimiter: str
    system_users: bool

    def mailbox_path(self, user: str) -> Path:
        """Where ``user``'s mail goes: its ``[local.mailboxes]`` entry, else mail_root/user."""
        return self.mailboxes.get(user, self.mail_root / user)


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[route]]``: mail for ``domain`` goes to ``channel``."""

    domain: str
    channel: Channel
    smarthost: Smarthost | None = None
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    auth_user: str | None = None
    auth_password_file: Path | None = None
    site: str | None = None

    def matches(self, domain: str) -> bool:
        """Whether mail for ``domain`` takes this route (``*.x`` matches below x, not x)."""
        return domain_matches(self.domain, domain)


def domain_matches(pattern: str, domain: str) -> bool:
    """Whether ``domain`` (any case, a trailing dot ignored) matches a lower-case
    ``pattern``: the same name, or for ``*.x`` any name below x (not x itself)."""
    wanted = domain.lower().rstrip(".")
    if pattern.startswith("*."):
        return wanted.endswith(pattern[1:])
    return wanted == pattern


@dataclass(frozen=True, slots=True)
class PhoneSite:
    """``[phone.sites.NAME]``: a site this relay exchanges mail with over the serial link.

    A site without a transport only calls in; mail for it waits for its call.
    """

    name: str
    secret_file: Path
    transport: SerialTransport | TcpTransport | None = None
    dial: str | None = None
    chat: tuple[str, ...] = ()
    schedule: float | None = None
    login: str | None = None
    poll_times: tuple[int, ...] = ()  # seconds after midnight UTC, sorted
    call_window: tuple[int, int] | None = None  # (start, end) seconds after midnight UTC
    gather_delay: float = 30.0
    max_call_time: float = 3600.0
    compression: bool = True
    encryption: bool = False
    max_message_size: int | None = None

    @property
    def poll(self) -> float | None:
        """The polling interval (``poll`` as a duration, or the older ``schedule``)."""
        return self.schedule


@dataclass(frozen=True, slots=True)
class PhoneSection:
    """``[phone]``: this relay's name on the link, where calls are answered, the sites."""

    answer: tuple[Transport, ...] = ()
    sites: Mapping[str, PhoneSite] = field(default_factory=lambda: MappingProxyType({}))
    name: str = ""  # filled from [relay] hostname's first label when absent
    modem_init: tuple[str, ...] | None = None  # AT commands; None: direct lines, no modem
    lock_dir: Path = Path("/var/lock")  # UUCP-style device locks
    handshake_timeout: float = 60.0  # a caller silent this long after connecting is dropped


@dataclass(frozen=True, slots=True)
class MetricsSection:
    """``[metrics]``: the Prometheus endpoint (``listen``, a server endpoint; None: off)."""

    listen: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    source: Path | None
    relay: RelaySection
    smtp: SmtpSection
    deliver: DeliverSection
    local: LocalSection
    routes: tuple[Route, ...]
    phone: PhoneSection
    smtp_client: SmtpClientSection = field(default_factory=SmtpClientSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    # What it was read from, so a gateway worker process builds exactly this configuration.
    text: str = field(default="", compare=False, repr=False)
    base_dir: Path = field(default_factory=Path.cwd, compare=False, repr=False)

    def route_for(self, domain: str) -> Route | None:
        """The first route matching ``domain``, or None (SMTP by MX, or local)."""
        return next((route for route in self.routes if route.matches(domain)), None)

    def summary(self) -> str:
        """One line saying what this configuration runs."""
        listeners = [*self.smtp.listen, *(f"{e} (tls)" for e in self.smtp.listen_tls)]
        smtp = f"smtp on {', '.join(listeners)}" if listeners else "no smtp listener"
        if listeners and self.smtp.workers:
            smtp += f" ({_count(1 + self.smtp.workers, 'process')})"
        return (
            f"{self.relay.hostname}: {_count(len(self.relay.local_domains), 'local domain')}, "
            f"{smtp}, {_count(len(self.routes), 'route')}, "
            f"{_count(len(self.phone.sites), 'phone site')}, spool {self.relay.spool}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, check and resolve the file at ``path``; raise ConfigError listing every problem."""
    source = Path(path).absolute()
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{_shown(source)}: file not found"]) from None
    except OSError as error:
        raise ConfigError([f"{_shown(source)}: cannot read: {error.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{_shown(source)}: not UTF-8 text (byte {error.start})"]) from None
    return parse_config(text, source.parent, source=source)


def parse_config(text: str, base_dir: Path, *, source: Path | None = None) -> Config:
    """The configuration in ``text``, relative paths resolved against ``base_dir``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"invalid TOML: {error}"]) from None
    problems: list[str] = []
    config = _read_config(data, base_dir.absolute(), source, problems)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, text=text, base_dir=base_dir.absolute())


def default_config(base_dir: Path | None = None) -> Config:
    """The embedded default (:data:`DEFAULT_TOML`), its paths under ``base_dir`` (or the cwd)."""
    return parse_config(DEFAULT_TOML, Path.cwd() if base_dir is None else base_dir)


# --------------------------------------------------------------------------- the reader


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


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(prefix: str, key: str) -> str:
    """The dotted name of ``key`` in the table ``prefix``, quoting it as TOML would."""
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key, ensure_ascii=not key.isprintable())
    return f"{prefix}.{key}" if prefix else key


class _Table:
    """Reads one TOML table, recording problems instead of raising.

    Each getter converts a key's value, or records a problem and returns the default so
    that reading goes on. Every key asked for becomes known; :meth:`finish` reports the
    rest as unknown.
    """

    def __init__(
        self, data: Mapping[str, object], name: str, problems: list[str], noun: str = "key"
    ) -> None:
        self.data = data
        self.name = name
        self.problems = problems
        self.noun = noun
        self.known: set[str] = set()
        self.failed: set[str] = set()

    def key(self, key: str) -> str:
        return _join(self.name, key)

    def problem(self, key: str, message: str, *, index: int | None = None) -> None:
        self.failed.add(key)
        where = self.key(key) if index is None else f"{self.key(key)}[{index}]"
        self.problems.append(f"{where}: {message}")

    def has(self, key: str) -> bool:
        self.known.add(key)
        return key in self.data

    def valid(self, *keys: str) -> bool:
        """Whether all of ``keys`` were read without a problem (for cross-checks)."""
        return not self.failed.intersection(keys)

    def get(self, key: str, convert: Callable[[object], T], default: T) -> T:
        if not self.has(key):
            return default
        try:
            return convert(self.data[key])
        except _Invalid as error:
            self.problem(key, str(error))
            return default

    def require(self, key: str, convert: Callable[[object], T], placeholder: T) -> T:
        if not self.has(key):
            self.problem(key, "required")
            return placeholder
        return self.get(key, convert, placeholder)

    def get_list(
        self,
        key: str,
        convert: Callable[[object], T],
        default: tuple[T, ...],
        what: str,
        *,
        unique: bool = False,
    ) -> tuple[T, ...]:
        """An array, each element converted; a bad element is its own problem.

        With ``unique``, repeated elements are dropped (keeping the first), since for a
        set of names or networks a repeat is harmless and order rarely matters.
        """
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, list):
            self.problem(key, str(_expected(f"an array of {what}", value)))
            return default
        items: list[T] = []
        for index, item in enumerate(value):
            try:
                items.append(convert(item))
            except _Invalid as error:
                self.problem(key, str(error), index=index)
        return tuple(dict.fromkeys(items)) if unique else tuple(items)

    def table(self, key: str) -> _Table:
        """The sub-table ``key`` (empty if absent or not a table)."""
        data: Mapping[str, object] = {}
        if self.has(key):
            value = self.data[key]
            if isinstance(value, dict):
                data = value
            else:
                self.problem(key, str(_expected("a table", value)))
        return _Table(data, self.key(key), self.problems)

    def finish(self) -> None:
        """Report every key nobody asked for, with the nearest known name."""
        for key in self.data:
            if key in self.known:
                continue
            close = difflib.get_close_matches(key, sorted(self.known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problems.append(f"{self.key(key)}: unknown {self.noun}{hint}")


# --------------------------------------------------------------------------- converters


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
        host, port, bracketed = _split_host_port(value, default_port=25)
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
            return str(ipaddress.ip_address(text)), 53
        host, port, _ = _split_host_port(value, default_port=53)
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
    baudrate = 9600
    for option in options:
        name, _, number = option.partition("=")
        if name != "baudrate" or not (number.isascii() and number.isdigit()) or int(number) == 0:
            raise ValueError(f"bad serial option {option!r}")
        baudrate = int(number)
    return SerialTransport(device, baudrate)


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


class _Paths:
    """Converters for paths, relative ones resolved against the config's directory."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, value: object) -> Path:
        """A path to something the relay creates (need not exist)."""
        if not isinstance(value, str) or not value or "\x00" in value:
            raise _expected("a path", value)
        return self.base / value

    def file(self, value: object) -> Path:
        """A path to a file the relay reads: it must exist and be readable now."""
        path = self.path(value)
        try:
            if not path.exists():
                raise _Invalid(f"file not found: {_shown(path)}")
            if not path.is_file():
                raise _Invalid(f"not a file: {_shown(path)}")
            if not os.access(path, os.R_OK):
                raise _Invalid(f"not readable: {_shown(path)}")
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise _Invalid(f"cannot use {_shown(path)}: {reason}") from None
        return path


def _shown(path: Path) -> str:
    """``path`` for a problem line: as is, or quoted if it would break the line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


# --------------------------------------------------------------------------- the sections


_SECTIONS = ("relay", "smtp", "smtp_client", "deliver", "local", "route", "phone", "metrics")


def _read_config(
    data: Mapping[str, object], base: Path, source: Path | None, problems: list[str]
) -> Config:
    top = _Table(data, "", problems, noun="section")
    paths = _Paths(base)
    relay = _finished(top.table("relay"), lambda t: _read_relay(t, paths))
    smtp = _finished(top.table("smtp"), lambda t: _read_smtp(t, paths))
    smtp_client = _finished(top.table("smtp_client"), lambda t: _read_smtp_client(t, paths))
    deliver = _finished(top.table("deliver"), _read_deliver)
    local = _finished(top.table("local"), lambda t: _read_local(t, paths))
    phone = _finished(top.table("phone"), lambda t: _read_phone(t, paths, relay.hostname))
    routes = _read_routes(top, paths, phone)
    metrics = _finished(top.table("metrics"), _read_metrics)
    top.finish()
    return Config(source, relay, smtp, deliver, local, routes, phone, smtp_client, metrics)


def _finished(table: _Table, read: Callable[[_Table], T]) -> T:
    result = read(table)
    table.finish()
    return result


def _read_relay(t: _Table, paths: _Paths) -> RelaySection:
    hostname = t.require("hostname", _domain, "localhost")
    local_domains = t.get_list("local_domains", _domain, (hostname,), "domain names", unique=True)
    spool = t.get("spool", paths.path, paths.base / "var/spool")
    postmaster = t.get("postmaster", _address, None)
    if postmaster is None:
        postmaster = f"postmaster@{(local_domains or (hostname,))[0]}"
    maildrop = t.get("maildrop", paths.path, paths.base / "var/maildrop")
    return RelaySection(hostname, local_domains, spool, postmaster, maildrop)


def _read_smtp(t: _Table, paths: _Paths) -> SmtpSection:
    d = SmtpSection()
    smtp = SmtpSection(
        listen=t.get_list("listen", _endpoint, d.listen, "endpoints"),
        listen_tls=t.get_list("listen_tls", _endpoint, d.listen_tls, "endpoints"),
        trusted_networks=t.get_list(
            "trusted_networks", _network, d.trusted_networks, "networks", unique=True
        ),
        max_message_size=t.get("max_message_size", _positive_int, d.max_message_size),
        max_recipients=t.get("max_recipients", _positive_int, d.max_recipients),
        max_errors=t.get("max_errors", _positive_int, d.max_errors),
        max_sessions=t.get("max_sessions", _positive_int, d.max_sessions),
        max_sessions_per_client=t.get(
            "max_sessions_per_client", _positive_int, d.max_sessions_per_client
        ),
        idle_timeout=t.get("idle_timeout", _positive_duration, d.idle_timeout),
        session_timeout=t.get("session_timeout", _positive_duration, d.session_timeout),
        tls_cert_file=t.get("tls_cert_file", paths.file, d.tls_cert_file),
        tls_key_file=t.get("tls_key_file", paths.file, d.tls_key_file),
        auth_users_file=t.get("auth_users_file", paths.file, d.auth_users_file),
        auth_requires_tls=t.get("auth_requires_tls", _boolean, d.auth_requires_tls),
        greet_delay=t.get("greet_delay", _duration, d.greet_delay),
        max_text_in_memory=t.get("max_text_in_memory", _positive_int, d.max_text_in_memory),
        auth_max_failures=t.get("auth_max_failures", _positive_int, d.auth_max_failures),
        auth_failure_window=t.get("auth_failure_window", _positive_duration, d.auth_failure_window),
        workers=t.get("workers", _worker_count, d.workers),
        relay_domains=t.get_list(
            "relay_domains", _domain_pattern, d.relay_domains, "domains", unique=True
        ),
    )
    _check_smtp_tls(t, smtp)
    return smtp


def _check_smtp_tls(t: _Table, smtp: SmtpSection) -> None:
    """Certificate and key come together; TLS listeners and TLS-only AUTH need them."""
    has_cert, has_key = t.has("tls_cert_file"), t.has("tls_key_file")
    if has_cert and not has_key:
        t.problem("tls_key_file", f"required when {t.key('tls_cert_file')} is set")
    if has_key and not has_cert:
        t.problem("tls_cert_file", f"required when {t.key('tls_key_file')} is set")
    if smtp.listen_tls and not (has_cert or has_key):
        t.problem("listen_tls", "needs smtp.tls_cert_file and smtp.tls_key_file")
    if t.has("auth_users_file") and smtp.auth_requires_tls and not (has_cert or has_key):
        t.problem(
            "auth_users_file",
            "AUTH is offered only over TLS (auth_requires_tls = true) "
            "but smtp.tls_cert_file is not set",
        )


def _read_smtp_client(t: _Table, paths: _Paths) -> SmtpClientSection:
    d = SmtpClientSection()
    return SmtpClientSection(
        connect_timeout=t.get("connect_timeout", _positive_duration, d.connect_timeout),
        greeting_timeout=t.get("greeting_timeout", _positive_duration, d.greeting_timeout),
        helo_timeout=t.get("helo_timeout", _positive_duration, d.helo_timeout),
        mail_timeout=t.get("mail_timeout", _positive_duration, d.mail_timeout),
        rcpt_timeout=t.get("rcpt_timeout", _positive_duration, d.rcpt_timeout),
        data_timeout=t.get("data_timeout", _positive_duration, d.data_timeout),
        data_block_timeout=t.get("data_block_timeout", _positive_duration, d.data_block_timeout),
        data_done_timeout=t.get("data_done_timeout", _positive_duration, d.data_done_timeout),
        connection_cache_time=t.get("connection_cache_time", _duration, d.connection_cache_time),
        max_messages_per_connection=t.get(
            "max_messages_per_connection", _positive_int, d.max_messages_per_connection
        ),
        line_length_limit=t.get("line_length_limit", _line_length_limit, d.line_length_limit),
        dns_servers=t.get_list(
            "dns_servers", _dns_server, d.dns_servers, "name server addresses", unique=True
        ),
        ca_file=t.get("ca_file", lambda v: _ca_file(paths.file(v)), d.ca_file),
    )


def _read_deliver(t: _Table) -> DeliverSection:
    deliver = DeliverSection(
        retry_min=t.get("retry_min", _positive_duration, 300.0),
        retry_max=t.get("retry_max", _positive_duration, 4200.0),
        warn_after=t.get("warn_after", _positive_duration, 4 * 3600.0),
        give_up_after=t.get("give_up_after", _positive_duration, 5 * 86400.0),
        concurrency_per_destination=t.get("concurrency_per_destination", _positive_int, 20),
        initial_destination_concurrency=t.get("initial_destination_concurrency", _positive_int, 5),
        concurrency_total=t.get("concurrency_total", _positive_int, 100),
        recipients_per_transaction=t.get("recipients_per_transaction", _positive_int, 50),
        dead_host_delay=t.get("dead_host_delay", _duration, 600.0),
    )
    _check_order(t, "retry_min", deliver.retry_min, "retry_max", deliver.retry_max, strict=False)
    _check_order(t, "warn_after", deliver.warn_after, "give_up_after", deliver.give_up_after)
    _check_order(
        t,
        "initial_destination_concurrency",
        deliver.initial_destination_concurrency,
        "concurrency_per_destination",
        deliver.concurrency_per_destination,
        strict=False,
    )
    return deliver


def _check_order(
    t: _Table, low: str, low_value: float, high: str, high_value: float, *, strict: bool = True
) -> None:
    """Record a problem at ``low`` unless it is below (or, not strict, at most) ``high``."""
    if not (t.has(low) or t.has(high)) or not t.valid(low, high):
        return
    if low_value < high_value or (not strict and low_value == high_value):
        return
    relation = "shorter than" if strict else "at most"
    shown = format_duration(high_value) if isinstance(low_value, float) else str(high_value)
    t.problem(low, f"must be {relation} {t.key(high)} ({shown})")


def _read_local(t: _Table, paths: _Paths) -> LocalSection:
    return LocalSection(
        mail_root=t.get("mail_root", paths.path, paths.base / "var/mail"),
        format=t.get("format", _mailbox_format, MailboxFormat.MAILDIR),
        users=t.get_list("users", _user_name, (), "user names", unique=True),
        mailboxes=_read_mailboxes(t.table("mailboxes"), paths),
        aliases=t.get("aliases", paths.file, None),
        recipient_delimiter=t.get("recipient_delimiter", _delimiter, "+"),
        system_users=t.get("system_users", _boolean, False),
    )


def _read_mailboxes(t: _Table, paths: _Paths) -> Mapping[str, Path]:
    """``[local.mailboxes]``: user name → mailbox path; every key is a name, none unknown."""
    mailboxes: dict[str, Path] = {}
    for name in t.data:
        t.known.add(name)
        if not _is_user_name(name):
            t.problem(name, f"not a valid user name ({_USER_RULE})")
            continue
        mailboxes[name] = t.get(name, paths.path, paths.base)
    return MappingProxyType(mailboxes)


def _read_routes(top: _Table, paths: _Paths, phone: PhoneSection) -> tuple[Route, ...]:
    what = "an array of tables ([[route]])"
    if not top.has("route"):
        return ()
    value = top.data["route"]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        top.problem("route", str(_expected(what, value)))
        return ()
    routes: list[Route] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        t = _Table(item, f"route[{index}]", top.problems)
        route = _finished(t, lambda t: _read_route(t, paths, phone))
        if route.domain in first_index and t.valid("domain"):
            earlier = first_index[route.domain]
            t.problem("domain", f"same domain as route[{earlier}], which always matches first")
        first_index.setdefault(route.domain, index)
        routes.append(route)
    return tuple(routes)


_SMTP_ONLY = ("smarthost", "tls", "auth_user", "auth_password_file")


def _read_route(t: _Table, paths: _Paths, phone: PhoneSection) -> Route:
    route = Route(
        domain=t.require("domain", _domain_pattern, ""),
        channel=t.get("channel", _channel, Channel.SMTP),
        smarthost=t.get("smarthost", _smarthost, None),
        tls=t.get("tls", _tls_policy, TlsPolicy.OPPORTUNISTIC),
        auth_user=t.get("auth_user", _string, None),
        auth_password_file=t.get("auth_password_file", paths.file, None),
        site=t.get("site", _site_name, None),
    )
    if not t.valid("channel"):
        return route
    if route.channel is not Channel.SMTP:
        for key in filter(t.has, _SMTP_ONLY):
            t.problem(key, f"only allowed with channel 'smtp', not {route.channel.value!r}")
    else:
        _check_route_auth(t, route)
    _check_route_site(t, route, phone)
    return route


def _check_route_auth(t: _Table, route: Route) -> None:
    """A login comes with its password, and a password is not sent without TLS."""
    has_user, has_password = t.has("auth_user"), t.has("auth_password_file")
    if has_user and not has_password:
        t.problem("auth_password_file", f"required when {t.key('auth_user')} is set")
    if has_password and not has_user:
        t.problem("auth_user", f"required when {t.key('auth_password_file')} is set")
    if (has_user or has_password) and route.tls is TlsPolicy.NONE and t.valid("tls"):
        t.problem("tls", "cannot be 'none' on a route that authenticates")


def _check_route_site(t: _Table, route: Route, phone: PhoneSection) -> None:
    """Channel phone needs a site that ``[phone.sites]`` defines; other channels none."""
    if route.channel is not Channel.PHONE:
        if t.has("site"):
            t.problem("site", f"only allowed with channel 'phone', not {route.channel.value!r}")
        return
    if not t.has("site"):
        t.problem("site", "required with channel 'phone'")
    elif route.site is not None and route.site not in phone.sites:
        t.problem("site", f"no such site in [phone.sites]: {route.site!r}")


def _read_metrics(t: _Table) -> MetricsSection:
    return MetricsSection(listen=t.get("listen", _endpoint, None))


def _read_phone(t: _Table, paths: _Paths, hostname: str) -> PhoneSection:
    answer = t.get_list("answer", _answer_transport, (), "transports")
    default_name = hostname.split(".", 1)[0]
    own_name = t.get("name", _site_name, default_name if _is_site_name(default_name) else "relay")
    sites_table = t.table("sites")
    sites: dict[str, PhoneSite] = {}
    for name, value in sites_table.data.items():
        sites_table.known.add(name)
        site = _read_site(sites_table, name, value, paths)
        if site is not None:
            sites[name] = site
    modem_init = (
        t.get_list("modem_init", _any_string, (), "AT commands") if t.has("modem_init") else None
    )
    lock_dir = t.get("lock_dir", paths.path, Path("/var/lock"))
    handshake_timeout = t.get("handshake_timeout", _positive_duration, 60.0)
    return PhoneSection(
        answer, MappingProxyType(sites), own_name, modem_init, lock_dir, handshake_timeout
    )


def _read_site(sites: _Table, name: str, value: object, paths: _Paths) -> PhoneSite | None:
    if not _is_site_name(name):
        sites.problem(name, f"not a valid site name (use {_SITE_RULE})")
        return None
    if not isinstance(value, dict):
        sites.problem(name, str(_expected("a table", value)))
        return None
    t = _Table(value, sites.key(name), sites.problems)
    site = PhoneSite(
        name=name,
        secret_file=t.require("secret_file", paths.file, paths.base),
        transport=t.get("transport", _site_transport, None),
        dial=t.get("dial", _string, None),
        chat=t.get_list("chat", _any_string, (), "strings"),
        schedule=_poll_interval(t),
        login=t.get("login", _site_name, None),
        poll_times=_poll_times(t),
        call_window=t.get("call_window", _time_window, None),
        gather_delay=t.get("gather_delay", _duration, 30.0),
        max_call_time=t.get("max_call_time", _positive_duration, 3600.0),
        compression=t.get("compression", _boolean, True),
        encryption=t.get("encryption", _boolean, False),
        max_message_size=t.get("max_message_size", _positive_int, None),
    )
    _check_site(t, site)
    t.finish()
    return site


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


def _poll_interval(t: _Table) -> float | None:
    """``poll`` as a duration (or the older ``schedule``); None for times of day."""
    if t.has("poll") and t.has("schedule"):
        t.problem("schedule", "give poll or schedule, not both")
    if t.has("poll") and not isinstance(t.data.get("poll"), list):
        return t.get("poll", _positive_duration, None)
    return t.get("schedule", _positive_duration, None)


def _poll_times(t: _Table) -> tuple[int, ...]:
    """``poll`` as a list of times of day, sorted."""
    if not isinstance(t.data.get("poll"), list):
        return ()
    return tuple(sorted(set(t.get_list("poll", _time_of_day, (), "times of day"))))


def _check_site(t: _Table, site: PhoneSite) -> None:
    """Dialling needs a serial line; a schedule or chat script needs some transport."""
    if not t.valid("transport"):
        return
    if t.has("dial") and not isinstance(site.transport, SerialTransport):
        t.problem("dial", "needs a serial transport")
    for key in ("chat", "schedule", "poll", "call_window"):
        if t.has(key) and site.transport is None:
            t.problem(key, "needs a transport (a site without one only calls in)")

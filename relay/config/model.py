"""The configuration's model: frozen, typed sections, and :class:`Config` holding them.

Each section is a frozen dataclass (with slots) whose field defaults *are* the built-in
defaults: the reader (:mod:`relay.config.sections`) falls back on them for a key the
file leaves out, code that needs a default without a configuration (a test, a
constructor's keyword) takes it from here, and ``tests/test_config.py`` checks that
``relay/default.toml`` states the same values.  A field without a default is required
(``[relay] hostname``) or derived from another when absent (``local_domains`` and
``postmaster`` from the host name), as its section's docstring says.  The SMTP engine's
own limits (:class:`relay.sansio.smtp.server.Limits`) and RFC 5321's line length
(:data:`relay.sansio.smtp.wire.MAX_TEXT_LINE`) are taken from the engine, which cannot
import the configuration.

Values here are finished: durations in seconds, absolute paths, ``ipaddress`` networks,
enums, transports as small classes.  Nothing here reads a file or parses a string;
that is :mod:`relay.config.values` and :mod:`relay.config.reader`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relay.sansio.phone import defaults as phone_defaults
from relay.sansio.smtp.server import Limits
from relay.sansio.smtp.wire import MAX_TEXT_LINE

__all__ = [
    "Channel",
    "Config",
    "DeliverSection",
    "IPNetwork",
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
    "domain_matches",
    "field_default",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
_ENGINE_LIMITS = Limits()


def field_default(section: type[Any], name: str) -> Any:
    """The default of field ``name`` of the dataclass ``section``.

    For a section that cannot be built empty (:class:`PhoneSite`, :class:`RelaySection`
    have required fields) this is how other code names one of its defaults without
    spelling the value again.  KeyError if the field has no default.
    """
    for item in dataclasses.fields(section):
        if item.name != name:
            continue
        if item.default is not dataclasses.MISSING:
            return item.default
        if item.default_factory is not dataclasses.MISSING:
            return item.default_factory()
        break
    raise KeyError(f"{section.__name__}.{name} has no default")


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
    """``[relay]``: who this relay is and where it keeps its queue.

    ``hostname`` is required; ``local_domains`` defaults to ``(hostname,)`` and
    ``postmaster`` to ``postmaster@`` the first local domain, so neither has a field
    default.  Relative paths are relative to the configuration file's directory.
    """

    hostname: str
    local_domains: tuple[str, ...]
    postmaster: str
    spool: Path = Path("var/spool")
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
    line_length_limit: int = MAX_TEXT_LINE
    dns_servers: tuple[tuple[str, int], ...] = ()
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DeliverSection:
    """``[deliver]``: retry schedule and concurrency of the deliverer (times in seconds)."""

    retry_min: float = 300.0
    retry_max: float = 4200.0
    warn_after: float = 4 * 3600.0
    give_up_after: float = 5 * 86400.0
    concurrency_per_destination: int = 20
    initial_destination_concurrency: int = 5
    concurrency_total: int = 100
    recipients_per_transaction: int = 50
    dead_host_delay: float = 600.0


@dataclass(frozen=True, slots=True)
class LocalSection:
    """``[local]``: the local mailboxes (``mail_root`` relative to the file's directory)."""

    mail_root: Path = Path("var/mail")
    format: MailboxFormat = MailboxFormat.MAILDIR
    users: tuple[str, ...] = ()
    mailboxes: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    aliases: Path | None = None
    recipient_delimiter: str = "+"
    system_users: bool = False

    def mailbox_path(self, user: str) -> Path:
        """Where ``user``'s mail goes: its ``[local.mailboxes]`` entry, else mail_root/user."""
        return self.mailboxes.get(user, self.mail_root / user)


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[route]]``: mail for ``domain`` goes to ``channel``."""

    domain: str
    channel: Channel = Channel.SMTP
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
    compression: bool = phone_defaults.COMPRESSION
    encryption: bool = phone_defaults.ENCRYPTION
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
    handshake_timeout: float = phone_defaults.HANDSHAKE_TIMEOUT  # then a silent peer is dropped


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

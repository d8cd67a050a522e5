"""The events of both SMTP engines: small frozen values, validated when made.

One vocabulary for both directions, as in h11: the command the client engine is given
to send is the very event the server engine returns after parsing it, so the two
engines can be wired back to back.

* **Commands**: :class:`Helo`, :class:`Ehlo`, :class:`MailFrom`, :class:`RcptTo`,
  :class:`Data`, :class:`Bdat`, :class:`Rset`, :class:`Noop`, :class:`Quit`,
  :class:`Vrfy`, :class:`Help`, :class:`StartTls`, :class:`Auth`, and the SASL
  :class:`AuthResponse` lines after a 334.  The server engine returns those that need
  a decision it cannot make (MAIL, RCPT, STARTTLS) and answers the others itself.
* **Message text**: :class:`MessageData` pieces (unstuffed, CRLF line ends), then
  :class:`EndOfMessage`; the client engine stuffs and ends them, the server engine
  unstuffs and counts them.  BDAT chunks carry :class:`MessageData` too.
* **Server side only**: :class:`Respond` (the engine answered a command itself),
  :class:`AuthCredentials` (a SASL exchange finished), and what the adapter sends
  besides a reply: :class:`Greeting`, :class:`Refuse`, :class:`Shutdown`.
* **Client side only**: :class:`ServerReply` (a reply matched to the command it
  answers) and :class:`ConnectionClosed`.

The errors and sentinels (``NEED_DATA``, ``PAUSED``, ``CLOSED``) are
:mod:`relay.sansio.smtp.errors`'; they are re-exported here for the adapters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.address import Address
from relay.envelope import BodyType
from relay.sansio.smtp.errors import CLOSED, NEED_DATA, PAUSED, Sentinel
from relay.sansio.smtp.wire import SmtpReply

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "Auth",
    "AuthCredentials",
    "AuthResponse",
    "Bdat",
    "Command",
    "CommandEvent",
    "ConnectionClosed",
    "Data",
    "Ehlo",
    "EndOfMessage",
    "Event",
    "Greeting",
    "Helo",
    "Help",
    "MailFrom",
    "MessageData",
    "Noop",
    "Quit",
    "RcptTo",
    "Refuse",
    "Respond",
    "Rset",
    "Sentinel",
    "ServerReply",
    "Shutdown",
    "StartTls",
    "Vrfy",
]


# --- commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Helo:
    """``HELO name``: a plain SMTP session (no extensions)."""

    name: str


@dataclass(frozen=True, slots=True)
class Ehlo:
    """``EHLO name``: an ESMTP session."""

    name: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM:<path>`` with its parameters.

    ``reverse_path`` is None for the null sender ``<>``; ``size`` the SIZE declared;
    ``auth`` the xtext-decoded AUTH= parameter (RFC 4954); ``env_id`` the DSN ENVID
    (RFC 3461).  The client engine sends a parameter only if the server offered its
    extension; the server engine checks SIZE against its limit and keeps AUTH= (nothing
    uses it yet).
    """

    reverse_path: Address | None
    size: int | None = None
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    auth: str | None = None
    env_id: str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ValueError("SIZE cannot be negative")


@dataclass(frozen=True, slots=True)
class RcptTo:
    """``RCPT TO:<path>``; ``original`` is sent as ORCPT when the server offers DSN."""

    address: Address
    original: str | None = None


@dataclass(frozen=True, slots=True)
class Data:
    """``DATA``."""


@dataclass(frozen=True, slots=True)
class Bdat:
    """``BDAT size [LAST]`` (RFC 3030 CHUNKING): exactly ``size`` octets follow at once."""

    size: int
    last: bool

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("BDAT size cannot be negative")


@dataclass(frozen=True, slots=True)
class Rset:
    """``RSET``: abandon the transaction."""


@dataclass(frozen=True, slots=True)
class Noop:
    """``NOOP``."""


@dataclass(frozen=True, slots=True)
class Quit:
    """``QUIT``."""


@dataclass(frozen=True, slots=True)
class Vrfy:
    """``VRFY``: answered 252 (never confirms a user: no address harvesting)."""

    argument: str


@dataclass(frozen=True, slots=True)
class Help:
    """``HELP``."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """``STARTTLS``: the server's adapter answers 220 and starts the TLS handshake."""


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH mechanism [initial-response]``, the response decoded (base64 is the wire's).

    ``initial`` None: no initial response; ``b""``: an empty one (``=`` on the wire,
    RFC 4954 section 4).  The mechanism is upper-case.
    """

    mechanism: str
    initial: bytes | None = None

    def __post_init__(self) -> None:
        if not self.mechanism or self.mechanism != self.mechanism.upper():
            raise ValueError(f"not an upper-case SASL mechanism: {self.mechanism!r}")

    def __repr__(self) -> str:
        """Never show the initial response: it holds a password for PLAIN."""
        return f"Auth(mechanism={self.mechanism!r})"


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One SASL response line after a 334; None cancels the exchange (``*``)."""

    data: bytes | None

    def __repr__(self) -> str:
        """Never show the response: it may be a password."""
        return "AuthResponse(...)"


CommandEvent = (
    Helo
    | Ehlo
    | MailFrom
    | RcptTo
    | Data
    | Bdat
    | Rset
    | Noop
    | Quit
    | Vrfy
    | Help
    | StartTls
    | Auth
)
"""A command line, parsed (the server engine's table columns for commands)."""


# --- message text ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of the message text: unstuffed, CRLF line ends, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The text ended cleanly.

    From the server engine, ``size`` is the octets of text it counted: the adapter
    stores the message and sends the final reply.  Given to the client engine, the
    size is not looked at (the engine ends the last line and sends ``.``).
    """

    size: int = 0


# --- server side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Respond:
    """The engine answered a command (or input) itself: the adapter sends ``reply``."""

    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class AuthCredentials:
    """A SASL exchange finished: check the password; answer 235 or 535."""

    mechanism: str
    username: str
    password: str = ""
    authzid: str = ""

    def __repr__(self) -> str:
        """Never show the password (events end up in logs and test output)."""
        return f"AuthCredentials(mechanism={self.mechanism!r}, username={self.username!r})"


@dataclass(frozen=True, slots=True)
class Greeting:
    """Send the 220 greeting: the session starts."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse the session at connect (too many sessions): the reply, then close."""

    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class Shutdown:
    """End the session unasked (timeout, server stopping): a 421 reply, then close."""

    reply: SmtpReply


Event = Respond | MailFrom | RcptTo | StartTls | MessageData | EndOfMessage | AuthCredentials
"""What the server engine's ``next_event`` returns besides a sentinel."""


# --- client side ----------------------------------------------------------------------


class Command(enum.Enum):
    """What a reply answers, as the client engine matches replies to commands."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    END_OF_DATA = "end of data"
    BDAT = "BDAT"
    BDAT_LAST = "BDAT LAST"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


@dataclass(frozen=True, slots=True)
class ServerReply:
    """The server's reply to ``command`` (None: a 421 nobody asked for, e.g. idle timeout)."""

    command: Command | None
    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The stream ended; ``unanswered`` are the commands that never got a reply."""

    unanswered: tuple[Command, ...]

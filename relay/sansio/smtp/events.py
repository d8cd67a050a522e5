"""The events of the SMTP server engine: small frozen values, validated when made.

Three families, by direction:

* **Commands** (client to server), what :meth:`ServerConnection.next_event` returns after
  parsing a line: :class:`Helo`, :class:`Ehlo`, :class:`MailFrom`, :class:`RcptTo`,
  :class:`Data`, :class:`Rset`, :class:`Noop`, :class:`Quit`, :class:`Vrfy`,
  :class:`Help`, :class:`StartTls`, :class:`Auth`.  Their classes are the columns of
  the transition table; a verb the engine does not know never becomes an event (it is
  answered 500 or 502 at once).
* **What the engine asks the adapter** (also from ``next_event``): the commands that
  need a decision the engine cannot make (:class:`MailFrom`, :class:`RcptTo`,
  :class:`StartTls`), the message text (:class:`MessageData`, then
  :class:`EndOfMessage`), SASL credentials (:class:`AuthCredentials`), and
  :class:`Respond` for every command the engine answered itself.  Each of these except
  :class:`MessageData` pauses the engine until the adapter sends a reply.
* **What the adapter sends** (``send``): :class:`Greeting`, :class:`Refuse`,
  :class:`Shutdown`, or an :class:`~relay.sansio.smtp.wire.SmtpReply` answering the
  pending event.

``NEED_DATA`` and ``PAUSED`` are sentinels, as in h11: the engine needs more bytes, or
waits for the reply to the event it returned last.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.address import Address
from relay.envelope import BodyType
from relay.sansio.smtp.wire import SmtpReply

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Auth",
    "AuthCredentials",
    "Bdat",
    "Command",
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
    "Shutdown",
    "StartTls",
    "Vrfy",
]


class Sentinel(enum.Enum):
    """What ``next_event`` returns when it has no event."""

    NEED_DATA = "need-data"
    PAUSED = "paused"


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


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
    """``MAIL FROM:<path>`` with its parameters, checked and decoded.

    ``reverse_path`` is None for the null sender ``<>``; ``size`` is the SIZE the client
    declared (already checked against the limit); ``auth`` the xtext-decoded AUTH=
    parameter (RFC 4954), validated and kept; nothing uses it yet.
    """

    reverse_path: Address | None
    size: int | None = None
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    auth: str | None = None


@dataclass(frozen=True, slots=True)
class RcptTo:
    """``RCPT TO:<path>``: one recipient, for the adapter's policy to accept or refuse."""

    address: Address


@dataclass(frozen=True, slots=True)
class Data:
    """``DATA``."""


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
    """``STARTTLS``: the adapter answers 220 and starts the TLS handshake."""


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH mechanism [initial-response]`` (the response still base64)."""

    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class Bdat:
    """``BDAT size [LAST]`` (RFC 3030 CHUNKING): exactly ``size`` octets follow at once."""

    size: int
    last: bool


Command = (
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


# --- from the engine to the adapter ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Respond:
    """The engine answered a command (or input) itself: the adapter sends ``reply``."""

    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of the message text: unstuffed, CRLF line ends, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The text ended cleanly: the adapter stores the message and sends the final reply."""

    size: int


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


# --- from the adapter to the engine ---------------------------------------------------


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

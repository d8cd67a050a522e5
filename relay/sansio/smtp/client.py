"""The ESMTP client engine: what the SMTP channel may send, and what the server's replies mean.

Theory of operation
-------------------
No I/O: the adapter (:mod:`relay.channels.smtp.protocol`) gives the engine the server's
bytes (:meth:`SmtpClient.receive_data`, ``b""`` at end of stream), takes events out
(:meth:`SmtpClient.next_event`) and turns the commands it wants to send into bytes
(:meth:`SmtpClient.send`).  Formatting, reply parsing and dot-stuffing are
:mod:`relay.sansio.smtp.wire`'s, shared with the server engine; so is breaking text
lines longer than 998 octets (or the configured limit), which the server engine takes
whole but RFC 5321 section 4.5.3.1.6 does not let us send.

Two things move the engine:

* **What we send.**  :data:`SEND_TRANSITIONS` maps (state, event class) to the next
  state; a missing entry is a :class:`LocalProtocolError` (the channel asked for
  something SMTP does not allow now).  Every command is also appended to the queue of
  commands awaiting a reply.  Without PIPELINING a command may only be sent when no
  reply is outstanding; with it (RFC 2920), MAIL, RCPT and RSET may be followed by
  more commands, and DATA, the end of the text, EHLO, STARTTLS, AUTH, NOOP and QUIT end
  a group (nothing goes out after them until their reply came back).
* **What the server answers.**  Replies are matched to the queue in order and come out
  as :class:`ServerReply` events naming the command they answer.  Most replies leave
  the state alone (a refused RCPT is the channel's business, not the protocol's); the
  ones that change what may be sent next are in :data:`REPLY_TRANSITIONS`, keyed by
  (state, command, reply class).  A reply the table does not expect (354 to RCPT, a
  reply nobody asked for) is a :class:`RemoteProtocolError`.  So is any malformed
  reply (:class:`~relay.sansio.smtp.wire.ReplyParser` is strict), and any byte that
  arrives after the 220 to STARTTLS and before the handshake (RFC 3207 §5: such bytes
  were sent before TLS and must not be trusted: the CVE-2011-0411 injection).

A ``421`` answering any command means the server is going away: the engine moves to
``CLOSED`` and the commands still queued will never be answered
(:attr:`SmtpClient.unanswered`).  The end of the stream gives one
:class:`ConnectionClosed` event carrying the commands left unanswered.

After a :class:`RemoteProtocolError` the engine is broken (state ``ERROR``): every later
``next_event`` raises the same error, since nothing after garbage can be trusted.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from relay.address import Address
from relay.envelope import BodyType

# The field-less commands are the same events in both directions (as in h11): the
# client sends what the server engine receives.
from relay.sansio.smtp.events import Data, Noop, Quit, Rset
from relay.sansio.smtp.wire import (
    MAX_AUTH_LINE,
    MAX_TEXT_LINE,
    DotStuffer,
    ReplyParser,
    SmtpReply,
    WireError,
    check_line_length_limit,
    format_command,
    format_parameters,
    parse_ehlo_reply,
    xtext_encode,
)

__all__ = [
    "NEED_DATA",
    "REPLY_TRANSITIONS",
    "SEND_TRANSITIONS",
    "Auth",
    "AuthResponse",
    "ClientEvent",
    "ClientState",
    "Command",
    "ConnectionClosed",
    "Data",
    "Ehlo",
    "EndOfText",
    "Helo",
    "LocalProtocolError",
    "MailFrom",
    "Noop",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "ReplyKind",
    "Rset",
    "ServerReply",
    "SmtpClient",
    "StartTls",
    "TextChunk",
    "decode_challenge",
]

MAX_ENVELOPE_LINE: Final = 2048
"""Octets in a MAIL or RCPT line we send: 512 plus room for ESMTP parameters (RFC 5321
§4.5.3.1.4 lets extensions lengthen the line; Postfix accepts 2048)."""


class LocalProtocolError(Exception):
    """We asked the engine for something SMTP does not allow now (a defect of the caller)."""


class RemoteProtocolError(Exception):
    """The server broke the protocol (garbage, an unexpected reply, bytes before TLS)."""


class NeedData(enum.Enum):
    """What ``next_event`` returns when it has no event: feed it more bytes."""

    NEED_DATA = "need-data"


NEED_DATA: Final = NeedData.NEED_DATA


class ClientState(enum.Enum):
    """Where the session stands, as far as what we may send next."""

    GREETING = "greeting"  # connected, waiting for the 220
    REFUSED = "refused"  # the greeting was 4xx/5xx: only QUIT
    HELLO = "hello"  # may send EHLO or HELO (after the greeting, a failed EHLO, or TLS)
    HELLO_SENT = "hello-sent"
    READY = "ready"  # between transactions
    STARTTLS_SENT = "starttls-sent"
    TLS_HANDSHAKE = "tls-handshake"  # 220 to STARTTLS: the adapter runs the handshake
    AUTH = "auth"  # AUTH (or a SASL response) sent
    AUTH_CHALLENGE = "auth-challenge"  # 334: send the next SASL response
    MAIL = "mail"  # MAIL sent: RCPT next
    RCPT = "rcpt"  # at least one RCPT sent
    DATA_SENT = "data-sent"  # waiting for 354
    TEXT = "text"  # 354 came: the text, then its end
    END_OF_TEXT = "end-of-text"  # waiting for the final reply
    QUIT_SENT = "quit-sent"
    CLOSED = "closed"  # 421, the end of the stream, or after QUIT
    ERROR = "error"  # the server broke the protocol


class Command(enum.Enum):
    """What a reply answers."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    END_OF_DATA = "end of data"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


class ReplyKind(enum.Enum):
    """The class of a reply code: what :data:`REPLY_TRANSITIONS` is keyed on."""

    POSITIVE = 2
    INTERMEDIATE = 3
    NEGATIVE = 4  # 4xx and 5xx alike: the protocol moves the same way

    @classmethod
    def of(cls, reply: SmtpReply) -> ReplyKind:
        """The kind of ``reply``."""
        return cls(min(reply.code // 100, 4))


# --- events we send -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ehlo:
    """``EHLO hostname``."""

    hostname: str


@dataclass(frozen=True, slots=True)
class Helo:
    """``HELO hostname`` (after a refused EHLO)."""

    hostname: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """``STARTTLS``."""


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH mechanism [initial-response]``; the response is raw and gets base64 here.

    ``initial`` None sends no initial response; ``b""`` sends ``=`` (RFC 4954 §4).
    """

    mechanism: str
    initial: bytes | None = None

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


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM:<path>`` with the parameters the server offered and the text needs.

    ``reverse_path`` None is the null sender ``<>``.  Each parameter needs its
    extension (SIZE, 8BITMIME, SMTPUTF8, DSN for ENVID); the engine refuses to send one
    the server did not offer.
    """

    reverse_path: Address | None
    size: int | None = None
    body: BodyType | None = None
    smtputf8: bool = False
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
class TextChunk:
    """A piece of the message text (CRLF lines, not stuffed: the engine stuffs it)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfText:
    """The end of the text: the engine ends the last line and sends ``.``."""


ClientEvent = (
    Ehlo
    | Helo
    | StartTls
    | Auth
    | AuthResponse
    | MailFrom
    | RcptTo
    | Data
    | TextChunk
    | EndOfText
    | Rset
    | Noop
    | Quit
)

# --- events we receive ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerReply:
    """The server's reply to ``command`` (None: a 421 nobody asked for, e.g. idle timeout)."""

    command: Command | None
    reply: SmtpReply


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The stream ended; ``unanswered`` are the commands that never got a reply."""

    unanswered: tuple[Command, ...]


# --- the tables ----------------------------------------------------------------------

S = ClientState
_BEFORE_MAIL = (S.HELLO, S.READY, S.REFUSED)

SEND_TRANSITIONS: Final[Mapping[tuple[ClientState, type], ClientState]] = {
    (S.HELLO, Ehlo): S.HELLO_SENT,
    (S.HELLO, Helo): S.HELLO_SENT,
    (S.READY, Ehlo): S.HELLO_SENT,
    (S.READY, StartTls): S.STARTTLS_SENT,
    (S.READY, Auth): S.AUTH,
    (S.AUTH_CHALLENGE, AuthResponse): S.AUTH,
    (S.READY, MailFrom): S.MAIL,
    (S.MAIL, RcptTo): S.RCPT,
    (S.RCPT, RcptTo): S.RCPT,
    (S.RCPT, Data): S.DATA_SENT,
    (S.TEXT, TextChunk): S.TEXT,
    (S.TEXT, EndOfText): S.END_OF_TEXT,
    (S.READY, Rset): S.READY,
    (S.MAIL, Rset): S.READY,
    (S.RCPT, Rset): S.READY,
    (S.READY, Noop): S.READY,
    (S.HELLO, Noop): S.HELLO,
    **{(state, Quit): S.QUIT_SENT for state in (*_BEFORE_MAIL, S.MAIL, S.RCPT)},
}
"""(state, what we send) -> next state.  Anything else is a LocalProtocolError."""

_P, _I, _N = ReplyKind.POSITIVE, ReplyKind.INTERMEDIATE, ReplyKind.NEGATIVE
_ANY: Final = (_P, _I, _N)

REPLY_TRANSITIONS: Final[Mapping[tuple[ClientState, Command, ReplyKind], ClientState]] = {
    (S.GREETING, Command.GREETING, _P): S.HELLO,
    (S.GREETING, Command.GREETING, _N): S.REFUSED,
    (S.HELLO_SENT, Command.EHLO, _P): S.READY,
    (S.HELLO_SENT, Command.EHLO, _N): S.HELLO,
    (S.HELLO_SENT, Command.HELO, _P): S.READY,
    (S.HELLO_SENT, Command.HELO, _N): S.HELLO,
    (S.STARTTLS_SENT, Command.STARTTLS, _P): S.TLS_HANDSHAKE,
    (S.STARTTLS_SENT, Command.STARTTLS, _N): S.READY,
    (S.AUTH, Command.AUTH, _P): S.READY,
    (S.AUTH, Command.AUTH, _I): S.AUTH_CHALLENGE,
    (S.AUTH, Command.AUTH, _N): S.READY,
    (S.DATA_SENT, Command.DATA, _I): S.TEXT,
    (S.DATA_SENT, Command.DATA, _N): S.READY,
    (S.END_OF_TEXT, Command.END_OF_DATA, _P): S.READY,
    (S.END_OF_TEXT, Command.END_OF_DATA, _N): S.READY,
    **{(S.QUIT_SENT, Command.QUIT, kind): S.CLOSED for kind in _ANY},
}
"""(state, command answered, reply class) -> next state, for the replies that move it.

Replies to MAIL, RCPT, RSET and NOOP never move the state (with pipelining the state
has moved on already), but they must be 2xx, 4xx or 5xx.
"""

_STATELESS: Final = frozenset({Command.MAIL, Command.RCPT, Command.RSET, Command.NOOP})
_PIPELINABLE: Final = frozenset({Command.MAIL, Command.RCPT, Command.RSET})
"""Commands that may be followed by more commands before their reply (RFC 2920 §3.1)."""

_COMMAND_OF: Final[Mapping[type, Command]] = {
    Ehlo: Command.EHLO,
    Helo: Command.HELO,
    StartTls: Command.STARTTLS,
    Auth: Command.AUTH,
    AuthResponse: Command.AUTH,
    MailFrom: Command.MAIL,
    RcptTo: Command.RCPT,
    Data: Command.DATA,
    EndOfText: Command.END_OF_DATA,
    Rset: Command.RSET,
    Noop: Command.NOOP,
    Quit: Command.QUIT,
}


class SmtpClient:
    """One client connection's protocol state.  See the module docstring."""

    def __init__(self, *, line_length_limit: int = MAX_TEXT_LINE) -> None:
        """``line_length_limit``: text lines longer than this are broken as Postfix's
        ``smtp_line_length_limit`` breaks them (see :class:`~.wire.DotStuffer`); 0 never."""
        self._line_length_limit = check_line_length_limit(line_length_limit)
        self._state = ClientState.GREETING
        self._parser = ReplyParser()
        self._replies: deque[SmtpReply] = deque()
        self._pending: deque[Command] = deque([Command.GREETING])
        self._stuffer: DotStuffer | None = None
        self._error: RemoteProtocolError | None = None
        self._closed_seen = False
        self._eof = False
        self._extensions: dict[str, tuple[str, ...]] = {}
        self._server_name = ""
        self._esmtp = False
        self._smtputf8 = False  # the current transaction's MAIL asked for SMTPUTF8

    # --- what the adapter reads ---------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The current state."""
        return self._state

    @property
    def unanswered(self) -> tuple[Command, ...]:
        """Commands sent whose replies have not come (in order)."""
        return tuple(self._pending)

    @property
    def extensions(self) -> Mapping[str, tuple[str, ...]]:
        """The extensions of the last EHLO reply (upper-case keywords); empty after HELO."""
        return dict(self._extensions)

    @property
    def server_name(self) -> str:
        """The name the server gave in its EHLO/HELO reply."""
        return self._server_name

    @property
    def esmtp(self) -> bool:
        """Whether the server answered EHLO (extensions may be used)."""
        return self._esmtp

    def offers(self, keyword: str) -> bool:
        """Whether the last EHLO reply listed ``keyword``."""
        return keyword.upper() in self._extensions

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE limit (RFC 1870); None if unknown or unlimited (``SIZE 0``)."""
        values = self._extensions.get("SIZE")
        if not values or not values[0].isdigit():
            return None
        limit = int(values[0])
        return limit or None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms the server offered, upper-case."""
        return frozenset(m.upper() for m in self._extensions.get("AUTH", ()))

    # --- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the server; ``b""`` means the stream ended."""
        if self._error is not None or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._state is ClientState.TLS_HANDSHAKE:
            self._fail("data received after the 220 to STARTTLS, before TLS (injection?)")
            return
        if self._state is ClientState.CLOSED:
            return  # after QUIT's reply or a 421, whatever follows is ignored
        try:
            self._replies.extend(self._parser.feed(data))
        except (WireError, ValueError) as e:
            # replies completed earlier are still delivered, then the error
            self._fail(f"malformed reply: {e}", keep_queued=True)

    def next_event(self) -> ServerReply | ConnectionClosed | NeedData:
        """The next event, or NEED_DATA; raises :class:`RemoteProtocolError` when broken."""
        if self._error is not None and not self._replies:
            self._state = ClientState.ERROR
            raise self._error
        if self._replies:
            return self._match(self._replies.popleft())
        if self._eof and not self._closed_seen:
            self._closed_seen = True
            unanswered = tuple(self._pending)
            self._pending.clear()
            self._state = ClientState.CLOSED
            return ConnectionClosed(unanswered)
        return NEED_DATA

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake: start again from EHLO (RFC 3207 §4.2)."""
        if self._state is not ClientState.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started() in state {self._state.name}")
        self._state = ClientState.HELLO
        self._extensions = {}
        self._esmtp = False
        self._parser = ReplyParser()

    # --- output ---------------------------------------------------------------------

    def send(self, event: ClientEvent) -> bytes:
        """The bytes for ``event``; raises :class:`LocalProtocolError` if not allowed now."""
        new_state = SEND_TRANSITIONS.get((self._state, type(event)))
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self._state.name}"
            )
        command = _COMMAND_OF.get(type(event))
        if command is not None:
            self._check_pipelining(command)
        data = self._encode(event)
        if command is not None:
            self._pending.append(command)
        self._state = new_state
        return data

    def may_send_now(self, event: ClientEvent) -> bool:
        """Whether the pipelining rules allow ``event`` now (``send`` also checks the state).

        False means "wait for the outstanding replies first": the adapter queues it.
        """
        command = _COMMAND_OF.get(type(event))
        return command is None or self._pipelining_problem(command) is None

    def _check_pipelining(self, command: Command) -> None:
        problem = self._pipelining_problem(command)
        if problem is not None:
            raise LocalProtocolError(problem)

    def _pipelining_problem(self, command: Command) -> str | None:
        if not self._pending:
            return None
        if not self.offers("PIPELINING"):
            return (
                f"{command.value} before the reply to {self._pending[-1].value} "
                "(the server does not offer PIPELINING)"
            )
        if any(c not in _PIPELINABLE for c in self._pending):
            return (
                f"{command.value} before the reply to {self._pending[-1].value}, "
                "which ends a pipelined group (RFC 2920)"
            )
        return None

    def _encode(self, event: ClientEvent) -> bytes:
        try:
            return self._format(event)
        except ValueError as e:
            raise LocalProtocolError(str(e)) from e

    def _format(self, event: ClientEvent) -> bytes:
        match event:
            case Ehlo(hostname) | Helo(hostname):
                _check_hostname(hostname)
                return format_command("EHLO" if isinstance(event, Ehlo) else "HELO", hostname)
            case StartTls():
                self._need("STARTTLS")
                return format_command("STARTTLS")
            case Auth(mechanism, initial):
                if mechanism.upper() not in self.auth_mechanisms:
                    raise LocalProtocolError(f"the server does not offer AUTH {mechanism}")
                arg = mechanism if initial is None else f"{mechanism} {_b64(initial) or '='}"
                return format_command("AUTH", arg, limit=MAX_AUTH_LINE)
            case AuthResponse(data):
                line = "*" if data is None else _b64(data)
                return (line + "\r\n").encode("ascii")  # base64 or "*": no room for CR/LF
            case MailFrom():
                return self._mail(event)
            case RcptTo(address, original):
                params: dict[str, str | None] = {}
                if original is not None and self.offers("DSN") and original.isascii():
                    params["ORCPT"] = "rfc822;" + xtext_encode(original)
                self._check_address(address)
                arg = f"TO:{_path(address)}{format_parameters(params)}"
                return format_command("RCPT", arg, limit=MAX_ENVELOPE_LINE)
            case Data():
                return format_command("DATA")
            case TextChunk(data):
                if self._stuffer is None:
                    raise LocalProtocolError("text before the 354 reply")
                return self._stuffer.feed(data)
            case EndOfText():
                if self._stuffer is None:
                    raise LocalProtocolError("end of text before the 354 reply")
                stuffer, self._stuffer = self._stuffer, None
                return stuffer.finish()
            case Rset():
                return format_command("RSET")
            case Noop():
                return format_command("NOOP")
            case Quit():
                return format_command("QUIT")
        raise LocalProtocolError(f"not a client event: {event!r}")  # pragma: no cover

    def _mail(self, event: MailFrom) -> bytes:
        params: dict[str, str | None] = {}
        if event.size is not None:
            self._need("SIZE")
            params["SIZE"] = str(event.size)
        if event.body is not None and event.body is not BodyType.SEVEN_BIT:
            self._need("BINARYMIME" if event.body is BodyType.BINARY_MIME else "8BITMIME")
            params["BODY"] = event.body.value
        if event.smtputf8:
            self._need("SMTPUTF8")
            params["SMTPUTF8"] = None
        if event.env_id is not None:
            self._need("DSN")
            params["ENVID"] = xtext_encode(event.env_id)
        self._smtputf8 = event.smtputf8
        if event.reverse_path is not None:
            self._check_address(event.reverse_path)
        path = "<>" if event.reverse_path is None else _path(event.reverse_path)
        return format_command(
            "MAIL", f"FROM:{path}{format_parameters(params)}", limit=MAX_ENVELOPE_LINE
        )

    def _check_address(self, address: Address) -> None:
        if address.needs_smtputf8 and not self._smtputf8:
            raise LocalProtocolError(f"{address} needs SMTPUTF8, not requested in MAIL FROM")

    def _need(self, keyword: str) -> None:
        if not self.offers(keyword):
            raise LocalProtocolError(f"the server does not offer {keyword}")

    # --- replies ----------------------------------------------------------------------

    def _match(self, reply: SmtpReply) -> ServerReply:
        if not self._pending:
            if reply.code == 421:
                self._state = ClientState.CLOSED
                return ServerReply(None, reply)
            raise self._fail(f"reply nobody asked for: {reply}")
        command = self._pending.popleft()
        kind = ReplyKind.of(reply)
        if reply.code == 421 and command is not Command.QUIT:
            self._state = ClientState.CLOSED
            return ServerReply(command, reply)
        new_state = REPLY_TRANSITIONS.get((self._state, command, kind))
        if new_state is not None:
            self._state = new_state
        elif command not in _STATELESS or kind is ReplyKind.INTERMEDIATE:
            raise self._fail(f"unexpected reply to {command.value}: {reply}")
        self._after(command, reply)
        return ServerReply(command, reply)

    def _after(self, command: Command, reply: SmtpReply) -> None:
        """Side effects of a reply: extensions, the stuffer, the STARTTLS check."""
        if command in (Command.EHLO, Command.HELO) and reply.code // 100 == 2:
            if command is Command.EHLO:
                try:
                    self._server_name, self._extensions = parse_ehlo_reply(reply)
                except WireError as e:
                    raise self._fail(f"bad EHLO reply: {e}") from None
                self._esmtp = True
            else:
                words = reply.lines[0].split()
                self._server_name = words[0] if words else ""
                self._extensions, self._esmtp = {}, False
        elif command is Command.DATA and self._state is ClientState.TEXT:
            self._stuffer = DotStuffer(self._line_length_limit)
        elif (
            command is Command.STARTTLS
            and self._state is ClientState.TLS_HANDSHAKE
            and (self._replies or self._parser.has_partial)
        ):
            raise self._fail("data after the 220 to STARTTLS, before TLS (injection?)")

    def _fail(self, why: str, *, keep_queued: bool = False) -> RemoteProtocolError:
        self._error = RemoteProtocolError(why)
        if not keep_queued:
            self._state = ClientState.ERROR
            self._replies.clear()
        return self._error


def _path(address: Address) -> str:
    """The path as sent: never a source route (RFC 5321 §3.3: SHOULD NOT be sent)."""
    return f"<{address}>"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_hostname(hostname: str) -> None:
    if not hostname or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in hostname):
        raise LocalProtocolError(f"not a host name for EHLO/HELO: {hostname!r}")


def decode_challenge(reply: SmtpReply) -> bytes:
    """The SASL challenge of a 334 reply, decoded; RemoteProtocolError if not base64."""
    text = reply.lines[0].strip()
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RemoteProtocolError(f"334 challenge is not base64: {text[:40]!r}") from None

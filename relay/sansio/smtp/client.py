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

The events are :mod:`relay.sansio.smtp.events`', the same the server engine returns, and
every state and move is in :data:`~.state.CLIENT_TRANSITIONS`
(:mod:`relay.sansio.smtp.state`).  Two things move the engine:

* **What we send.**  The table maps (state, event class) to the next state; a missing
  entry is a :class:`~.errors.LocalProtocolError` (the channel asked for something SMTP
  does not allow now).  Every command is also appended to the queue of commands
  awaiting a reply.  Without PIPELINING a command may only be sent when no reply is
  outstanding; with it (RFC 2920), MAIL, RCPT, RSET and a BDAT that is not the last
  (RFC 3030) may be followed by more commands, and DATA, the end of the text, BDAT
  LAST, EHLO, STARTTLS, AUTH, NOOP and QUIT end a group (nothing goes out after them
  until their reply came back).
* **What the server answers.**  Replies are matched to the queue in order and come out
  as :class:`ServerReply` events naming the command they answer.  Most replies leave
  the state alone (a refused RCPT is the channel's business, not the protocol's); the
  ones that change what may be sent next are in the table, keyed by (state,
  (command, reply class)).  A reply the table does not expect (354 to RCPT, a
  reply nobody asked for) is a :class:`~.errors.RemoteProtocolError`.  So is any
  malformed reply (:class:`~relay.sansio.smtp.wire.ReplyParser` is strict), and any byte that
  arrives after the 220 to STARTTLS and before the handshake (RFC 3207 §5: such bytes
  were sent before TLS and must not be trusted: the CVE-2011-0411 injection).

A ``421`` answering any command means the server is going away: the engine moves to
``CLOSED`` and the commands still queued will never be answered
(:attr:`SmtpClient.unanswered`).  The end of the stream gives one
:class:`ConnectionClosed` event carrying the commands left unanswered.

**BDAT** (RFC 3030 CHUNKING): :class:`~.events.Bdat` announces a chunk, then its octets
go out as :class:`~.events.MessageData` exactly as given (no stuffing); the state moves
on when the last octet of the chunk has been sent.

After a :class:`~.errors.RemoteProtocolError` the engine is broken (state ``ERROR``):
every later ``next_event`` raises the same error, since nothing after garbage can be trusted.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Mapping
from typing import Final

from relay.address import Address
from relay.envelope import BodyType
from relay.sansio.smtp.errors import NEED_DATA, LocalProtocolError, RemoteProtocolError, Sentinel
from relay.sansio.smtp.events import (
    Auth,
    AuthResponse,
    Bdat,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Rset,
    ServerReply,
    StartTls,
)
from relay.sansio.smtp.state import (
    CLIENT_STATELESS,
    CLIENT_TRANSITIONS,
    ClientInput,
    ClientState,
    ReplyKind,
)
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
    "Auth",
    "AuthResponse",
    "Bdat",
    "ClientEvent",
    "ClientState",
    "Command",
    "ConnectionClosed",
    "Data",
    "Ehlo",
    "EndOfMessage",
    "Helo",
    "LocalProtocolError",
    "MailFrom",
    "MessageData",
    "Noop",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "Rset",
    "ServerReply",
    "SmtpClient",
    "StartTls",
    "decode_challenge",
]

MAX_ENVELOPE_LINE: Final = 2048
"""Octets in a MAIL or RCPT line we send: 512 plus room for ESMTP parameters (RFC 5321
§4.5.3.1.4 lets extensions lengthen the line; Postfix accepts 2048)."""

ClientEvent = (
    Ehlo
    | Helo
    | StartTls
    | Auth
    | AuthResponse
    | MailFrom
    | RcptTo
    | Data
    | Bdat
    | MessageData
    | EndOfMessage
    | Rset
    | Noop
    | Quit
)
"""What the channel may give :meth:`SmtpClient.send`."""

_PIPELINABLE: Final = frozenset({Command.MAIL, Command.RCPT, Command.RSET, Command.BDAT})
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
    EndOfMessage: Command.END_OF_DATA,
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
        self._chunk_left = 0  # octets of the BDAT chunk still to send
        self._chunk_last = False
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

    def next_event(self) -> ServerReply | ConnectionClosed | Sentinel:
        """The next event, or NEED_DATA; raises :class:`RemoteProtocolError` when broken."""
        if self._error is not None and not self._replies:
            self._apply(ClientInput.PROTOCOL_ERROR)
            raise self._error
        if self._replies:
            return self._match(self._replies.popleft())
        if self._eof and not self._closed_seen:
            self._closed_seen = True
            unanswered = tuple(self._pending)
            self._pending.clear()
            self._apply(ClientInput.END_OF_STREAM)
            return ConnectionClosed(unanswered)
        return NEED_DATA

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake: start again from EHLO (RFC 3207 §4.2)."""
        self._apply(ClientInput.TLS_STARTED)
        self._extensions = {}
        self._esmtp = False
        self._parser = ReplyParser()

    # --- output ---------------------------------------------------------------------

    def send(self, event: ClientEvent) -> bytes:
        """The bytes for ``event``; raises :class:`LocalProtocolError` if not allowed now."""
        new_state = CLIENT_TRANSITIONS.get((self._state, type(event)))
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self._state.name}"
            )
        command = self._command_of(event)
        if command is not None:
            self._check_pipelining(command)
        data = self._encode(event)
        if command is not None:
            self._pending.append(command)
        self._state = new_state
        if new_state is ClientState.CHUNK and not self._chunk_left:
            self._apply(ClientInput.LAST_CHUNK_SENT if self._chunk_last else ClientInput.CHUNK_SENT)
        return data

    def _apply(self, key: ClientInput) -> None:
        """A move that is neither an event sent nor an expected reply."""
        new_state = CLIENT_TRANSITIONS.get((self._state, key))
        if new_state is None:
            raise LocalProtocolError(f"{key.name} in state {self._state.name}")
        self._state = new_state

    @staticmethod
    def _command_of(event: ClientEvent) -> Command | None:
        if type(event) is Bdat:
            return Command.BDAT_LAST if event.last else Command.BDAT
        return _COMMAND_OF.get(type(event))

    def may_send_now(self, event: ClientEvent) -> bool:
        """Whether the pipelining rules allow ``event`` now (``send`` also checks the state).

        False means "wait for the outstanding replies first": the adapter queues it.
        """
        command = self._command_of(event)
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
            case MessageData(data) if self._state is ClientState.CHUNK:
                if len(data) > self._chunk_left:
                    raise LocalProtocolError(
                        f"{len(data)} octets for a BDAT chunk of {self._chunk_left} more"
                    )
                self._chunk_left -= len(data)
                return data
            case MessageData(data):
                if self._stuffer is None:
                    raise LocalProtocolError("text before the 354 reply")
                return self._stuffer.feed(data)
            case Bdat(size, last):
                self._need("CHUNKING")
                self._chunk_left, self._chunk_last = size, last
                return format_command("BDAT", f"{size} LAST" if last else str(size))
            case EndOfMessage():
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
        if event.body is not BodyType.SEVEN_BIT:
            self._need("BINARYMIME" if event.body is BodyType.BINARY_MIME else "8BITMIME")
            params["BODY"] = event.body.value
        if event.smtputf8:
            self._need("SMTPUTF8")
            params["SMTPUTF8"] = None
        if event.env_id is not None:
            self._need("DSN")
            params["ENVID"] = xtext_encode(event.env_id)
        if event.auth is not None:
            self._need("AUTH")
            params["AUTH"] = xtext_encode(event.auth)
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
                self._apply(ClientInput.CLOSING_REPLY)
                return ServerReply(None, reply)
            raise self._fail(f"reply nobody asked for: {reply}")
        command = self._pending.popleft()
        kind = ReplyKind.of(reply)
        if reply.code == 421 and command is not Command.QUIT:
            self._apply(ClientInput.CLOSING_REPLY)
            return ServerReply(command, reply)
        new_state = CLIENT_TRANSITIONS.get((self._state, (command, kind)))
        if new_state is not None:
            self._state = new_state
        elif command not in CLIENT_STATELESS or kind is ReplyKind.INTERMEDIATE:
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
            self._apply(ClientInput.PROTOCOL_ERROR)
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

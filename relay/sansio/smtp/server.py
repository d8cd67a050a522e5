"""The SMTP server engine: RFC 5321 ESMTP as a state machine over bytes, with no I/O.

Theory of operation
-------------------
Why not ``twisted.mail.smtp``?  It reads lines with ``LineReceiver`` (which buffers a line
of any length before looking at it and accepts a bare LF as a line end), it has no way
to insist that only ``CRLF.CRLF`` ends the text (the SMTP smuggling hole,
CVE-2023-51764), it does not check where a pipelined group must stop (so bytes sent
after STARTTLS or DATA before the reply are executed: CVE-2011-0411), and its limits
(line length, recipients, errors, SIZE) are scattered over the protocol class or
missing.  A server facing the Internet needs exactly those, so the protocol lives here,
in one module, as an engine that only ever sees bytes and events: it can be tested by
feeding it bytes split at every position, and hostile input cannot reach a socket call.

The API, after h11:

* :meth:`ServerConnection.receive_data` takes bytes from the client (``b""``: the client
  closed);
* :meth:`ServerConnection.next_event` returns the next :mod:`event <.events>`, or
  ``NEED_DATA``, or ``PAUSED`` while the engine waits for the reply to the event it
  returned last (one command at a time, which is what makes pipelining safe: a command
  is looked at only once every earlier one has its reply), or ``CLOSED``;
* :meth:`ServerConnection.send` takes the adapter's answer (an
  :class:`~.wire.SmtpReply`, or :class:`~.events.Greeting`, :class:`~.events.Refuse`,
  :class:`~.events.Shutdown`) and returns the bytes to write.

Every reply goes out through :meth:`send`, even the ones the engine decides itself
(they come out of ``next_event`` as :class:`~.events.Respond`): so the state changes
exactly when the reply is written, and the adapter sees (and can log) every reply.

**The transition table.**  :data:`TRANSITIONS` maps (state, command class) to the state
after a positive reply; a missing entry is a command out of sequence, answered
``503 5.5.1``.  The states are those of RFC 5321 section 4.1.4's ordering rules, plus
the ones where lines are not commands (``DATA``: message text; ``AUTH``: SASL
responses; ``TLS``: no input until the handshake), ``BDAT`` (between the chunks of an
RFC 3030 CHUNKING transaction) and ``GREETING`` (nothing may be said before the greeting,
RFC 5321 section 4.3.1: a client that talks first is a spam engine, as Postfix's
postscreen knows).

**Errors** split as in h11: the adapter misusing the engine raises
:class:`LocalProtocolError`; anything the *client* does wrong never raises, it becomes a
reply (a :class:`~.events.Respond` event), because a remote peer must never be able to
cause an exception.

**BDAT** chunks are read by length, exactly as sent (no stuffing, so no end-of-data
ambiguity to smuggle through).  A chunk that cannot be accepted (out of sequence) is
still read and thrown away before the 503, as RFC 3030 requires, so its octets are never
taken for commands; a BDAT whose length cannot be read closes the session for the same
reason.

**Limits** live here: command line lengths (512, 12288 for AUTH), message size (SIZE=
and the actual text), recipients per message, errors per session.  A command line over
its limit is answered when the limit is reached and the rest of it is dropped as it
arrives: the engine never holds more than one line's limit of a line.  Lines of message
text have no limit of their own (Postfix and Exim take long lines, and so must a relay
that serves them): the text is handed on in pieces as it arrives, whatever its lines,
so only the message size bounds it and a session's memory does not grow with a line.

**Sync points** (RFC 2920 section 3.1, RFC 3207, RFC 4954): HELO, EHLO, DATA, STARTTLS
and AUTH must end a pipelined group.  If bytes follow such a command when the engine
reads it, the client did not wait for the reply: the engine answers ``554 5.5.0`` and
closes, without executing them (after STARTTLS they are the plaintext-injection attack;
after DATA, text that would be run as commands).
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path
from relay.envelope import BodyType
from relay.sansio.smtp.events import (
    Auth,
    AuthCredentials,
    Bdat,
    Command,
    Data,
    Ehlo,
    EndOfMessage,
    Event,
    Greeting,
    Helo,
    Help,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Refuse,
    Respond,
    Rset,
    Sentinel,
    Shutdown,
    StartTls,
    Vrfy,
)
from relay.sansio.smtp.wire import (
    CRLF,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    CommandLine,
    CommandSyntaxError,
    DataDecoder,
    SmtpReply,
    parse_command_line,
    parse_parameters,
    split_path_argument,
    xtext_decode,
)

__all__ = [
    "CLOSED",
    "SYNC_POINTS",
    "TRANSITIONS",
    "Limits",
    "LocalProtocolError",
    "ServerConnection",
    "ServerSettings",
    "State",
]


class LocalProtocolError(RuntimeError):
    """The adapter broke the engine's rules (e.g. sent a reply when none was due)."""


class _Closed(enum.Enum):
    CLOSED = "closed"


CLOSED: Final = _Closed.CLOSED
"""What ``next_event`` returns once the session is over: close the connection."""


class State(enum.Enum):
    """Where a session is (RFC 5321 section 4.1.4, plus the non-command states)."""

    GREETING = "greeting"  # connected, greeting not sent: any input is a protocol error
    CONNECTED = "connected"  # greeted: HELO/EHLO expected
    READY = "ready"  # after HELO/EHLO: no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message text
    BDAT = "bdat"  # between the chunks of a BDAT (CHUNKING) transaction
    AUTH = "auth"  # a SASL exchange: lines are responses
    TLS = "tls"  # STARTTLS accepted: nothing may arrive until the handshake is done
    CLOSED = "closed"


_S = State
_SESSION = (_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT)


def _build_table() -> dict[tuple[State, type], State]:
    table: dict[tuple[State, type], State] = {}
    for state in _SESSION:
        table[state, Helo] = _S.READY
        table[state, Ehlo] = _S.READY
        table[state, Noop] = state
        table[state, Vrfy] = state
        table[state, Help] = state
        table[state, Quit] = _S.CLOSED
        table[state, Rset] = _S.CONNECTED if state is _S.CONNECTED else _S.READY
    table[_S.READY, MailFrom] = _S.MAIL
    table[_S.MAIL, RcptTo] = _S.RCPT
    table[_S.RCPT, RcptTo] = _S.RCPT
    table[_S.RCPT, Data] = _S.DATA
    table[_S.RCPT, Bdat] = _S.BDAT
    table[_S.BDAT, Bdat] = _S.BDAT
    table[_S.BDAT, Noop] = _S.BDAT
    table[_S.BDAT, Rset] = _S.READY
    table[_S.BDAT, Quit] = _S.CLOSED
    table[_S.READY, StartTls] = _S.TLS
    table[_S.READY, Auth] = _S.AUTH
    return table


TRANSITIONS: Final[dict[tuple[State, type], State]] = _build_table()
"""(state, command class) → state after a positive reply.  Missing: ``503 5.5.1``."""

SYNC_POINTS: Final = frozenset({Helo, Ehlo, Data, StartTls, Auth})
"""Commands that must be the last of a pipelined group."""

_UNIMPLEMENTED: Final = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})
_NOT_SMTP: Final = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "USER"})
_HELO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[A-Za-z0-9.:]{1,60}\]")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
_BDAT_ARGUMENT = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Limits:
    """The session limits the engine enforces (``[smtp]`` in the configuration)."""

    max_message_size: int = 10485760
    max_recipients: int = 100
    max_errors: int = 10
    max_command_line: int = MAX_COMMAND_LINE
    max_auth_line: int = MAX_AUTH_LINE

    def __post_init__(self) -> None:
        if min(self.max_message_size, self.max_recipients, self.max_errors) < 1:
            raise ValueError("limits must be positive")
        if not 8 <= self.max_command_line <= self.max_auth_line:
            raise ValueError("max_command_line must be at least 8 and at most max_auth_line")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the engine says about itself and offers.

    ``tls_available``: STARTTLS can be offered (a certificate is configured);
    ``tls_active``: the session is already encrypted (implicit TLS);
    ``auth_available``: AUTH can be offered (users are configured), and with
    ``auth_requires_tls`` only on an encrypted session.  ``postmaster`` is what the
    domain-less ``RCPT TO:<postmaster>`` means (RFC 5321 section 4.5.1).
    """

    hostname: str
    limits: Limits = field(default_factory=Limits)
    tls_available: bool = False
    tls_active: bool = False
    auth_available: bool = False
    auth_requires_tls: bool = True
    postmaster: Address | None = None
    chunking: bool = True
    software: str = "relay"


@dataclass(slots=True)
class _Pending:
    """The event waiting for its reply, and what a positive or negative reply does."""

    event: Event
    on_positive: State
    on_negative: State
    effect: Callable[[SmtpReply], None] | None = None


@dataclass(slots=True)
class _Chunk:
    """A BDAT chunk being read: octets still to come, and what to answer after it.

    ``error`` is set when the chunk is read only to be thrown away (BDAT out of
    sequence): RFC 3030 still requires its octets to be consumed, or they would be
    read as commands.
    """

    remaining: int
    last: bool
    error: SmtpReply | None = None


class _Sasl(enum.Enum):
    PLAIN = "plain"  # waiting for the PLAIN response
    LOGIN_USER = "login-user"  # waiting for the LOGIN user name
    LOGIN_PASSWORD = "login-password"  # waiting for the LOGIN password


@functools.lru_cache(maxsize=512)
def _reply(code: int, enhanced: str | None, text: str) -> SmtpReply:
    """A one-line reply; text made ASCII-safe (it may quote the client's input).

    Cached: replies are immutable and most are the same few, so the hot path neither
    validates nor formats them again.
    """
    return SmtpReply(code, enhanced, (text.encode("ascii", "backslashreplace").decode("ascii"),))


@functools.lru_cache(maxsize=512)
def _hello_reply(lines: tuple[str, ...]) -> SmtpReply:
    """The 250 to HELO/EHLO (cached: a client says the same name every time)."""
    return SmtpReply(250, None, lines)


_LOGIN_USER_PROMPT: Final = SmtpReply(334, None, (base64.b64encode(b"Username:").decode(),))
_LOGIN_PASSWORD_PROMPT: Final = SmtpReply(334, None, (base64.b64encode(b"Password:").decode(),))
_SASL_GO_AHEAD: Final = SmtpReply(334, None, ("",))


class ServerConnection:
    """One SMTP session, server side.  See the module docstring for the API."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.state = State.GREETING
        self.errors = 0
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls_active = settings.tls_active
        self.authenticated_user: str | None = None
        self.mail: MailFrom | None = None
        self.recipients = 0
        self._buffer = b""
        self._eof = False
        self._pending: _Pending | None = None
        self._skipping = False  # dropping the rest of an over-long line
        self._decoder: DataDecoder | None = None
        self._data_ended = False
        self._sasl: _Sasl | None = None
        self._sasl_user = ""
        self._chunk: _Chunk | None = None
        self._bdat_size = 0

    # --- properties -------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet looked at (the adapter pauses reading above a bound)."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        """Whether the session is over: the adapter closes the connection."""
        return self.state is State.CLOSED

    @property
    def auth_offered(self) -> bool:
        """Whether AUTH is offered now (users configured, and TLS if required)."""
        return self.settings.auth_available and (
            self.tls_active or not self.settings.auth_requires_tls
        )

    @property
    def starttls_offered(self) -> bool:
        """Whether STARTTLS is offered now."""
        return self.settings.tls_available and not self.tls_active

    @property
    def protocol_name(self) -> str:
        """RFC 3848 / RFC 6531 ``with`` value for Received: (SMTP, ESMTPSA, UTF8SMTPS...)."""
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.mail is not None and self.mail.smtputf8 else "ESMTP"
        return base + ("S" if self.tls_active else "") + ("A" if self.authenticated_user else "")

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
        elif self.state is not State.CLOSED:
            self._buffer += data

    def next_event(self) -> Event | Sentinel | _Closed:
        """The next event, ``NEED_DATA``, ``PAUSED`` or ``CLOSED``."""
        if self.state is State.CLOSED:
            return CLOSED
        if self._pending is not None:
            return Sentinel.PAUSED
        if self._eof:
            self._close()
            return CLOSED
        if self._chunk is not None:
            return self._next_chunk_event(self._chunk)
        if self.state is State.DATA:
            return self._next_data_event()
        if not self._buffer:
            return Sentinel.NEED_DATA
        if self.state is State.GREETING:
            self._buffer = b""
            return self._respond(
                _reply(554, "5.5.0", "SMTP protocol error: client talked before the greeting"),
                _S.CLOSED,
            )
        if self.state is State.TLS:
            self._buffer = b""
            return self._respond(
                _reply(554, "5.5.0", "SMTP protocol error: plaintext after STARTTLS"), _S.CLOSED
            )
        line = self._next_line()
        if line is None:
            return Sentinel.NEED_DATA
        if isinstance(line, SmtpReply):
            return self._respond(line)
        if self.state is State.AUTH:
            return self._sasl_response(line)
        return self._command(line)

    # --- output -----------------------------------------------------------------------

    def send(self, event: SmtpReply | Greeting | Refuse | Shutdown) -> bytes:
        """The bytes for the adapter's answer; applies the state change it causes."""
        if type(event) is SmtpReply:  # nearly every call: the others are once a session
            return self._send_reply(event)
        if isinstance(event, Greeting):
            self._require_state(State.GREETING, "greeting")
            self.state = State.CONNECTED
            return _reply(
                220, None, f"{self.settings.hostname} ESMTP {self.settings.software}"
            ).to_bytes()
        if isinstance(event, Refuse):
            self._require_state(State.GREETING, "refusal")
            self._close()
            return event.reply.to_bytes()
        if isinstance(event, Shutdown):
            if self.state is State.CLOSED:
                return b""
            self._close()
            return event.reply.to_bytes()
        if not isinstance(event, SmtpReply):
            raise LocalProtocolError(f"cannot send {event!r}")
        return self._send_reply(event)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS finished: start over, as RFC 3207 says.

        Everything learnt before (HELO name, authentication, transaction) is forgotten,
        since it was said in the clear and could have been injected.
        """
        self._require_state(State.TLS, "tls_started")
        self.tls_active = True
        self.helo_name = None
        self.esmtp = False
        self.authenticated_user = None
        self._reset_transaction()
        self._buffer = b""
        self.state = State.CONNECTED

    # --- the reply path ---------------------------------------------------------------

    def _send_reply(self, reply: SmtpReply) -> bytes:
        pending = self._pending
        if pending is None:
            raise LocalProtocolError(f"no reply is due (state {self.state.name}): {reply}")
        if isinstance(pending.event, MessageData):  # pragma: no cover - never pending
            raise LocalProtocolError("MessageData takes no reply")
        self._pending = None
        if pending.effect is not None:
            pending.effect(reply)
        self.state = pending.on_positive if reply.is_positive else pending.on_negative
        out = reply.to_bytes()
        if reply.is_permanent and self.state is not State.CLOSED:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._close()
                out += _reply(
                    421, "4.7.0", f"{self.settings.hostname} Too many errors, closing connection"
                ).to_bytes()
        if self.state is State.CLOSED:
            self._close()
        return out

    def _respond(
        self,
        reply: SmtpReply,
        on_positive: State | None = None,
        on_negative: State | None = None,
        effect: Callable[[SmtpReply], None] | None = None,
    ) -> Respond:
        """The engine answers: pause until the adapter sends this reply."""
        event = Respond(reply)
        here = on_positive if on_positive is not None else self.state
        there = on_negative if on_negative is not None else here
        self._pending = _Pending(event, here, there, effect)
        return event

    def _ask(
        self,
        event: MailFrom | RcptTo | StartTls | EndOfMessage | AuthCredentials,
        on_positive: State,
        on_negative: State,
        effect: Callable[[SmtpReply], None] | None = None,
    ) -> Event:
        """The adapter decides: pause until it sends a reply."""
        self._pending = _Pending(event, on_positive, on_negative, effect)
        return event

    def _require_state(self, state: State, what: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"{what} in state {self.state.name}")

    def _close(self) -> None:
        self.state = State.CLOSED
        self._pending = None
        self._buffer = b""
        self._decoder = None

    def _reset_transaction(self) -> None:
        self.mail = None
        self.recipients = 0

    # --- lines ------------------------------------------------------------------------

    def _next_line(self) -> bytes | SmtpReply | None:
        """The next complete line (without CRLF); a 500 reply for an over-long one."""
        if self._skipping:
            self._skip()
            if self._skipping:
                return None
        buffer = self._buffer
        auth_allowed = self.state is State.AUTH or buffer[:5].upper() == b"AUTH "
        limit = (self.limits.max_auth_line if auth_allowed else self.limits.max_command_line) - 2
        end = buffer.find(CRLF, 0, limit + 2)
        if end == -1:
            if len(buffer) < limit + 2:
                return None  # a line that may still end within its limit
            self._skipping = True
            self._skip()  # drop what is already here of the over-long line
            return _reply(500, "5.5.2", "Line too long")
        self._buffer = buffer[end + 2 :]
        return buffer[:end]

    def _skip(self) -> None:
        """Drop the rest of an over-long line, up to and including its CRLF."""
        end = self._buffer.find(CRLF)
        if end == -1:
            self._buffer = b"\r" if self._buffer.endswith(b"\r") else b""
            return
        self._skipping = False
        self._buffer = self._buffer[end + 2 :]

    # --- commands ---------------------------------------------------------------------

    def _command(self, raw: bytes) -> Event | Sentinel:
        try:
            line = parse_command_line(raw)
        except CommandSyntaxError as e:
            return self._respond(e.reply)
        if not line.ascii and line.verb not in ("MAIL", "RCPT"):
            return self._respond(_reply(501, "5.5.4", "Non-ASCII characters need SMTPUTF8"))
        parse = _PARSERS.get(line.verb)
        if parse is None:
            if line.verb in _NOT_SMTP:
                reply = _reply(421, "4.7.0", f"{self.settings.hostname} This is an SMTP server")
                return self._respond(reply, _S.CLOSED, _S.CLOSED)
            if line.verb in _UNIMPLEMENTED:
                return self._respond(_reply(502, "5.5.1", "Command not implemented"))
            return self._respond(_reply(500, "5.5.2", "Syntax error, command unrecognized"))
        try:
            command = parse(self, line)
        except CommandSyntaxError as e:
            if line.verb == "BDAT":  # the chunk's length is unknown: nothing after it is safe
                return self._respond(e.reply, _S.CLOSED, _S.CLOSED)
            return self._respond(e.reply)
        key = (self.state, type(command))
        if key not in TRANSITIONS:
            if isinstance(command, Bdat):
                return self._skip_chunk(command, self._out_of_sequence(command))
            return self._respond(self._out_of_sequence(command))
        if type(command) in SYNC_POINTS and self._buffer:
            self._buffer = b""
            return self._respond(
                _reply(
                    554,
                    "5.5.0",
                    f"SMTP protocol synchronization error: input after {line.verb} "
                    "before its reply",
                ),
                _S.CLOSED,
            )
        return _HANDLERS[type(command)](self, command, TRANSITIONS[key])

    def _out_of_sequence(self, command: Command) -> SmtpReply:
        hint = {
            State.CONNECTED: "send HELO/EHLO first",
            State.READY: "need MAIL before RCPT/DATA",
            State.MAIL: "need RCPT (no valid recipients)",
            State.RCPT: "transaction in progress",
            State.BDAT: "BDAT transaction in progress (RSET to abandon it)",
        }.get(self.state, "")
        if isinstance(command, MailFrom) and self.state in (State.MAIL, State.RCPT):
            hint = "nested MAIL command"
        return _reply(503, "5.5.1", f"Bad sequence of commands: {hint}")

    # --- parsers: CommandLine -> Command (syntax only; state and policy later) ----------

    def _parse_hello(self, line: CommandLine) -> Command:
        name = line.argument
        if not line.ascii or not _HELO_NAME.fullmatch(name):
            raise CommandSyntaxError(501, "5.5.4", f"Syntax: {line.verb} hostname")
        return Ehlo(name) if line.verb == "EHLO" else Helo(name)

    def _parse_mail(self, line: CommandLine) -> Command:
        path, params_text = split_path_argument(line.argument, "FROM")
        params = parse_parameters(params_text)
        if params and not self.esmtp:
            raise CommandSyntaxError(555, "5.5.4", "MAIL parameters need EHLO")
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and params["SMTPUTF8"] is not None:
            raise CommandSyntaxError(501, "5.5.4", "SMTPUTF8 takes no value")
        if not line.ascii and not smtputf8:
            raise CommandSyntaxError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
        size = self._size_parameter(params.get("SIZE", None), "SIZE" in params)
        body = self._body_parameter(params.get("BODY"), "BODY" in params)
        auth = None
        if "AUTH" in params:
            value = params["AUTH"]
            if value is None:
                raise CommandSyntaxError(501, "5.5.4", "AUTH= needs a value")
            auth = xtext_decode(value)
        unknown = set(params) - {"SIZE", "BODY", "SMTPUTF8", "AUTH"}
        if unknown:
            raise CommandSyntaxError(555, "5.5.4", f"Unsupported parameter {sorted(unknown)[0]}")
        try:
            reverse_path = parse_reverse_path(path, smtputf8=smtputf8)
        except AddressError as e:
            raise CommandSyntaxError(501, "5.1.7", f"Bad sender address syntax: {e}") from None
        return MailFrom(reverse_path, size, body, smtputf8, auth)

    def _size_parameter(self, value: str | None, given: bool) -> int | None:
        if not given:
            return None
        if value is None or not _SIZE_VALUE.fullmatch(value):
            raise CommandSyntaxError(501, "5.5.4", "SIZE needs a number")
        size = int(value)
        if size > self.limits.max_message_size:
            raise CommandSyntaxError(
                552, "5.3.4", "Message size exceeds fixed maximum message size"
            )
        return size

    def _body_parameter(self, value: str | None, given: bool) -> BodyType:
        if not given:
            return BodyType.SEVEN_BIT
        upper = (value or "").upper()
        if upper == "7BIT":
            return BodyType.SEVEN_BIT
        if upper == "8BITMIME":
            return BodyType.EIGHT_BIT_MIME
        raise CommandSyntaxError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")

    def _parse_rcpt(self, line: CommandLine) -> Command:
        path, params_text = split_path_argument(line.argument, "TO")
        params = parse_parameters(params_text)
        if params:
            raise CommandSyntaxError(555, "5.5.4", f"Unsupported parameter {next(iter(params))}")
        smtputf8 = self.mail is not None and self.mail.smtputf8
        if not line.ascii and not smtputf8:
            raise CommandSyntaxError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
        if path.lower() == "<postmaster>" and self.settings.postmaster is not None:
            return RcptTo(self.settings.postmaster)
        try:
            return RcptTo(parse_forward_path(path, smtputf8=smtputf8))
        except AddressError as e:
            raise CommandSyntaxError(501, "5.1.3", f"Bad recipient address syntax: {e}") from None

    def _parse_no_argument(self, line: CommandLine) -> Command:
        if line.argument:
            raise CommandSyntaxError(501, "5.5.4", f"Syntax: {line.verb} takes no argument")
        return _NO_ARGUMENT[line.verb]()

    def _parse_noop(self, line: CommandLine) -> Command:
        return Noop()

    def _parse_help(self, line: CommandLine) -> Command:
        return Help()

    def _parse_vrfy(self, line: CommandLine) -> Command:
        if not line.argument:
            raise CommandSyntaxError(501, "5.5.4", "Syntax: VRFY address")
        return Vrfy(line.argument)

    def _parse_auth(self, line: CommandLine) -> Command:
        mechanism, _, initial = line.argument.partition(" ")
        if not mechanism or " " in initial.strip(" "):
            raise CommandSyntaxError(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        return Auth(mechanism.upper(), initial.strip(" ") or None)

    # --- handlers: a legal command in its state -------------------------------------------

    def _on_hello(self, command: Command, after: State) -> Event:
        assert isinstance(command, Helo | Ehlo)
        extended = isinstance(command, Ehlo)
        hostname = self.settings.hostname
        if extended:
            lines = [f"{hostname} Hello {command.name}", *self._extensions()]
        else:
            lines = [f"{hostname} Hello {command.name}"]

        def effect(reply: SmtpReply) -> None:
            self.helo_name = command.name
            self.esmtp = extended
            self._reset_transaction()

        return self._respond(_hello_reply(tuple(lines)), after, effect=effect)

    def _extensions(self) -> list[str]:
        lines = ["PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME", "SMTPUTF8"]
        lines.append("ENHANCEDSTATUSCODES")
        if self.settings.chunking:
            lines.append("CHUNKING")
        if self.starttls_offered:
            lines.append("STARTTLS")
        if self.auth_offered and self.authenticated_user is None:
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _on_mail(self, command: Command, after: State) -> Event:
        assert isinstance(command, MailFrom)

        def effect(reply: SmtpReply) -> None:
            if reply.is_positive:
                self.mail = command
                self.recipients = 0

        return self._ask(command, after, self.state, effect)

    def _on_rcpt(self, command: Command, after: State) -> Event:
        assert isinstance(command, RcptTo)
        if self.recipients >= self.limits.max_recipients:
            return self._respond(_reply(452, "4.5.3", "Too many recipients"))

        def effect(reply: SmtpReply) -> None:
            if reply.is_positive:
                self.recipients += 1

        return self._ask(command, after, self.state, effect)

    def _on_data(self, command: Command, after: State) -> Event:
        def effect(reply: SmtpReply) -> None:
            self._decoder = DataDecoder()
            self._data_ended = False

        return self._respond(
            _reply(354, None, "End data with <CR><LF>.<CR><LF>"), after, effect=effect
        )

    def _parse_bdat(self, line: CommandLine) -> Command:
        match = _BDAT_ARGUMENT.fullmatch(line.argument)
        if match is None:
            raise CommandSyntaxError(501, "5.5.4", "Syntax: BDAT size [LAST]")
        return Bdat(int(match.group(1)), match.group(2) is not None)

    def _on_bdat(self, command: Command, after: State) -> Event | Sentinel:
        assert isinstance(command, Bdat)
        if not self.settings.chunking:
            return self._skip_chunk(command, _reply(502, "5.5.1", "CHUNKING not available"))
        if self.state is State.RCPT:
            self._bdat_size = 0
        self._chunk = _Chunk(command.size, command.last)
        return self._next_chunk_event(self._chunk)

    def _skip_chunk(self, command: Bdat, error: SmtpReply) -> Event | Sentinel:
        """Consume a BDAT chunk that cannot be taken, then answer ``error``."""
        self._chunk = _Chunk(command.size, command.last, error)
        return self._next_chunk_event(self._chunk)

    def _next_chunk_event(self, chunk: _Chunk) -> Event | Sentinel:
        """Read a BDAT chunk: octets exactly as sent (no stuffing), then its reply."""
        while chunk.remaining:
            if not self._buffer:
                return Sentinel.NEED_DATA
            take = self._buffer[: chunk.remaining]
            self._buffer = self._buffer[len(take) :]
            chunk.remaining -= len(take)
            if chunk.error is not None:
                continue
            self._bdat_size += len(take)
            if self._bdat_size <= self.limits.max_message_size:
                return MessageData(take)
        self._chunk = None
        if chunk.error is not None:
            return self._respond(chunk.error)
        if chunk.last:

            def effect(reply: SmtpReply) -> None:
                self._reset_transaction()

            if self._bdat_size > self.limits.max_message_size:
                reply = _reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
                return self._respond(reply, _S.READY, _S.READY, effect)
            return self._ask(EndOfMessage(self._bdat_size), _S.READY, _S.READY, effect)
        return self._respond(_reply(250, "2.0.0", "Chunk received"), _S.BDAT)

    def _on_rset(self, command: Command, after: State) -> Event:
        return self._respond(
            _reply(250, "2.0.0", "Ok"), after, effect=lambda _: self._reset_transaction()
        )

    def _on_noop(self, command: Command, after: State) -> Event:
        return self._respond(_reply(250, "2.0.0", "Ok"), after)

    def _on_help(self, command: Command, after: State) -> Event:
        return self._respond(_reply(214, "2.0.0", "See RFC 5321"), after)

    def _on_vrfy(self, command: Command, after: State) -> Event:
        return self._respond(
            _reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"),
            after,
        )

    def _on_quit(self, command: Command, after: State) -> Event:
        return self._respond(
            _reply(221, "2.0.0", f"{self.settings.hostname} closing connection"), after, after
        )

    def _on_starttls(self, command: Command, after: State) -> Event:
        if self.tls_active:
            return self._respond(_reply(503, "5.5.1", "TLS already active"))
        if not self.settings.tls_available:
            return self._respond(_reply(502, "5.5.1", "STARTTLS not available"))
        assert isinstance(command, StartTls)
        return self._ask(command, after, self.state)

    def _on_auth(self, command: Command, after: State) -> Event:
        assert isinstance(command, Auth)
        if not self.settings.auth_available:
            return self._respond(_reply(503, "5.5.1", "Authentication not enabled"))
        if not self.auth_offered:
            return self._respond(_reply(538, "5.7.11", "Encryption required for authentication"))
        if self.authenticated_user is not None:
            return self._respond(_reply(503, "5.5.1", "Already authenticated"))
        if command.mechanism == "PLAIN":
            if command.initial is None:
                self._sasl = _Sasl.PLAIN
                return self._respond(_SASL_GO_AHEAD, after)
            return self._plain(command.initial)
        if command.mechanism == "LOGIN":
            if command.initial is None:
                self._sasl = _Sasl.LOGIN_USER
                return self._respond(_LOGIN_USER_PROMPT, after)
            return self._login_user(command.initial)
        return self._respond(_reply(504, "5.5.4", "Unrecognized authentication mechanism"))

    # --- SASL -------------------------------------------------------------------------

    def _sasl_response(self, raw: bytes) -> Event:
        step, self._sasl = self._sasl, None
        text = raw.strip(b" ").decode("ascii", errors="replace")
        if text == "*":
            return self._respond(_reply(501, "5.0.0", "Authentication cancelled"), _S.READY)
        if self._buffer:
            self._buffer = b""
            return self._respond(
                _reply(554, "5.5.0", "SMTP protocol synchronization error: input during AUTH"),
                _S.CLOSED,
            )
        if step is _Sasl.PLAIN:
            return self._plain(text)
        if step is _Sasl.LOGIN_USER:
            return self._login_user(text)
        password = _b64(text)
        if password is None:
            return self._respond(_reply(501, "5.5.2", "Malformed LOGIN response"), _S.READY)
        return self._credentials("LOGIN", self._sasl_user, password, "")

    def _plain(self, response: str) -> Event:
        decoded = _b64(response)
        parts = None if decoded is None else decoded.split("\0")
        if parts is None or len(parts) != 3 or not parts[1]:
            return self._respond(_reply(501, "5.5.2", "Malformed PLAIN response"), _S.READY)
        authzid, username, password = parts
        return self._credentials("PLAIN", username, password, authzid)

    def _login_user(self, response: str) -> Event:
        decoded = _b64(response)
        if not decoded:
            return self._respond(_reply(501, "5.5.2", "Malformed LOGIN response"), _S.READY)
        self._sasl_user = decoded
        self._sasl = _Sasl.LOGIN_PASSWORD
        return self._respond(_LOGIN_PASSWORD_PROMPT, _S.AUTH)

    def _credentials(self, mechanism: str, username: str, password: str, authzid: str) -> Event:
        self._sasl_user = ""
        credentials = AuthCredentials(mechanism, username, password, authzid)

        def effect(reply: SmtpReply) -> None:
            if reply.code == 235:
                self.authenticated_user = username

        return self._ask(credentials, _S.READY, _S.READY, effect)

    # --- message text -----------------------------------------------------------------

    def _next_data_event(self) -> Event | Sentinel:
        decoder = self._decoder
        assert decoder is not None
        if not self._data_ended:
            if not self._buffer:
                return Sentinel.NEED_DATA
            data, self._buffer = self._buffer, b""
            text, rest = decoder.feed(data)
            if decoder.size > self.limits.max_message_size:
                decoder.discard()
                text = b""
            if rest is not None:
                self._buffer = rest
                self._data_ended = True
            if text:
                return MessageData(text)
            if not self._data_ended:
                return Sentinel.NEED_DATA
        return self._end_of_data(decoder)

    def _end_of_data(self, decoder: DataDecoder) -> Event:
        self._decoder = None

        def effect(reply: SmtpReply) -> None:
            self._reset_transaction()

        problem = decoder.problem
        if problem is not None:
            reply = _reply(554, "5.5.0", f"Message rejected: {problem.value} (RFC 5321 2.3.8)")
        elif decoder.size > self.limits.max_message_size:
            reply = _reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        else:
            return self._ask(EndOfMessage(decoder.size), _S.READY, _S.READY, effect)
        return self._respond(reply, _S.READY, _S.READY, effect)


def _b64(text: str) -> str | None:
    """Decode a SASL response: strict base64 of UTF-8, ``=`` for empty; None if invalid."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


_NO_ARGUMENT: Final[dict[str, Callable[[], Command]]] = {
    "DATA": Data,
    "RSET": Rset,
    "QUIT": Quit,
    "STARTTLS": StartTls,
}

_Parser = Callable[[ServerConnection, CommandLine], Command]
_PARSERS: Final[dict[str, _Parser]] = {
    "HELO": ServerConnection._parse_hello,
    "EHLO": ServerConnection._parse_hello,
    "MAIL": ServerConnection._parse_mail,
    "RCPT": ServerConnection._parse_rcpt,
    "DATA": ServerConnection._parse_no_argument,
    "RSET": ServerConnection._parse_no_argument,
    "QUIT": ServerConnection._parse_no_argument,
    "STARTTLS": ServerConnection._parse_no_argument,
    "NOOP": ServerConnection._parse_noop,
    "HELP": ServerConnection._parse_help,
    "VRFY": ServerConnection._parse_vrfy,
    "AUTH": ServerConnection._parse_auth,
    "BDAT": ServerConnection._parse_bdat,
}

_Handler = Callable[[ServerConnection, Command, State], Event | Sentinel]
_HANDLERS: Final[dict[type, _Handler]] = {
    Helo: ServerConnection._on_hello,
    Ehlo: ServerConnection._on_hello,
    MailFrom: ServerConnection._on_mail,
    RcptTo: ServerConnection._on_rcpt,
    Data: ServerConnection._on_data,
    Bdat: ServerConnection._on_bdat,
    Rset: ServerConnection._on_rset,
    Noop: ServerConnection._on_noop,
    Help: ServerConnection._on_help,
    Vrfy: ServerConnection._on_vrfy,
    Quit: ServerConnection._on_quit,
    StartTls: ServerConnection._on_starttls,
    Auth: ServerConnection._on_auth,
}

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

**The transition table** is :mod:`relay.sansio.smtp.state`'s
:data:`~.state.SERVER_TRANSITIONS`: every state (those of RFC 5321 section 4.1.4's
ordering rules, plus ``GREETING``, ``DATA``, ``CHUNK``, the SASL states and ``TLS``)
and every move, the refusals and closings included.  This module only decides which
input a line is and what reply it gets; a command missing from the table is out of
sequence, answered ``503 5.5.1``.  Command lines are parsed by
:mod:`relay.sansio.smtp.commands`, given an explicit
:class:`~.commands.ParseContext` kept up to date here.

**Errors** split as in h11 (:mod:`relay.sansio.smtp.errors`): the adapter misusing
the engine raises :class:`~.errors.LocalProtocolError`; anything the *client* does
wrong never raises, it becomes a reply (a :class:`~.events.Respond` event), because a
remote peer must never be able to cause an exception.

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

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from relay.address import Address
from relay.sansio.smtp.commands import (
    MalformedInitialResponse,
    ParseContext,
    parse_command,
    parse_sasl_response,
)
from relay.sansio.smtp.errors import CLOSED, LocalProtocolError, Sentinel
from relay.sansio.smtp.events import (
    Auth,
    AuthCredentials,
    AuthResponse,
    Bdat,
    CommandEvent,
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
    Shutdown,
    StartTls,
    Vrfy,
)
from relay.sansio.smtp.state import (
    SERVER_TRANSITIONS,
    SYNC_POINTS,
    Move,
    ServerInput,
    ServerState,
    server_move,
)
from relay.sansio.smtp.wire import (
    CRLF,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    CommandSyntaxError,
    DataDecoder,
    SmtpReply,
    parse_command_line,
)

__all__ = [
    "CLOSED",
    "Limits",
    "LocalProtocolError",
    "ServerConnection",
    "ServerSettings",
]

_S = ServerState
_I = ServerInput
_STAY: Final = {state: Move(state, state) for state in ServerState}
"""A command out of sequence is answered 503 and moves nothing (it is not in the table)."""

_UNIMPLEMENTED: Final = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})
_NOT_SMTP: Final = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "USER"})
_COMMAND_STATES: Final = frozenset({_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT})
_AUTH_STATES: Final = frozenset({_S.AUTH_PLAIN, _S.AUTH_LOGIN_USER, _S.AUTH_LOGIN_PASSWORD})


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
    """The event waiting for its reply, where the reply leads, and what it does besides."""

    event: Event
    move: Move
    effect: Callable[[SmtpReply], None] | None = None


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


_LOGIN_USER_PROMPT: Final = SmtpReply(334, None, ("VXNlcm5hbWU6",))  # "Username:"
_LOGIN_PASSWORD_PROMPT: Final = SmtpReply(334, None, ("UGFzc3dvcmQ6",))  # "Password:"
_SASL_GO_AHEAD: Final = SmtpReply(334, None, ("",))
_TOO_BIG: Final = (552, "5.3.4", "Message size exceeds fixed maximum message size")


class ServerConnection:
    """One SMTP session, server side.  See the module docstring for the API."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.state = ServerState.GREETING
        self.errors = 0
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls_active = settings.tls_active
        self.authenticated_user: str | None = None
        self.mail: MailFrom | None = None
        self.recipients = 0
        self._context = ParseContext.of(
            self.limits.max_message_size, False, False, settings.postmaster
        )
        self._buffer = b""
        self._eof = False
        self._pending: _Pending | None = None
        # framing (see the exceptions in relay.sansio.smtp.state): octets to drop
        self._skipping = False  # the rest of an over-long line
        self._refused_chunk: SmtpReply | None = None  # a BDAT chunk read to be dropped
        # values within a state
        self._decoder: DataDecoder | None = None
        self._data_ended = False
        self._chunk_left = 0
        self._chunk_last = False
        self._bdat_size = 0
        self._login_name = ""

    # --- properties -------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet looked at (the adapter pauses reading above a bound)."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        """Whether the session is over: the adapter closes the connection."""
        return self.state is ServerState.CLOSED

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
        elif self.state is not ServerState.CLOSED:
            self._buffer += data

    def next_event(self) -> Event | Sentinel:
        """The next event, ``NEED_DATA``, ``PAUSED`` or ``CLOSED``."""
        state = self.state
        if state is _S.CLOSED:
            return CLOSED
        if self._pending is not None:
            return Sentinel.PAUSED
        if self._eof:
            self._apply(_I.END_OF_STREAM)
            return CLOSED
        if state is _S.CHUNK or self._refused_chunk is not None:
            return self._next_chunk_event()
        if state is _S.DATA:
            return self._next_data_event()
        if not self._buffer:
            return Sentinel.NEED_DATA
        if state is _S.GREETING or state is _S.TLS:
            self._buffer = b""
            what = (
                "client talked before the greeting"
                if state is _S.GREETING
                else "plaintext after STARTTLS"
            )
            return self._respond(
                _reply(554, "5.5.0", f"SMTP protocol error: {what}"), self._move(_I.EARLY_INPUT)
            )
        line = self._next_line()
        if line is None:
            return Sentinel.NEED_DATA
        if isinstance(line, SmtpReply):
            return self._respond(line, self._move(_I.LINE_TOO_LONG))
        if state in _AUTH_STATES:
            return self._sasl_response(line)
        return self._command(line)

    # --- output -----------------------------------------------------------------------

    def send(self, event: SmtpReply | Greeting | Refuse | Shutdown) -> bytes:
        """The bytes for the adapter's answer; applies the state change it causes."""
        if type(event) is SmtpReply:  # nearly every call: the others are once a session
            return self._send_reply(event)
        if isinstance(event, Greeting):
            self._apply(_I.GREETING)
            return _reply(
                220, None, f"{self.settings.hostname} ESMTP {self.settings.software}"
            ).to_bytes()
        if isinstance(event, Refuse):
            self._apply(_I.REFUSE)
            return event.reply.to_bytes()
        if isinstance(event, Shutdown):
            said = self.state is not _S.CLOSED
            self._apply(_I.SHUTDOWN)
            return event.reply.to_bytes() if said else b""
        if not isinstance(event, SmtpReply):
            raise LocalProtocolError(f"cannot send {event!r}")
        return self._send_reply(event)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS finished: start over, as RFC 3207 says.

        Everything learnt before (HELO name, authentication, transaction) is forgotten,
        since it was said in the clear and could have been injected.
        """
        self._apply(_I.TLS_STARTED)
        self.tls_active = True
        self.helo_name = None
        self.esmtp = False
        self.authenticated_user = None
        self._reset_transaction()
        self._buffer = b""

    # --- moves and the reply path -----------------------------------------------------

    def _move(self, key: type | ServerInput) -> Move:
        return server_move(self.state, key)

    def _apply(self, key: ServerInput) -> None:
        """A move that waits for no reply: take it now."""
        self.state = server_move(self.state, key).positive
        if self.state is _S.CLOSED:
            self._close()

    def _send_reply(self, reply: SmtpReply) -> bytes:
        pending = self._pending
        if pending is None:
            raise LocalProtocolError(f"no reply is due (state {self.state.name}): {reply}")
        self._pending = None
        if pending.effect is not None:
            pending.effect(reply)
        move = pending.move
        self.state = move.positive if reply.is_positive else move.negative
        out = reply.to_bytes()
        if reply.is_permanent and self.state is not _S.CLOSED:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._apply(_I.TOO_MANY_ERRORS)
                out += _reply(
                    421, "4.7.0", f"{self.settings.hostname} Too many errors, closing connection"
                ).to_bytes()
        if self.state is _S.CLOSED:
            self._close()
        return out

    def _respond(
        self, reply: SmtpReply, move: Move, effect: Callable[[SmtpReply], None] | None = None
    ) -> Respond:
        """The engine answers: pause until the adapter sends this reply."""
        event = Respond(reply)
        self._pending = _Pending(event, move, effect)
        return event

    def _ask(
        self,
        event: MailFrom | RcptTo | StartTls | EndOfMessage | AuthCredentials,
        move: Move,
        effect: Callable[[SmtpReply], None] | None = None,
    ) -> Event:
        """The adapter decides: pause until it sends a reply."""
        self._pending = _Pending(event, move, effect)
        return event

    def _close(self) -> None:
        self._pending = None
        self._buffer = b""
        self._decoder = None
        self._refused_chunk = None

    def _reset_transaction(self) -> None:
        self.mail = None
        self.recipients = 0
        self._update_context()

    def _update_context(self) -> None:
        """Keep the parsers' context in step with what the session said."""
        context = self._context
        smtputf8 = self.mail is not None and self.mail.smtputf8
        if context.esmtp is not self.esmtp or context.smtputf8 is not smtputf8:
            self._context = ParseContext.of(
                context.max_message_size, self.esmtp, smtputf8, context.postmaster
            )

    # --- lines ------------------------------------------------------------------------

    def _next_line(self) -> bytes | SmtpReply | None:
        """The next complete line (without CRLF); a 500 reply for an over-long one."""
        if self._skipping:
            self._skip()
            if self._skipping:
                return None
        buffer = self._buffer
        auth_allowed = self.state in _AUTH_STATES or buffer[:5].upper() == b"AUTH "
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
            return self._respond(e.reply, self._move(_I.BAD_COMMAND))
        if not line.ascii and line.verb not in ("MAIL", "RCPT"):
            reply = _reply(501, "5.5.4", "Non-ASCII characters need SMTPUTF8")
            return self._respond(reply, self._move(_I.BAD_COMMAND))
        malformed = False
        try:
            command = parse_command(line, self._context)
        except MalformedInitialResponse as e:
            command, malformed = e.command, True
        except CommandSyntaxError as e:
            if line.verb == "BDAT":  # the chunk's length is unknown: nothing after it is safe
                return self._respond(e.reply, self._move(_I.BAD_BDAT))
            return self._respond(e.reply, self._move(_I.BAD_COMMAND))
        if command is None:
            return self._unknown(line.verb)
        kind = type(command)
        move = SERVER_TRANSITIONS.get((self.state, kind))
        if move is None:
            if kind is Bdat:
                assert isinstance(command, Bdat)
                return self._refuse_chunk(command, self._out_of_sequence(command))
            return self._respond(self._out_of_sequence(command), _STAY[self.state])
        if kind in SYNC_POINTS and self._buffer:
            self._buffer = b""
            return self._respond(
                _reply(
                    554,
                    "5.5.0",
                    f"SMTP protocol synchronization error: input after {line.verb} "
                    "before its reply",
                ),
                self._move(_I.SYNC_ERROR),
            )
        if malformed:
            assert isinstance(command, Auth)
            return self._on_auth(command, move, malformed=True)
        return _HANDLERS[kind](self, command, move)

    def _unknown(self, verb: str) -> Event:
        if verb in _NOT_SMTP:
            reply = _reply(421, "4.7.0", f"{self.settings.hostname} This is an SMTP server")
            return self._respond(reply, self._move(_I.NOT_SMTP))
        if verb in _UNIMPLEMENTED:
            return self._respond(
                _reply(502, "5.5.1", "Command not implemented"), self._move(_I.BAD_COMMAND)
            )
        return self._respond(
            _reply(500, "5.5.2", "Syntax error, command unrecognized"), self._move(_I.BAD_COMMAND)
        )

    def _out_of_sequence(self, command: CommandEvent) -> SmtpReply:
        hint = {
            _S.CONNECTED: "send HELO/EHLO first",
            _S.READY: "need MAIL before RCPT/DATA",
            _S.MAIL: "need RCPT (no valid recipients)",
            _S.RCPT: "transaction in progress",
            _S.BDAT: "BDAT transaction in progress (RSET to abandon it)",
        }.get(self.state, "")
        if isinstance(command, MailFrom) and self.state in (_S.MAIL, _S.RCPT):
            hint = "nested MAIL command"
        return _reply(503, "5.5.1", f"Bad sequence of commands: {hint}")

    # --- handlers: a legal command in its state -------------------------------------------

    def _on_hello(self, command: CommandEvent, move: Move) -> Event:
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

        return self._respond(_hello_reply(tuple(lines)), move, effect)

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

    def _on_mail(self, command: CommandEvent, move: Move) -> Event:
        assert isinstance(command, MailFrom)

        def effect(reply: SmtpReply) -> None:
            if reply.is_positive:
                self.mail = command
                self.recipients = 0
                self._update_context()

        return self._ask(command, move, effect)

    def _on_rcpt(self, command: CommandEvent, move: Move) -> Event:
        assert isinstance(command, RcptTo)
        if self.recipients >= self.limits.max_recipients:
            return self._respond(_reply(452, "4.5.3", "Too many recipients"), move)

        def effect(reply: SmtpReply) -> None:
            if reply.is_positive:
                self.recipients += 1

        return self._ask(command, move, effect)

    def _on_data(self, command: CommandEvent, move: Move) -> Event:
        def effect(reply: SmtpReply) -> None:
            self._decoder = DataDecoder()
            self._data_ended = False

        return self._respond(_reply(354, None, "End data with <CR><LF>.<CR><LF>"), move, effect)

    def _on_rset(self, command: CommandEvent, move: Move) -> Event:
        return self._respond(_reply(250, "2.0.0", "Ok"), move, lambda _: self._reset_transaction())

    def _on_noop(self, command: CommandEvent, move: Move) -> Event:
        return self._respond(_reply(250, "2.0.0", "Ok"), move)

    def _on_help(self, command: CommandEvent, move: Move) -> Event:
        return self._respond(_reply(214, "2.0.0", "See RFC 5321"), move)

    def _on_vrfy(self, command: CommandEvent, move: Move) -> Event:
        return self._respond(
            _reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"),
            move,
        )

    def _on_quit(self, command: CommandEvent, move: Move) -> Event:
        return self._respond(
            _reply(221, "2.0.0", f"{self.settings.hostname} closing connection"), move
        )

    def _on_starttls(self, command: CommandEvent, move: Move) -> Event:
        if self.tls_active:
            return self._respond(_reply(503, "5.5.1", "TLS already active"), move)
        if not self.settings.tls_available:
            return self._respond(_reply(502, "5.5.1", "STARTTLS not available"), move)
        assert isinstance(command, StartTls)
        return self._ask(command, move)

    # --- BDAT -------------------------------------------------------------------------

    def _on_bdat(self, command: CommandEvent, move: Move) -> Event | Sentinel:
        assert isinstance(command, Bdat)
        if not self.settings.chunking:
            return self._refuse_chunk(command, _reply(502, "5.5.1", "CHUNKING not available"))
        if self.state is _S.RCPT:
            self._bdat_size = 0
        self.state = move.positive  # the octets follow at once: no reply to wait for
        self._chunk_left, self._chunk_last = command.size, command.last
        return self._next_chunk_event()

    def _refuse_chunk(self, command: Bdat, error: SmtpReply) -> Event | Sentinel:
        """Consume a BDAT chunk that cannot be taken, then answer ``error``."""
        self._chunk_left, self._chunk_last = command.size, command.last
        self._refused_chunk = error
        return self._next_chunk_event()

    def _next_chunk_event(self) -> Event | Sentinel:
        """Read a BDAT chunk: octets exactly as sent (no stuffing), then its reply."""
        refused = self._refused_chunk
        while self._chunk_left:
            if not self._buffer:
                return Sentinel.NEED_DATA
            take = self._buffer[: self._chunk_left]
            self._buffer = self._buffer[len(take) :]
            self._chunk_left -= len(take)
            if refused is not None:
                continue
            self._bdat_size += len(take)
            if self._bdat_size <= self.limits.max_message_size:
                return MessageData(take)
        if refused is not None:
            self._refused_chunk = None
            return self._respond(refused, self._move(_I.CHUNK_DISCARDED))
        if not self._chunk_last:
            return self._respond(_reply(250, "2.0.0", "Chunk received"), self._move(_I.CHUNK_END))
        move = self._move(_I.LAST_CHUNK_END)

        def effect(reply: SmtpReply) -> None:
            self._reset_transaction()

        if self._bdat_size > self.limits.max_message_size:
            return self._respond(_reply(*_TOO_BIG), move, effect)
        return self._ask(EndOfMessage(self._bdat_size), move, effect)

    # --- AUTH and SASL ----------------------------------------------------------------

    def _on_auth(self, command: CommandEvent, move: Move, *, malformed: bool = False) -> Event:
        assert isinstance(command, Auth)
        if not self.settings.auth_available:
            return self._respond(_reply(503, "5.5.1", "Authentication not enabled"), move)
        if not self.auth_offered:
            reply = _reply(538, "5.7.11", "Encryption required for authentication")
            return self._respond(reply, move)
        if self.authenticated_user is not None:
            return self._respond(_reply(503, "5.5.1", "Already authenticated"), move)
        if command.mechanism not in ("PLAIN", "LOGIN"):
            reply = _reply(504, "5.5.4", "Unrecognized authentication mechanism")
            return self._respond(reply, move)
        if malformed:
            return self._malformed(command.mechanism, move)
        if command.mechanism == "PLAIN":
            if command.initial is None:
                return self._respond(_SASL_GO_AHEAD, self._move(_I.AUTH_PLAIN))
            return self._plain(command.initial, move)
        if command.initial is None:
            return self._respond(_LOGIN_USER_PROMPT, self._move(_I.AUTH_LOGIN))
        return self._login_user(command.initial, move)

    def _sasl_response(self, raw: bytes) -> Event:
        move = self._move(AuthResponse)
        response = parse_sasl_response(raw)
        if response is not None and response.data is None:
            return self._respond(_reply(501, "5.0.0", "Authentication cancelled"), move)
        if self._buffer:
            self._buffer = b""
            return self._respond(
                _reply(554, "5.5.0", "SMTP protocol synchronization error: input during AUTH"),
                self._move(_I.SYNC_ERROR),
            )
        state = self.state
        if response is None or response.data is None:
            return self._malformed("PLAIN" if state is _S.AUTH_PLAIN else "LOGIN", move)
        if state is _S.AUTH_PLAIN:
            return self._plain(response.data, move)
        if state is _S.AUTH_LOGIN_USER:
            return self._login_user(response.data, move)
        password = response.data.decode("utf-8")
        return self._credentials("LOGIN", self._login_user_name(), password, "", move)

    def _malformed(self, mechanism: str, move: Move) -> Event:
        return self._respond(_reply(501, "5.5.2", f"Malformed {mechanism} response"), move)

    def _plain(self, response: bytes, move: Move) -> Event:
        parts = response.decode("utf-8").split("\0")
        if len(parts) != 3 or not parts[1]:
            return self._malformed("PLAIN", move)
        authzid, username, password = parts
        return self._credentials("PLAIN", username, password, authzid, move)

    def _login_user(self, response: bytes, move: Move) -> Event:
        if not response:
            return self._malformed("LOGIN", move)
        self._login_name = response.decode("utf-8")
        return self._respond(_LOGIN_PASSWORD_PROMPT, self._move(_I.AUTH_LOGIN_USER))

    def _login_user_name(self) -> str:
        user, self._login_name = self._login_name, ""
        return user

    def _credentials(
        self, mechanism: str, username: str, password: str, authzid: str, move: Move
    ) -> Event:
        credentials = AuthCredentials(mechanism, username, password, authzid)

        def effect(reply: SmtpReply) -> None:
            if reply.code == 235:
                self.authenticated_user = username

        return self._ask(credentials, move, effect)

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
        move = self._move(_I.TEXT_END)

        def effect(reply: SmtpReply) -> None:
            self._reset_transaction()

        problem = decoder.problem
        if problem is not None:
            reply = _reply(554, "5.5.0", f"Message rejected: {problem.value} (RFC 5321 2.3.8)")
        elif decoder.size > self.limits.max_message_size:
            reply = _reply(*_TOO_BIG)
        else:
            return self._ask(EndOfMessage(decoder.size), move, effect)
        return self._respond(reply, move, effect)


_Handler = Callable[[ServerConnection, CommandEvent, Move], Event | Sentinel]
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

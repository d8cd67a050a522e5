"""Every state and move of both SMTP engines, as two tables.

Theory of operation
-------------------
Each engine is a state machine whose whole shape is written down here, as h11's
``_state.py`` writes down HTTP/1.1's: an ``enum`` of states, and a table mapping
(state, input) to where the input leads.  A pair missing from a table is a move the
protocol does not allow.  What that means depends on whose move it is:

* a move of *our* side (the adapter sending a greeting, the channel sending a command
  the server engine cannot take now) raises :class:`~.errors.LocalProtocolError`;
* a command the *client* sends out of sequence is answered ``503 5.5.1`` by the server
  engine (a remote peer never causes an exception there); a reply the *server* sends
  that the client table does not expect is a :class:`~.errors.RemoteProtocolError`.

So a test can walk every (state, input) pair of each engine, and :func:`diagram` draws
both machines from the same tables (``python -c "from relay.sansio.smtp.state import
diagram; print(diagram('server'))" | dot -Tsvg > server.svg``).

**The server engine** (:data:`SERVER_TRANSITIONS`).  Inputs are the command event
classes a line parses into, :class:`~.events.AuthResponse` for a SASL line, and the
:class:`ServerInput` members for everything else (the adapter's greeting or shutdown,
the end of a message's text, a line too long, bytes where none may come...).  Most
moves wait for a reply, because the state changes when the reply is written, not when
the command is read: a :class:`Move` names the state after a positive reply (2xx, 3xx)
and after a negative one (4xx, 5xx).  Moves with no reply (entering a BDAT chunk, the
adapter's own events) take ``positive`` at once.  After any 5xx, the session's error
count may reach its limit: :attr:`ServerInput.TOO_MANY_ERRORS` closes it.

**The client engine** (:data:`CLIENT_TRANSITIONS`).  Inputs are the event classes we
send, ``(command answered, reply kind)`` pairs for the server's replies, and the
:class:`ClientInput` members (a 421, the end of the stream, a protocol error, the TLS
handshake done, a BDAT chunk's last octet sent).  Replies to MAIL, RCPT, RSET, NOOP and
to a BDAT that is not the last move nothing (with pipelining the state has moved on
already); :data:`CLIENT_STATELESS` lists them, and they must still be 2xx, 4xx or 5xx.

**Exceptions** (what is deliberately not a state):

* *Framing* inside a state: the rest of an over-long command line, and the octets of a
  BDAT chunk sent out of sequence, are dropped by the server's reader as they arrive
  (RFC 3030 says such a chunk must still be consumed).  The protocol state does not
  change: the table has the input (``LINE_TOO_LONG``, ``CHUNK_DISCARDED``) leading
  back to the same state once the error reply is written.
* *Counters and values*: octets left in a chunk, the message size so far, the number
  of recipients and of errors, the LOGIN user name between its two prompts.
* *What was negotiated*: the HELO name, ESMTP, TLS, the authenticated user, the
  server's extensions -- they decide a command's reply, not which state it leads to.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from relay.sansio.smtp.errors import LocalProtocolError
from relay.sansio.smtp.events import (
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Help,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
)
from relay.sansio.smtp.wire import SmtpReply

__all__ = [
    "CLIENT_STATELESS",
    "CLIENT_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "SYNC_POINTS",
    "ClientInput",
    "ClientState",
    "Move",
    "ReplyKind",
    "ServerInput",
    "ServerState",
    "diagram",
    "server_move",
]


# === the server engine ================================================================


class ServerState(enum.Enum):
    """Where a server session is (RFC 5321 section 4.1.4, plus the non-command states)."""

    __hash__ = object.__hash__  # members are singletons: the table lookups hash fast

    GREETING = "greeting"  # connected, greeting not sent: any input is a protocol error
    CONNECTED = "connected"  # greeted: HELO/EHLO expected
    READY = "ready"  # after HELO/EHLO: no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message text (after the 354)
    CHUNK = "chunk"  # reading the octets of an accepted BDAT chunk
    BDAT = "bdat"  # between the chunks of a BDAT (CHUNKING) transaction
    AUTH_PLAIN = "auth-plain"  # 334 sent: the line is the PLAIN response
    AUTH_LOGIN_USER = "auth-login-user"  # 334 Username: sent
    AUTH_LOGIN_PASSWORD = "auth-login-password"  # 334 Password: sent
    TLS = "tls"  # STARTTLS accepted: nothing may arrive until the handshake is done
    CLOSED = "closed"


class ServerInput(enum.Enum):
    """The server engine's inputs that are not a parsed command line."""

    __hash__ = object.__hash__  # members are singletons: the table lookups hash fast

    GREETING = "greeting"  # the adapter sends the 220
    REFUSE = "refuse"  # the adapter refuses the session at connect
    SHUTDOWN = "shutdown"  # the adapter ends the session (timeout, stopping)
    END_OF_STREAM = "end-of-stream"  # the client closed its side
    TLS_STARTED = "tls-started"  # the handshake after STARTTLS finished
    EARLY_INPUT = "early-input"  # bytes before the greeting or before the TLS handshake
    LINE_TOO_LONG = "line-too-long"  # answered 500; the rest of the line is dropped
    BAD_COMMAND = "bad-command"  # unknown, unimplemented or malformed: 5xx, no move
    NOT_SMTP = "not-smtp"  # an HTTP (or POP) verb: 421 and close
    BAD_BDAT = "bad-bdat"  # a BDAT whose length cannot be read: nothing after is safe
    CHUNK_DISCARDED = "chunk-discarded"  # a BDAT chunk that could not be taken, consumed
    SYNC_ERROR = "sync-error"  # input after a sync point, before its reply: 554, close
    TEXT_END = "text-end"  # the DATA text ended (CRLF.CRLF)
    CHUNK_END = "chunk-end"  # a BDAT chunk that is not the last was read
    LAST_CHUNK_END = "last-chunk-end"  # the BDAT LAST chunk was read
    AUTH_PLAIN = "auth-plain"  # AUTH PLAIN without initial response: 334
    AUTH_LOGIN = "auth-login"  # AUTH LOGIN without initial response: 334 Username:
    AUTH_LOGIN_USER = "auth-login-user"  # a LOGIN user name arrived: 334 Password:
    TOO_MANY_ERRORS = "too-many-errors"  # a 5xx reached the error limit: 421, close


@dataclass(frozen=True, slots=True)
class Move:
    """Where an input leads: after a positive reply, and after a negative one."""

    positive: ServerState
    negative: ServerState


ServerKey = tuple[ServerState, type | ServerInput]

_S = ServerState
_I = ServerInput
_SESSION: Final = (_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT)
_COMMAND_STATES: Final = (*_SESSION, _S.BDAT)
_AUTH_STATES: Final = (_S.AUTH_PLAIN, _S.AUTH_LOGIN_USER, _S.AUTH_LOGIN_PASSWORD)


def _both(state: ServerState) -> Move:
    return Move(state, state)


def _server_table() -> dict[ServerKey, Move]:
    t: dict[ServerKey, Move] = {}
    # the adapter's own inputs
    t[_S.GREETING, _I.GREETING] = _both(_S.CONNECTED)
    t[_S.GREETING, _I.REFUSE] = _both(_S.CLOSED)
    t[_S.TLS, _I.TLS_STARTED] = _both(_S.CONNECTED)
    for state in _S:
        t[state, _I.SHUTDOWN] = _both(_S.CLOSED)  # after CLOSED: nothing more to say
        if state is not _S.CLOSED:
            t[state, _I.END_OF_STREAM] = _both(_S.CLOSED)
    # bytes where none may come
    t[_S.GREETING, _I.EARLY_INPUT] = _both(_S.CLOSED)
    t[_S.TLS, _I.EARLY_INPUT] = _both(_S.CLOSED)
    # commands, and the lines that do not parse into one
    for state in _COMMAND_STATES:
        here = _both(state)
        t[state, _I.LINE_TOO_LONG] = here
        t[state, _I.BAD_COMMAND] = here
        t[state, _I.TOO_MANY_ERRORS] = _both(_S.CLOSED)
        t[state, _I.NOT_SMTP] = _both(_S.CLOSED)
        t[state, _I.BAD_BDAT] = _both(_S.CLOSED)
        t[state, Noop] = here
        t[state, Quit] = _both(_S.CLOSED)
    for state in _SESSION:
        here = _both(state)
        t[state, Helo] = Move(_S.READY, state)
        t[state, Ehlo] = Move(_S.READY, state)
        t[state, Vrfy] = here
        t[state, Help] = here
        t[state, Rset] = Move(_S.CONNECTED if state is _S.CONNECTED else _S.READY, state)
        t[state, _I.CHUNK_DISCARDED] = here  # BDAT out of sequence, or CHUNKING off
        t[state, _I.SYNC_ERROR] = _both(_S.CLOSED)  # (no sync point is legal in BDAT)
    t[_S.BDAT, Rset] = Move(_S.READY, _S.BDAT)
    t[_S.READY, MailFrom] = Move(_S.MAIL, _S.READY)
    t[_S.MAIL, RcptTo] = Move(_S.RCPT, _S.MAIL)
    t[_S.RCPT, RcptTo] = Move(_S.RCPT, _S.RCPT)
    t[_S.RCPT, Data] = Move(_S.DATA, _S.RCPT)
    t[_S.DATA, _I.TEXT_END] = _both(_S.READY)
    # BDAT: the command is taken at once (its octets follow without waiting)
    t[_S.RCPT, Bdat] = _both(_S.CHUNK)
    t[_S.BDAT, Bdat] = _both(_S.CHUNK)
    t[_S.CHUNK, _I.CHUNK_END] = _both(_S.BDAT)
    t[_S.CHUNK, _I.LAST_CHUNK_END] = _both(_S.READY)
    # STARTTLS and AUTH
    t[_S.READY, StartTls] = Move(_S.TLS, _S.READY)
    t[_S.READY, Auth] = _both(_S.READY)  # answered at once, or credentials to check
    t[_S.READY, _I.AUTH_PLAIN] = Move(_S.AUTH_PLAIN, _S.READY)
    t[_S.READY, _I.AUTH_LOGIN] = Move(_S.AUTH_LOGIN_USER, _S.READY)
    t[_S.READY, _I.AUTH_LOGIN_USER] = Move(_S.AUTH_LOGIN_PASSWORD, _S.READY)
    t[_S.AUTH_LOGIN_USER, _I.AUTH_LOGIN_USER] = Move(_S.AUTH_LOGIN_PASSWORD, _S.READY)
    for state in _AUTH_STATES:
        t[state, AuthResponse] = _both(_S.READY)  # credentials, cancelled or malformed
        t[state, _I.LINE_TOO_LONG] = _both(state)
        t[state, _I.TOO_MANY_ERRORS] = _both(_S.CLOSED)
        t[state, _I.SYNC_ERROR] = _both(_S.CLOSED)
    return t


SERVER_TRANSITIONS: Final[Mapping[ServerKey, Move]] = _server_table()
"""(state, input) -> :class:`Move`.  A command missing here is answered ``503 5.5.1``;
any other input missing here is a defect of the engine or the adapter."""

SYNC_POINTS: Final = frozenset({Helo, Ehlo, Data, StartTls, Auth})
"""Commands that must be the last of a pipelined group (RFC 2920, 3207, 4954)."""


def server_move(state: ServerState, key: type | ServerInput) -> Move:
    """Where ``key`` leads from ``state``; :class:`LocalProtocolError` if it cannot."""
    move = SERVER_TRANSITIONS.get((state, key))
    if move is None:
        name = key.name if isinstance(key, ServerInput) else key.__name__
        raise LocalProtocolError(f"{name} in state {state.name}")
    return move


# === the client engine ================================================================


class ClientState(enum.Enum):
    """Where a client session stands, as far as what we may send next."""

    __hash__ = object.__hash__  # members are singletons: the table lookups hash fast

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
    CHUNK = "chunk"  # BDAT sent: its octets next
    BDAT = "bdat"  # a chunk that is not the last was sent: BDAT again, RSET or QUIT
    END_OF_TEXT = "end-of-text"  # waiting for the final reply
    QUIT_SENT = "quit-sent"
    CLOSED = "closed"  # 421, the end of the stream, or after QUIT
    ERROR = "error"  # the server broke the protocol


class ReplyKind(enum.Enum):
    """The class of a reply code, as the client table is keyed on it."""

    POSITIVE = 2
    INTERMEDIATE = 3
    NEGATIVE = 4  # 4xx and 5xx alike: the protocol moves the same way

    @classmethod
    def of(cls, reply: SmtpReply) -> ReplyKind:
        """The kind of ``reply``."""
        return cls(min(reply.code // 100, 4))


class ClientInput(enum.Enum):
    """The client engine's inputs that are neither an event sent nor an expected reply."""

    __hash__ = object.__hash__  # members are singletons: the table lookups hash fast

    CLOSING_REPLY = "closing-reply"  # a 421 (to any command but QUIT, or unasked)
    END_OF_STREAM = "end-of-stream"
    PROTOCOL_ERROR = "protocol-error"  # the server broke the protocol
    TLS_STARTED = "tls-started"  # the handshake after STARTTLS finished
    CHUNK_SENT = "chunk-sent"  # the last octet of a BDAT chunk (not LAST) went out
    LAST_CHUNK_SENT = "last-chunk-sent"  # the last octet of the BDAT LAST chunk went out


ClientKey = tuple[ClientState, "type | tuple[Command, ReplyKind] | ClientInput"]

_C = ClientState
_P, _IM, _N = ReplyKind.POSITIVE, ReplyKind.INTERMEDIATE, ReplyKind.NEGATIVE


def _client_table() -> dict[ClientKey, ClientState]:
    t: dict[ClientKey, ClientState] = {}
    # what we send
    t[_C.HELLO, Ehlo] = _C.HELLO_SENT
    t[_C.HELLO, Helo] = _C.HELLO_SENT
    t[_C.READY, Ehlo] = _C.HELLO_SENT
    t[_C.READY, StartTls] = _C.STARTTLS_SENT
    t[_C.READY, Auth] = _C.AUTH
    t[_C.AUTH_CHALLENGE, AuthResponse] = _C.AUTH
    t[_C.READY, MailFrom] = _C.MAIL
    t[_C.MAIL, RcptTo] = _C.RCPT
    t[_C.RCPT, RcptTo] = _C.RCPT
    t[_C.RCPT, Data] = _C.DATA_SENT
    t[_C.TEXT, MessageData] = _C.TEXT
    t[_C.TEXT, EndOfMessage] = _C.END_OF_TEXT
    t[_C.RCPT, Bdat] = _C.CHUNK
    t[_C.BDAT, Bdat] = _C.CHUNK
    t[_C.CHUNK, MessageData] = _C.CHUNK
    t[_C.CHUNK, ClientInput.CHUNK_SENT] = _C.BDAT
    t[_C.CHUNK, ClientInput.LAST_CHUNK_SENT] = _C.END_OF_TEXT
    for state in (_C.READY, _C.MAIL, _C.RCPT, _C.BDAT):
        t[state, Rset] = _C.READY
    t[_C.READY, Noop] = _C.READY
    t[_C.HELLO, Noop] = _C.HELLO
    for state in (_C.HELLO, _C.READY, _C.REFUSED, _C.MAIL, _C.RCPT, _C.BDAT):
        t[state, Quit] = _C.QUIT_SENT
    # the replies that move the state
    t[_C.GREETING, (Command.GREETING, _P)] = _C.HELLO
    t[_C.GREETING, (Command.GREETING, _N)] = _C.REFUSED
    for hello in (Command.EHLO, Command.HELO):
        t[_C.HELLO_SENT, (hello, _P)] = _C.READY
        t[_C.HELLO_SENT, (hello, _N)] = _C.HELLO
    t[_C.STARTTLS_SENT, (Command.STARTTLS, _P)] = _C.TLS_HANDSHAKE
    t[_C.STARTTLS_SENT, (Command.STARTTLS, _N)] = _C.READY
    t[_C.AUTH, (Command.AUTH, _P)] = _C.READY
    t[_C.AUTH, (Command.AUTH, _IM)] = _C.AUTH_CHALLENGE
    t[_C.AUTH, (Command.AUTH, _N)] = _C.READY
    t[_C.DATA_SENT, (Command.DATA, _IM)] = _C.TEXT
    t[_C.DATA_SENT, (Command.DATA, _N)] = _C.READY
    for end in (Command.END_OF_DATA, Command.BDAT_LAST):
        t[_C.END_OF_TEXT, (end, _P)] = _C.READY
        t[_C.END_OF_TEXT, (end, _N)] = _C.READY
    for kind in ReplyKind:
        t[_C.QUIT_SENT, (Command.QUIT, kind)] = _C.CLOSED
    # the rest
    t[_C.TLS_HANDSHAKE, ClientInput.TLS_STARTED] = _C.HELLO
    for state in _C:
        t[state, ClientInput.PROTOCOL_ERROR] = _C.ERROR
        if state is not _C.ERROR:
            t[state, ClientInput.END_OF_STREAM] = _C.CLOSED
            t[state, ClientInput.CLOSING_REPLY] = _C.CLOSED
    return t


CLIENT_TRANSITIONS: Final[Mapping[ClientKey, ClientState]] = _client_table()
"""(state, input) -> next state.  A missing event we send is a LocalProtocolError; a
missing reply is a RemoteProtocolError unless its command is in :data:`CLIENT_STATELESS`."""

CLIENT_STATELESS: Final = frozenset(
    {Command.MAIL, Command.RCPT, Command.RSET, Command.NOOP, Command.BDAT}
)
"""Commands whose replies never move the client's state (they must not be 3xx)."""


# === the diagram ======================================================================


def _label(key: object) -> str:
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, tuple):
        command, kind = key
        return f"{command.name} {kind.name.lower()}"
    assert isinstance(key, enum.Enum)
    return key.name.lower()


def _edges(table: Mapping[Any, object]) -> Iterator[tuple[str, str, str]]:
    for (state, key), target in table.items():
        if isinstance(target, Move):
            yield state.name, target.positive.name, _label(key)
            if target.negative is not target.positive:
                yield state.name, target.negative.name, _label(key) + " (refused)"
        else:
            assert isinstance(target, enum.Enum)
            yield state.name, target.name, _label(key)


def diagram(which: str = "server") -> str:
    """The ``which`` engine's machine as Graphviz ``dot`` text, drawn from its table."""
    table: Mapping[Any, object] = SERVER_TRANSITIONS if which == "server" else CLIENT_TRANSITIONS
    lines = [f'digraph "{which}" {{', "  rankdir=LR;"]
    labels: dict[tuple[str, str], list[str]] = {}
    for source, target, label in _edges(table):
        labels.setdefault((source, target), []).append(label)
    lines += [
        f'  {source} -> {target} [label="{_wrap(names)}"];'
        for (source, target), names in labels.items()
    ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _wrap(names: Iterable[str]) -> str:
    return "\\n".join(sorted(set(names)))

"""A scripted SMTP server for the SMTP client tests: real TCP on 127.0.0.1, real TLS.

Written independently of the relay's own SMTP code (its own line and dot handling), so a
test that passes shows the client interoperates with a second implementation, not with
itself.  The test says how the server behaves through a :class:`Script`:

* which extensions the EHLO reply lists (PIPELINING, SIZE, 8BITMIME, SMTPUTF8, STARTTLS
  when a TLS context is given, AUTH when users are given), or a failing EHLO;
* the reply to each command: a queue of replies per verb (``MAIL``, ``RCPT``, ``DATA``,
  ``.`` for the end of data, ``RSET``, …), shared by all connections, and/or a reply
  per recipient address;
* a reply of :data:`CLOSE` drops the connection without answering; a ``421`` reply is
  sent and the connection closed after it, as a real server does;
* ``broken_tls``: 220 to STARTTLS, then plain junk in answer to the TLS ClientHello;
* ``close_in_text_after``: drop the connection once that many octets of message text
  arrived (a server dying during DATA);
* ``final_delay``: wait that many seconds (on the reactor given to
  :func:`start_server`) before the reply to the end of data, reading nothing meanwhile
  (a server whose disk is slow: the message is already in :attr:`SessionLog.transactions`).

It records what it saw (:class:`SessionLog`): the command lines, which of them arrived
in one TCP read (for pipelining checks: a client that does not pipeline can never have
sent a second command before reading the first reply), and each transaction's envelope
and text (both as sent, dot-stuffed, and unstuffed).
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol

__all__ = ["CLOSE", "Script", "ScriptedSmtpFactory", "SessionLog", "Transaction", "start_server"]

CLOSE = "<close>"
"""A scripted reply that drops the connection without answering."""


@dataclass
class Script:
    """How the server behaves; see the module docstring."""

    greeting: str = "220 scripted.test ESMTP ready"
    extensions: tuple[str, ...] = (
        "PIPELINING",
        "SIZE 10485760",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    )
    ehlo: str | None = None
    replies: dict[str, list[str]] = field(default_factory=dict)
    rcpt: dict[str, str] = field(default_factory=dict)
    close_in_text_after: int | None = None
    tls: Any = None  # a server context factory: STARTTLS is offered
    broken_tls: bool = False  # answer STARTTLS with 220, then send plain garbage, not TLS
    users: dict[str, str] | None = None  # AUTH is offered, with these mechanisms
    auth_mechanisms: str = "PLAIN LOGIN"
    final_delay: float = 0.0  # seconds before the reply to the final dot


@dataclass
class Transaction:
    """One MAIL transaction as the server saw it."""

    mail: str
    rcpts: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    raw_text: bytes = b""
    text: bytes | None = None  # unstuffed, set when the final dot arrived


@dataclass
class SessionLog:
    """One connection as the server saw it."""

    commands: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    tls: bool = False
    auth_user: str | None = None
    closed: bool = False
    helo: str | None = None


class _ScriptedSmtp(protocol.Protocol):
    """One server connection following the factory's script."""

    factory: ScriptedSmtpFactory

    def connectionMade(self) -> None:
        self.log = SessionLog()
        self.factory.sessions.append(self.log)
        self.factory.connected.add(self)
        self.script = self.factory.script
        self.queues = self.factory.queues
        self.buffer = b""
        self.in_text = False
        self.text_lines: list[bytes] = []
        self.current: Transaction | None = None
        self.auth_login: list[str] | None = None
        self.greeted = False
        self.delaying = False  # a delayed reply to the final dot is pending
        self.tls_garbage = False
        self._reply(self.script.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.log.closed = True
        self.factory.connected.discard(self)

    # --- input ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.tls_garbage:
            self.transport.write(b"this is not a TLS record\r\n" * 8)  # type: ignore[union-attr]
            self._close()
            return
        self.buffer += data
        batch: list[str] = []
        while self.transport is not None and not self.log.closed and not self.delaying:
            if self.in_text:
                if not self._take_text():
                    break
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            text = line.decode("utf-8", "replace")
            batch.append(text)
            self.log.commands.append(text)
            if not self._command(text):
                break
        if batch:
            self.log.batches.append(batch)

    def _take_text(self) -> bool:
        """Consume text lines; True when more input may be processed."""
        limit = self.script.close_in_text_after
        while True:
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                if limit is not None and self._text_size() + len(self.buffer) >= limit:
                    self._close()
                return False
            self.buffer = rest
            assert self.current is not None
            if line == b".":
                self.in_text = False
                raw = b"".join(x + b"\r\n" for x in self.text_lines)
                self.current.raw_text = raw
                self.current.text = b"".join(
                    (x[1:] if x.startswith(b".") else x) + b"\r\n" for x in self.text_lines
                )
                self.log.commands.append(".")
                reply = self._next("."), "250 2.0.0 Ok: queued as SCRIPTED"
                self.current = None
                if self.script.final_delay > 0:
                    self.delaying = True
                    self.factory.clock.callLater(
                        self.script.final_delay, self._delayed_answer, reply[0] or reply[1]
                    )
                    return False
                self._answer(reply[0] or reply[1])
                return True
            self.text_lines.append(line)
            if limit is not None and self._text_size() >= limit:
                self._close()
                return False

    def _delayed_answer(self, reply: str) -> None:
        """The reply to the final dot, ``final_delay`` late; then the input read meanwhile."""
        self.delaying = False
        if self.log.closed:
            return
        if self._answer(reply):
            self.dataReceived(b"")

    def _text_size(self) -> int:
        return sum(len(x) + 2 for x in self.text_lines)

    # --- commands ------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        """Answer one command line; False when the connection was closed."""
        if self.auth_login is not None:
            return self._auth_login_step(line)
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        scripted = self._next(verb)
        if verb == "EHLO":
            return self._ehlo(arg, scripted)
        if verb == "HELO":
            self.log.helo = arg
            return self._answer(scripted or "250 scripted.test")
        if verb == "STARTTLS" and self.script.tls is not None and not self.log.tls:
            if scripted:
                return self._answer(scripted)
            self._reply("220 2.0.0 Ready to start TLS")
            if self.script.broken_tls:
                self.tls_garbage = True  # answer the ClientHello with junk
                return False
            self.transport.startTLS(self.script.tls)  # type: ignore[union-attr]
            self.log.tls = True
            self.greeted = False
            return True
        if verb == "AUTH" and self.script.users is not None:
            return self._auth(arg, scripted)
        if verb == "MAIL":
            self.current = Transaction(arg)
            self.log.transactions.append(self.current)
            return self._answer(scripted or "250 2.1.0 Ok")
        if verb == "RCPT":
            return self._rcpt(arg, scripted)
        if verb == "DATA":
            return self._data(scripted)
        if verb == "RSET":
            self.current = None
            return self._answer(scripted or "250 2.0.0 Ok")
        if verb == "NOOP":
            return self._answer(scripted or "250 2.0.0 Ok")
        if verb == "QUIT":
            self._reply(scripted or "221 2.0.0 Bye")
            self._close()
            return False
        return self._answer(scripted or "502 5.5.2 Error: command not recognized")

    def _ehlo(self, arg: str, scripted: str | None) -> bool:
        self.log.helo = arg
        reply = scripted or self.script.ehlo
        if reply is not None:
            return self._answer(reply)
        extensions = list(self.script.extensions)
        if self.script.tls is not None and not self.log.tls:
            extensions.append("STARTTLS")
        if self.script.users is not None:
            extensions.append(f"AUTH {self.script.auth_mechanisms}")
        lines = ["scripted.test", *extensions]
        text = "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n" for i, x in enumerate(lines)
        )
        self.transport.write(text.encode())  # type: ignore[union-attr]
        self.greeted = True
        return True

    def _rcpt(self, arg: str, scripted: str | None) -> bool:
        address = arg.partition(":")[2].partition(">")[0].lstrip("<")
        reply = self.script.rcpt.get(address) or scripted or "250 2.1.5 Ok"
        if self.current is None:
            reply = scripted or "503 5.5.1 Error: need MAIL command"
        else:
            self.current.rcpts.append(address)
            if reply.startswith("2"):
                self.current.accepted.append(address)
        return self._answer(reply)

    def _data(self, scripted: str | None) -> bool:
        if scripted:
            return self._answer(scripted)
        if self.current is None or not self.current.accepted:
            return self._answer("554 5.5.1 Error: no valid recipients")
        self.in_text = True
        self.text_lines = []
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        return True

    def _auth(self, arg: str, scripted: str | None) -> bool:
        assert self.script.users is not None
        if scripted:
            return self._answer(scripted)
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            try:
                _, user, password = base64.b64decode(initial).decode().split("\0")
            except ValueError:
                return self._answer("501 5.5.2 bad PLAIN response")
            return self._auth_result(user, password)
        if mechanism.upper() == "LOGIN":
            self.auth_login = []
            self._reply("334 VXNlcm5hbWU6")
            return True
        return self._answer("504 5.5.4 unknown mechanism")

    def _auth_login_step(self, line: str) -> bool:
        assert self.auth_login is not None
        self.auth_login.append(base64.b64decode(line).decode())
        if len(self.auth_login) == 1:
            self._reply("334 UGFzc3dvcmQ6")
            return True
        user, password = self.auth_login
        self.auth_login = None
        return self._auth_result(user, password)

    def _auth_result(self, user: str, password: str) -> bool:
        assert self.script.users is not None
        if self.script.users.get(user) == password:
            self.log.auth_user = user
            return self._answer("235 2.7.0 Authentication successful")
        return self._answer("535 5.7.8 Error: authentication failed")

    # --- output --------------------------------------------------------------------

    def _next(self, verb: str) -> str | None:
        queue = self.queues.get(verb)
        return queue.popleft() if queue else None

    def _answer(self, reply: str) -> bool:
        """Send ``reply`` (or act on CLOSE / 421); False when the connection is gone."""
        if reply == CLOSE:
            self._close()
            return False
        self._reply(reply)
        if reply.startswith("421"):
            self._close()
            return False
        return True

    def _reply(self, reply: str) -> None:
        if reply == CLOSE:
            self._close()
            return
        self.transport.write(reply.encode() + b"\r\n")  # type: ignore[union-attr]
        if reply.startswith("421"):
            self._close()

    def _close(self) -> None:
        self.log.closed = True
        self.transport.loseConnection()  # type: ignore[union-attr]


class ScriptedSmtpFactory(protocol.Factory):
    """Makes scripted connections; ``sessions`` logs every connection, in order."""

    protocol = _ScriptedSmtp
    noisy = False

    def __init__(self, script: Script) -> None:
        self.script = script
        # one queue per verb for the whole server: a second connection goes on where
        # the first stopped (a script can fail the first attempt and accept the retry)
        self.queues = {verb: deque(replies) for verb, replies in script.replies.items()}
        self.sessions: list[SessionLog] = []
        self.clock: Any = None  # the reactor start_server() listens with (for final_delay)
        self.connected: set[_ScriptedSmtp] = set()  # the connections open now

    def holding(self) -> int:
        """How many open connections have a final dot whose reply is still delayed."""
        return sum(1 for connection in self.connected if connection.delaying)


def start_server(
    reactor: Any, script: Script, interface: str = "127.0.0.1"
) -> tuple[Any, ScriptedSmtpFactory]:
    """Listen on an ephemeral port; return (the listening port, the factory)."""
    factory = ScriptedSmtpFactory(script)
    factory.clock = reactor
    port = reactor.listenTCP(0, factory, interface=interface)
    return port, factory

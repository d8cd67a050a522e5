"""A Hayes modem, dialling out and answering, on the chat engine.

Theory of operation
-------------------
Talking to a Hayes modem is a chat (:mod:`relay.sansio.chat`): each init command is sent
and ``OK`` awaited, then the dial command (``ATDT`` and the number) and ``CONNECT``.
The modem's other result codes end the chat as fail strings, each mapped to the reply
the deliverer acts on (:data:`RESULT_REPLIES`): ``BUSY`` is a retry of this call, not
a dead site (``AGN``); ``NO CARRIER`` and ``NO ANSWER`` mean the far end could not be
reached (``DHST``: the site's other mail waits too); ``NO DIALTONE`` is a fault of our
own line (``NIO``); ``ERROR`` means the modem refused a command of our configuration
(``LIO``, a local problem, retried); silence is a timeout (``TIME``).

After ``CONNECT`` the rest of the result line (``CONNECT 115200/ARQ``) is read to learn
the rate; the bytes after it already belong to the call and are handed on in
:class:`Connected`.  Answering is the same engine with another script: the init
commands, then ``RING`` (awaited for ever), ``ATA`` and ``CONNECT``.

Hanging up (:func:`hangup_script`) drops DTR for half a second (a modem set ``&D2``
hangs up), then, in case it did not, waits the guard time, sends ``+++``, waits for
its ``OK`` and sends ``ATH0``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from relay.reply import Reply, ReplyCode
from relay.sansio.chat import (
    Chat,
    ChatError,
    ChatEvent,
    ChatFailed,
    ChatFailure,
    ChatScript,
    ChatStep,
    ChatSucceeded,
    Expectation,
    Pause,
    Send,
    SendBreak,
    SendString,
    SetDTR,
)

__all__ = [
    "RESULT_REPLIES",
    "Connected",
    "ModemChat",
    "ModemEvent",
    "ModemFailed",
    "answer_script",
    "chat_failure_reply",
    "dial_command",
    "dial_script",
    "hangup_script",
]

COMMAND_TIMEOUT: Final = 5.0  # seconds for OK after an init command
DIAL_TIMEOUT: Final = 60.0  # seconds for a result code after ATD (a modem's S7 is ~50)
LINE_TIMEOUT: Final = 2.0  # seconds for the rest of the CONNECT line
MAX_RESULT_LINE: Final = 80  # bytes of "CONNECT ..." read before giving up on its end
GUARD_TIME: Final = 1.0  # the escape sequence's guard time (S12 = 50 fiftieths)

RESULT_REPLIES: Final[dict[str, ReplyCode]] = {
    "BUSY": ReplyCode.AGN,
    "NO CARRIER": ReplyCode.DHST,
    "NO ANSWER": ReplyCode.DHST,
    "NO DIALTONE": ReplyCode.NIO,
    "NO DIAL TONE": ReplyCode.NIO,
    "ERROR": ReplyCode.LIO,
}

_DIAL_WORD = re.compile(r"[0-9A-Za-z*#,;!@&=+./ ()\-WTPwtp]{1,60}")
_RATE = re.compile(rb"\s*(\d{3,7})")


def _command(text: str) -> bytes:
    """One AT command as sent, checked: printable ASCII, one line, AT first."""
    if not text.isascii() or not text.isprintable() or not 2 <= len(text) <= 120:
        raise ChatError(f"not a modem command: {text!r}")
    if not text[:2].upper() == "AT":
        raise ChatError(f"a modem command starts with AT: {text!r}")
    return text.encode("ascii") + b"\r"


def dial_command(dial: str) -> bytes:
    """The dial command for a ``dial`` setting: ``ATDT5551234`` as is, a number gets ATDT."""
    if dial[:2].upper() == "AT":
        return _command(dial)
    if not _DIAL_WORD.fullmatch(dial):
        raise ChatError(f"not a phone number: {dial!r}")
    return _command("ATDT" + dial)


def _fail_strings() -> dict[bytes, str]:
    return {name.encode("ascii"): name for name in RESULT_REPLIES}


def _init_steps(init: Sequence[str]) -> list[ChatStep]:
    """Send each init command and await its OK (the first is sent at once)."""
    steps = []
    previous = b""
    for command in init:
        steps.append(ChatStep(Expectation(previous), SendString.of(_command(command)), None))
        previous = b"OK"
    if init:
        steps.append(ChatStep(Expectation(b"OK"), None, None))
    return steps


def _with_timeouts(steps: list[ChatStep], timeout: float) -> list[ChatStep]:
    return [ChatStep(s.expect, s.send, timeout if s.timeout is None else s.timeout) for s in steps]


def dial_script(
    init: Sequence[str],
    dial: str,
    *,
    command_timeout: float = COMMAND_TIMEOUT,
    dial_timeout: float = DIAL_TIMEOUT,
) -> ChatScript:
    """Init commands (each answered OK), the dial command, then CONNECT awaited."""
    steps = _with_timeouts(_init_steps(init), command_timeout)
    steps.append(ChatStep(Expectation(b""), SendString.of(dial_command(dial)), command_timeout))
    steps.append(ChatStep(Expectation(b"CONNECT"), None, dial_timeout))
    return ChatScript(tuple(steps), tuple(_fail_strings().items()))


def answer_script(
    init: Sequence[str],
    *,
    command_timeout: float = COMMAND_TIMEOUT,
    answer_timeout: float = DIAL_TIMEOUT,
) -> ChatScript:
    """Init commands (each answered OK), then RING awaited for ever, ATA, and CONNECT."""
    steps = _with_timeouts(_init_steps(init), command_timeout)
    steps.append(ChatStep(Expectation(b"RING"), SendString.of(b"ATA\r"), float("inf")))
    steps.append(ChatStep(Expectation(b"CONNECT"), None, answer_timeout))
    fail = {b"NO CARRIER": "NO CARRIER", b"ERROR": "ERROR"}
    return ChatScript(tuple(steps), tuple(fail.items()))


def hangup_script(guard: float = GUARD_TIME) -> ChatScript:
    """Drop DTR; then ``+++`` after a guard time, OK awaited, and ``ATH0``, OK awaited.

    A modem that DTR already hung up is in command mode and does not answer ``+++``;
    the alternate then sends ``ATH0`` anyway.  The guard time before ``+++`` also lets
    the call's last bytes leave the port."""
    hang_up = SendString.of(b"ATH0\r")
    drop = SendString((SetDTR(False), Pause(0.5), SetDTR(True), Pause(guard), b"+++"))
    steps = (
        ChatStep(Expectation(b""), drop, None),
        ChatStep(Expectation(b"OK", ((hang_up, b"OK"),)), hang_up, guard + 2.0),
        ChatStep(Expectation(b"OK"), None, COMMAND_TIMEOUT),
    )
    return ChatScript(steps)


def chat_failure_reply(failed: ChatFailed) -> Reply:
    """The reply for a chat that did not get through (a modem's or a login's)."""
    if failed.failure is ChatFailure.FAIL_STRING:
        code = RESULT_REPLIES.get(failed.label, ReplyCode.BHST)
        return Reply(code, f"modem or far end said {failed.label}")
    if failed.failure is ChatFailure.TIMEOUT:
        return Reply(ReplyCode.TIME, failed.reason)
    return Reply(ReplyCode.DHST, failed.reason)


@dataclass(frozen=True)
class Connected:
    """The call is up: ``rate`` from the CONNECT line if given, ``rest`` the call's bytes."""

    rate: int | None
    rest: bytes


@dataclass(frozen=True)
class ModemFailed:
    """The modem did not connect; ``reply`` says what the deliverer makes of it."""

    reply: Reply


ModemEvent = Send | SendBreak | SetDTR | Connected | ModemFailed


class ModemChat:
    """Runs a modem script ending in CONNECT, then reads the CONNECT line's rate."""

    def __init__(self, script: ChatScript, now: float) -> None:
        self._chat = Chat(script, now)
        self._line: bytearray | None = None  # after CONNECT: the rest of its line
        self._line_deadline: float | None = None
        self._events: list[ModemEvent] = []
        self._done = False
        self._pump(now)

    @property
    def done(self) -> bool:
        """True once connected or failed."""
        return self._done

    def next_event(self) -> ModemEvent | None:
        """The next action or outcome; None when there is nothing more for now."""
        return self._events.pop(0) if self._events else None

    def next_deadline(self) -> float | None:
        """When :meth:`tick` is due."""
        if self._done:
            return None
        if self._line is not None:
            return self._line_deadline
        return self._chat.next_deadline()

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the modem; ``b""`` means the line closed."""
        if self._done:
            return
        if self._line is None:
            self._chat.receive_data(data, now)
            self._pump(now)
            return
        if not data:
            self._connected(None)
            return
        self._line += data
        self._read_line()

    def tick(self, now: float) -> None:
        """Time has passed."""
        if self._done:
            return
        if self._line is None:
            self._chat.tick(now)
            self._pump(now)
        elif self._line_deadline is not None and now >= self._line_deadline:
            self._connected(None)

    def _pump(self, now: float) -> None:
        while not self._done and self._line is None:
            event = self._chat.next_event()
            if event is None:
                return
            if isinstance(event, ChatSucceeded):
                self._line = bytearray(event.rest)
                self._line_deadline = now + LINE_TIMEOUT
                self._read_line()
            elif isinstance(event, ChatFailed):
                self._done = True
                self._events.append(ModemFailed(chat_failure_reply(event)))
            else:
                self._events.append(_as_modem_event(event))

    def _read_line(self) -> None:
        assert self._line is not None
        for index, byte in enumerate(self._line):
            if byte in b"\r\n":
                self._connected(index)
                return
        if len(self._line) > MAX_RESULT_LINE:
            self._connected(None)

    def _connected(self, end: int | None) -> None:
        """Report the call; ``end`` is where the CONNECT line ends (None: not seen)."""
        assert self._line is not None
        line = bytes(self._line)
        rate = None
        rest = line
        if end is not None:
            found = _RATE.match(line[:end])
            rate = int(found.group(1)) if found else None
            rest = line[end + 2 :] if line[end : end + 2] == b"\r\n" else line[end + 1 :]
        self._done = True
        self._events.append(Connected(rate, rest))


def _as_modem_event(event: ChatEvent) -> ModemEvent:
    assert isinstance(event, Send | SendBreak | SetDTR)
    return event

"""The chat engine: runs a chat script (:mod:`relay.sansio.chatscript`) against a line.

Theory of operation
-------------------
:class:`Chat` is sans-I/O: bytes in (``receive_data``), actions out (``next_event``:
:class:`Send`, :class:`SendBreak`, :class:`~relay.sansio.chatscript.SetDTR`), a deadline
out (``next_deadline``) and ``tick(now)`` when it has passed.  For each step it sends
what is queued (holding the rest of a send through its pauses), then awaits the expect;
a timeout runs the expect's next alternate or ends the chat.  It ends with
:class:`ChatSucceeded` (carrying the bytes read after the last match, which belong to
whoever takes over the line) or :class:`ChatFailed` (a timeout, a fail string such as
``BUSY`` seen, or the line closed).  Matching ignores the eighth bit by default (a
getty on a 7E1 line sends parity), and memory stays bounded whatever arrives: only the
tail that could still be the start of a match is kept.

The script's model and parser are re-exported here, so one import serves a caller.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from relay.sansio.chatscript import (
    BREAK,
    DEFAULT_TIMEOUT,
    ChatError,
    ChatScript,
    ChatStep,
    Expectation,
    Pause,
    SendPiece,
    SendString,
    SetDTR,
    parse_chat,
    parse_send,
)

__all__ = [
    "BREAK",
    "DEFAULT_TIMEOUT",
    "Chat",
    "ChatError",
    "ChatEvent",
    "ChatFailed",
    "ChatFailure",
    "ChatScript",
    "ChatStep",
    "ChatSucceeded",
    "Expectation",
    "Pause",
    "Send",
    "SendBreak",
    "SendString",
    "SetDTR",
    "parse_chat",
    "parse_send",
]

# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write these bytes to the line."""

    data: bytes


@dataclass(frozen=True)
class SendBreak:
    """Send a break on the line."""


class ChatFailure(enum.Enum):
    """Why a chat ended without reaching its last expect."""

    TIMEOUT = "timeout"
    FAIL_STRING = "fail-string"
    CLOSED = "closed"


@dataclass(frozen=True)
class ChatSucceeded:
    """Every expect was met; ``rest`` is what arrived after the last match."""

    rest: bytes


@dataclass(frozen=True)
class ChatFailed:
    """The chat ended early; ``label`` names the fail string seen, ``expected`` the wait."""

    failure: ChatFailure
    expected: bytes = b""
    label: str = ""

    @property
    def reason(self) -> str:
        """One line for a log."""
        if self.failure is ChatFailure.FAIL_STRING:
            return f"got {self.label}"
        if self.failure is ChatFailure.TIMEOUT:
            return f"timed out waiting for {self.expected!r}"
        return f"line closed while waiting for {self.expected!r}"


ChatEvent = Send | SendBreak | SetDTR | ChatSucceeded | ChatFailed


# --- the engine --------------------------------------------------------------------------


class _State(enum.Enum):
    SENDING = "sending"  # pieces queued, maybe paused
    EXPECTING = "expecting"
    DONE = "done"


@dataclass
class _Wait:
    """The expect now awaited and what is left to try when it times out."""

    text: bytes
    fallbacks: list[tuple[SendString, bytes]] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT


def _seven_bit(data: bytes | bytearray) -> bytes:
    return bytes(b & 0x7F for b in data)


class Chat:
    """Runs one :class:`ChatScript` against a line (sans-I/O; times are ``now`` seconds)."""

    def __init__(
        self,
        script: ChatScript,
        now: float,
        *,
        default_timeout: float = DEFAULT_TIMEOUT,
        seven_bit: bool = True,
    ) -> None:
        self._script = script
        self._steps = deque(script.steps)
        self._default_timeout = default_timeout
        self._seven_bit = seven_bit
        self._buffer = bytearray()  # raw bytes not yet matched, bounded
        self._keep = max(
            [len(t) for t, _ in script.fail]
            + [len(e) for s in script.steps for e in (s.expect.expect,)]
            + [len(e) for s in script.steps for _, e in s.expect.alternates]
            + [1]
        )
        self._events: deque[ChatEvent] = deque()
        self._outgoing: deque[SendPiece] = deque()
        self._resume_at: float | None = None
        self._wait: _Wait | None = None
        self._deadline: float | None = None
        self._step_send: SendString | None = None
        self._state = _State.SENDING
        self._advance(now)

    @property
    def done(self) -> bool:
        """True once the chat has succeeded or failed."""
        return self._state is _State.DONE

    def next_event(self) -> ChatEvent | None:
        """The next action or the end; None when there is nothing more for now."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called (end of a pause or of an expect's time)."""
        if self._state is _State.SENDING:
            return self._resume_at
        if self._state is _State.EXPECTING and self._deadline != float("inf"):
            return self._deadline
        return None

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the far end; ``b""`` means the line closed."""
        if self._state is _State.DONE:
            return
        if not data:
            expected = self._wait.text if self._wait else b""
            self._finish(ChatFailed(ChatFailure.CLOSED, expected))
            return
        self._buffer += data
        if self._state is _State.EXPECTING:
            if self._match():
                self._advance(now)
        else:
            self._check_fail()
            self._trim()

    def tick(self, now: float) -> None:
        """Time has passed: end a pause, or time out the expect awaited."""
        if self._state is _State.SENDING:
            if self._resume_at is not None and now >= self._resume_at:
                self._resume_at = None
                self._advance(now)
        elif (
            self._state is _State.EXPECTING and self._deadline is not None and now >= self._deadline
        ):
            self._timed_out(now)

    # --- internals -----------------------------------------------------------------------

    def _finish(self, event: ChatSucceeded | ChatFailed) -> None:
        self._state = _State.DONE
        self._outgoing.clear()
        self._events.append(event)
        self._buffer.clear()

    def _advance(self, now: float) -> None:
        """Send what is queued (up to a pause), then await the next expect."""
        while self._state is not _State.DONE:
            while self._outgoing:
                piece = self._outgoing.popleft()
                if isinstance(piece, Pause):
                    self._state = _State.SENDING
                    self._resume_at = now + piece.seconds
                    return
                if isinstance(piece, bytes):
                    self._events.append(Send(piece))
                elif isinstance(piece, SetDTR):
                    self._events.append(piece)
                else:
                    self._events.append(SendBreak())
            if self._wait is None:
                if not self._steps:
                    self._finish(ChatSucceeded(bytes(self._buffer)))
                    return
                step = self._steps.popleft()
                timeout = self._default_timeout if step.timeout is None else step.timeout
                self._wait = _Wait(step.expect.expect, list(step.expect.alternates), timeout)
                self._step_send = step.send
            self._state = _State.EXPECTING
            self._deadline = now + self._wait.timeout
            if not self._match():
                return

    def _find(self, text: bytes, view: bytes) -> int | None:
        """The end offset of ``text`` in ``view``, or None."""
        if not text:
            return 0
        found = view.find(text)
        return None if found < 0 else found + len(text)

    def _check_fail(self) -> bool:
        view = _seven_bit(self._buffer) if self._seven_bit else bytes(self._buffer)
        return self._fail_in(view, None)

    def _fail_in(self, view: bytes, before: int | None) -> bool:
        best: tuple[int, str] | None = None
        for text, label in self._script.fail:
            end = self._find(text, view)
            if end is not None and (best is None or end < best[0]):
                best = (end, label)
        if best is None or (before is not None and best[0] > before):
            return False
        expected = self._wait.text if self._wait else b""
        self._finish(ChatFailed(ChatFailure.FAIL_STRING, expected, best[1]))
        return True

    def _match(self) -> bool:
        """Look for the awaited string; on a match queue the step's send.  True if matched."""
        wait = self._wait
        assert wait is not None
        view = _seven_bit(self._buffer) if self._seven_bit else bytes(self._buffer)
        end = self._find(wait.text, view)
        if self._fail_in(view, end):
            return False
        if end is None:
            self._trim()
            return False
        del self._buffer[:end]
        self._wait = None
        self._deadline = None
        if self._step_send is not None:
            self._outgoing.extend(self._step_send.pieces)
        self._step_send = None
        return True

    def _trim(self) -> None:
        keep = self._keep - 1
        if len(self._buffer) > keep:
            del self._buffer[: len(self._buffer) - keep]

    def _timed_out(self, now: float) -> None:
        wait = self._wait
        assert wait is not None
        if not wait.fallbacks:
            self._finish(ChatFailed(ChatFailure.TIMEOUT, wait.text))
            return
        send, expect = wait.fallbacks.pop(0)
        wait.text = expect
        self._outgoing.extend(send.pieces)
        self._state = _State.SENDING
        self._advance(now)

"""Chat scripts as UUCP's ``Systems`` file writes them: their model and their parser.

A chat script is a list of fields, expect and send in turn: ``"" \\r ogin:-BREAK-ogin:
nuucp ssword: secret``.  For each pair the engine (:mod:`relay.sansio.chat`) waits for
the expect string in what the far end sends, then sends the send string.  An expect
field may carry alternates, ``expect-send-expect...``: when the first expect times out,
the sub-send is sent and the next sub-expect awaited (``ogin:--ogin:`` sends a bare
carriage return and looks again).  ``""`` expects nothing.  Every send string ends with
a carriage return unless it contains ``\\c``.

Escapes (Taylor UUCP's and HoneyDanBer's, as an operator's existing script uses them):
in both kinds of string ``\\b \\n \\r \\s \\t \\\\ \\-`` (a dash that does not split
alternates), ``\\N`` (NUL), ``\\ddd`` (octal) and ``\\xhh`` (hex); in a send string also
``\\c`` (no carriage return at the end), ``\\d`` (pause one second), ``\\p`` (pause a
quarter second), ``\\K`` (send a break), and substitutions given by the caller (``\\D``
and ``\\T`` the phone number, ``\\L`` the login name, ``\\P`` the password).  The send
words ``BREAK`` and ``EOT`` mean a break and ``^D\\n^D\\n``.  Escapes that act on the
port in UUCP (echo checking ``\\E``/``\\e``, ``\\M``/``\\m``, ``\\H``) are refused with
a clear error rather than silently ignored.  Scripts are also built in code (the modem's,
:mod:`relay.sansio.modem`), with pieces a text cannot name, such as :class:`SetDTR`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from relay.sansio.fields import split_unescaped

__all__ = [
    "BREAK",
    "DEFAULT_TIMEOUT",
    "ChatError",
    "ChatScript",
    "ChatStep",
    "Expectation",
    "Pause",
    "SendPiece",
    "SendString",
    "SetDTR",
    "parse_chat",
    "parse_send",
]

DEFAULT_TIMEOUT: Final = 10.0  # seconds for one expect, as Taylor UUCP's chat-timeout
DELAY: Final = 1.0  # \d
PAUSE: Final = 0.25  # \p
MAX_SCRIPT: Final = 4096  # characters of script text: a config value, not a program
MAX_EXPECT: Final = 256  # bytes of one expect or fail string


class ChatError(ValueError):
    """A chat script that cannot be run as written (the message says where and why)."""


class _Break:
    """The break condition on the line (``\\K``, ``BREAK``)."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK: Final = _Break()


@dataclass(frozen=True)
class Pause:
    """Wait this long before sending the rest (``\\d``, ``\\p``, a modem's guard time)."""

    seconds: float

    def __post_init__(self) -> None:
        if not 0 <= self.seconds <= 60:
            raise ChatError(f"a pause of {self.seconds} s is out of range")


@dataclass(frozen=True)
class SetDTR:
    """Raise or drop the DTR line (a modem hangs up when it drops)."""

    on: bool


SendPiece = bytes | Pause | _Break | SetDTR


@dataclass(frozen=True)
class SendString:
    """What one send field does, in order: bytes, pauses, breaks (the final CR included)."""

    pieces: tuple[SendPiece, ...]

    @classmethod
    def of(cls, data: bytes) -> SendString:
        """Send exactly ``data``."""
        return cls((data,))


@dataclass(frozen=True)
class Expectation:
    """One expect field: the first string, then (sub-send, sub-expect) alternates."""

    expect: bytes
    alternates: tuple[tuple[SendString, bytes], ...] = ()

    def __post_init__(self) -> None:
        for text in (self.expect, *(e for _, e in self.alternates)):
            if len(text) > MAX_EXPECT:
                raise ChatError(f"an expect string is longer than {MAX_EXPECT} bytes")


@dataclass(frozen=True)
class ChatStep:
    """Wait for ``expect``, then send ``send`` (None: the script ends with this expect).

    ``timeout`` is the seconds each expect may take (None: the engine's default;
    ``float("inf")``: wait for ever, as an answering modem waits for RING).
    """

    expect: Expectation
    send: SendString | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class ChatScript:
    """A whole script; ``fail`` maps strings that end it at once (``BUSY``) to a label."""

    steps: tuple[ChatStep, ...]
    fail: tuple[tuple[bytes, str], ...] = ()

    def __post_init__(self) -> None:
        for text, _ in self.fail:
            if not text or len(text) > MAX_EXPECT:
                raise ChatError("a fail string must have 1 to 256 bytes")

    def with_fail(self, fail: Mapping[bytes, str]) -> ChatScript:
        """The same steps with these fail strings added."""
        return ChatScript(self.steps, self.fail + tuple(fail.items()))


# --- parsing -----------------------------------------------------------------------------

_COMMON: Final[dict[str, bytes]] = {
    "b": b"\b",
    "n": b"\n",
    "r": b"\r",
    "s": b" ",
    "t": b"\t",
    "\\": b"\\",
    "-": b"-",
    "N": b"\0",
    '"': b'"',
}
_PORT_ESCAPES: Final = "EeMmH"


def _tokens(text: str) -> list[str]:
    """Split at white space; ``"..."`` groups (``""`` is the empty string)."""
    if len(text) > MAX_SCRIPT:
        raise ChatError(f"chat script longer than {MAX_SCRIPT} characters")
    tokens: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        token: list[str] = []
        quoted = False
        while index < len(text) and (quoted or not text[index].isspace()):
            char = text[index]
            if char == "\\" and index + 1 < len(text):
                token.append(text[index : index + 2])
                index += 2
                continue
            if char == '"':
                quoted = not quoted
            else:
                token.append(char)
            index += 1
        if quoted:
            raise ChatError("unbalanced double quote in chat script")
        tokens.append("".join(token))
    return tokens


def _number(text: str, start: int, digits: str, width: int, base: int) -> tuple[bytes, int]:
    end = start
    while end < len(text) and end - start < width and text[end] in digits:
        end += 1
    if end == start:
        raise ChatError(f"escape needs digits at {text!r}")
    value = int(text[start:end], base)
    if value > 255:
        raise ChatError(f"escaped byte out of range in {text!r}")
    return bytes([value]), end


def _unescape(
    text: str, *, sending: bool, substitutions: Mapping[str, bytes]
) -> tuple[list[SendPiece], bool]:
    """The pieces of one string, and whether it asked for no trailing CR (``\\c``)."""
    pieces: list[SendPiece] = []
    data = bytearray()
    no_return = False

    def flush() -> None:
        if data:
            pieces.append(bytes(data))
            data.clear()

    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            try:
                data += char.encode("latin-1")
            except UnicodeEncodeError:
                raise ChatError(f"chat strings are 8-bit: {char!r} in {text!r}") from None
            index += 1
            continue
        if index + 1 >= len(text):
            raise ChatError(f"backslash at the end of {text!r}")
        code = text[index + 1]
        index += 2
        if code in _COMMON:
            data += _COMMON[code]
        elif code in "01234567":
            byte, index = _number(text, index - 1, "01234567", 3, 8)
            data += byte
        elif code == "x":
            byte, index = _number(text, index, "0123456789abcdefABCDEF", 2, 16)
            data += byte
        elif not sending:
            raise ChatError(f"\\{code} cannot be used in an expect string ({text!r})")
        elif code == "c":
            no_return = True
        elif code in "dp":
            flush()
            pieces.append(Pause(DELAY if code == "d" else PAUSE))
        elif code == "K":
            flush()
            pieces.append(BREAK)
        elif code in "DTLP":
            key = "D" if code == "T" else code
            if key not in substitutions:
                raise ChatError(f"\\{code} has no value here ({text!r})")
            data += substitutions[key]
        elif code in _PORT_ESCAPES:
            raise ChatError(f"\\{code} (a port setting in UUCP) is not supported ({text!r})")
        else:
            raise ChatError(f"unknown escape \\{code} in {text!r}")
    flush()
    return pieces, no_return


def parse_send(text: str, substitutions: Mapping[str, bytes] | None = None) -> SendString:
    """One send field, with its final carriage return unless it says ``\\c``."""
    if text == "BREAK":
        return SendString((BREAK,))
    if text == "EOT":
        return SendString((b"\x04\n\x04\n",))
    pieces, no_return = _unescape(text, sending=True, substitutions=substitutions or {})
    if not no_return:
        if pieces and isinstance(pieces[-1], bytes):
            pieces[-1] += b"\r"
        else:
            pieces.append(b"\r")
    return SendString(tuple(pieces))


def _parse_expect_text(text: str) -> bytes:
    pieces, _ = _unescape(text, sending=False, substitutions={})
    return b"".join(p for p in pieces if isinstance(p, bytes))


def _parse_expect(text: str, substitutions: Mapping[str, bytes]) -> Expectation:
    parts = split_unescaped(text, "-")
    if len(parts) % 2 == 0:
        raise ChatError(f"an expect field needs -send-expect pairs: {text!r}")
    alternates = tuple(
        (parse_send(parts[i], substitutions), _parse_expect_text(parts[i + 1]))
        for i in range(1, len(parts), 2)
    )
    return Expectation(_parse_expect_text(parts[0]), alternates)


def parse_chat(
    text: str,
    substitutions: Mapping[str, bytes] | None = None,
    *,
    timeout: float | None = None,
) -> ChatScript:
    """Parse a UUCP chat script (``expect send expect send ...``).

    Raises :class:`ChatError` with the offending field for anything it cannot run.
    An odd number of fields ends with an expect; an even number ends with a send.
    """
    subs = substitutions or {}
    fields = _tokens(text)
    if not fields:
        raise ChatError("empty chat script")
    steps = []
    for index in range(0, len(fields), 2):
        expect = _parse_expect(fields[index], subs)
        send = parse_send(fields[index + 1], subs) if index + 1 < len(fields) else None
        steps.append(ChatStep(expect, send, timeout))
    return ChatScript(tuple(steps))

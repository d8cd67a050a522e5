"""The SMTP wire format, in one place, for the server engine and the SMTP client alike.

Theory of operation
-------------------
Everything here is a pure function or a small streaming class over ``bytes``: no state
machine, no policy.  The server engine (:mod:`relay.sansio.smtp.server`) and the SMTP
client channel both build on it, so the two sides can never disagree about framing.

* **Replies.**  :class:`SmtpReply` is a reply as a value (code, RFC 3463 enhanced status
  or None, text lines); :meth:`SmtpReply.to_bytes` writes it (multi-line replies use
  ``250-`` continuation lines, every line carrying the enhanced status as RFC 2034
  asks).  :class:`ReplyParser` reads replies back from a stream, strictly: CRLF line
  ends only, one code per reply, bounded line length and line count, no control
  characters; anything else raises :class:`ReplySyntaxError`, because a client that
  guesses at a broken reply may take a refusal for an acceptance.
* **Commands.**  :func:`parse_command_line` splits a line into verb and argument and
  refuses NUL, control characters and invalid UTF-8 before anything looks at it;
  :func:`split_path_argument` takes ``FROM:<path> KEY=VALUE ...`` apart (a path may hold
  a quoted ``>`` or space); :func:`parse_parameters` reads ESMTP parameters (RFC 5321
  section 4.1.2) and :func:`xtext_decode` / :func:`xtext_encode` the xtext of RFC 3461.
  Errors are :class:`CommandSyntaxError`, which carries the reply a server sends for it.
* **Message text.**  :class:`DotStuffer` turns text chunks into wire bytes for DATA
  (any line ends made CRLF, leading dots doubled, the final ``CRLF.CRLF`` added by
  :meth:`DotStuffer.finish`), streaming, without holding more than a flag and a column
  between chunks.  It also keeps what it sends within the 1000-octet text line of
  RFC 5321 section 4.5.3.1.6 the way Postfix's ``smtp_line_length_limit`` does: a line
  longer than the limit is broken by inserting ``CRLF SP`` (the space makes the rest a
  folded header line or a line of text that starts with a space, the least damage to
  MIME), and the limit 0 sends lines as they are.
  :class:`DataDecoder` is the receiving side: it removes the stuffing and finds the end
  of the text, and it is strict on purpose.  Only ``CRLF . CRLF`` ends the text; a bare
  LF or bare CR anywhere in it is recorded as a :class:`DataProblem` and the decoder
  keeps looking for the real end.  That is the defence against SMTP smuggling
  (CVE-2023-51764 and friends): a sequence such as ``LF . LF`` that another server
  might take for the end can never end the text here, so whatever follows it is text
  (and is thrown away with the rejected message), never a command.  It does *not*
  limit line length: programs and mailing lists send lines longer than 998 octets
  every day and Postfix and Exim take them, so a line of any length is passed on in
  pieces as it arrives (only the message size bounds it) and the SMTP client breaks
  it when it relays the message.

Both streaming classes work chunk-at-a-time with ``bytes`` methods (``find``,
``replace``, ``count``) rather than a Python loop over bytes or lines: a message costs a
handful of C-level passes, which is what keeps the gateway's hot path cheap.

Limits are the RFC 5321 section 4.5.3.1 values, as constants, so both sides use the same.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CRLF",
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "MAX_TEXT_LINE",
    "CommandLine",
    "CommandSyntaxError",
    "DataDecoder",
    "DataProblem",
    "DotStuffer",
    "ReplyParser",
    "ReplySyntaxError",
    "SmtpReply",
    "WireError",
    "check_line_length_limit",
    "dot_stuff",
    "format_command",
    "format_parameters",
    "format_reply",
    "parse_command_line",
    "parse_ehlo_reply",
    "parse_parameters",
    "split_path_argument",
    "xtext_decode",
    "xtext_encode",
]

CRLF: Final = b"\r\n"

MAX_COMMAND_LINE: Final = 512
"""Octets in a command line, including the CRLF (RFC 5321 section 4.5.3.1.4)."""

MAX_TEXT_LINE: Final = 998
"""Octets in a line of message text, excluding the CRLF (section 4.5.3.1.6: 1000 with):
the length the SMTP client breaks longer lines at by default."""

MAX_REPLY_LINE: Final = 512
"""Octets in a reply line, including the CRLF (section 4.5.3.1.5)."""

MAX_AUTH_LINE: Final = 12288
"""Octets in an AUTH command or SASL response line, including the CRLF (RFC 4954 section 4)."""

MAX_REPLY_LINES: Final = 256
"""Lines in one multi-line reply that a parser accepts (a bound on memory, not an RFC value)."""

_TERMINATOR: Final = b"\r\n.\r\n"


class WireError(ValueError):
    """Base of the errors of this module: something on the wire is not SMTP."""


class ReplySyntaxError(WireError):
    """A server sent something that is not a well-formed reply."""


class CommandSyntaxError(WireError):
    """A command line or argument that cannot be accepted; ``reply`` is the answer to send."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.reply = SmtpReply(code, enhanced, (text,))


# --------------------------------------------------------------------------- replies

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_ENHANCED_PREFIX = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# Reply text: HT, SP, printable ASCII and (RFC 6531) anything non-ASCII; no controls.
_BAD_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One SMTP reply: a three-digit code, an enhanced status or None, and its text lines.

    Validated when made: the code is 200-599, the enhanced status has the class of the
    code (``5.1.1`` with a 5xx), and no line holds a CR, LF or other control character,
    so a reply can never inject a second reply or a command into the stream.
    """

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            raise ValueError(f"not an SMTP reply code: {self.code!r}")
        if self.enhanced is not None:
            match = _ENHANCED.fullmatch(self.enhanced)
            if match is None or int(match.group(1)) != self.code // 100:
                raise ValueError(f"enhanced status {self.enhanced!r} does not fit {self.code}")
        if isinstance(self.lines, str) or not self.lines:
            raise ValueError("a reply has a tuple of at least one line")
        for line in self.lines:
            if _BAD_TEXT.search(line):
                raise ValueError(f"control character in reply text: {line!r}")

    @property
    def text(self) -> str:
        """The lines joined by spaces: the reply as one human-readable line."""
        return " ".join(line for line in self.lines if line)

    @property
    def is_positive(self) -> bool:
        """2xx (done) or 3xx (go on): the command was accepted."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: do not try again."""
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """The reply as sent on the wire, CRLF-terminated (cached: most replies repeat)."""
        return _format_cached(self.code, self.enhanced, self.lines)

    def __str__(self) -> str:
        prefix = f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)
        return f"{prefix} {self.text}" if self.text else prefix


def format_reply(code: int, enhanced: str | None, lines: Sequence[str]) -> bytes:
    """Write a reply: ``250-first``, ..., ``250 last``, each with the enhanced status.

    Raises ValueError for a line that would exceed :data:`MAX_REPLY_LINE`, since a peer
    may cut such a line and read the rest as another reply.
    """
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        words = [w for w in (enhanced, line) if w]
        if words:
            text = f"{code}{' ' if i == last else '-'}{' '.join(words)}"
        elif i != last:
            text = f"{code}-"
        else:
            # RFC 4954 wants "334 " (SP, then possibly empty base64); RFC 5321 a bare code.
            text = "334 " if code == 334 else f"{code}"
        encoded = text.encode("utf-8") + CRLF
        if len(encoded) > MAX_REPLY_LINE:
            raise ValueError(f"reply line longer than {MAX_REPLY_LINE} octets")
        out.append(encoded)
    return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _format_cached(code: int, enhanced: str | None, lines: tuple[str, ...]) -> bytes:
    return format_reply(code, enhanced, lines)


class ReplyParser:
    """Reads replies from a server's byte stream, strictly.

    :meth:`feed` returns the replies completed by the new bytes (any number, since a
    pipelining server answers several commands at once).  A malformed reply raises
    :class:`ReplySyntaxError` and the parser stays broken: after garbage there is no
    safe way to find where the next reply starts.
    """

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._max_line = max_line
        self._max_lines = max_lines
        self._buffer = b""
        self._code: int | None = None
        self._lines: list[str] = []
        self._broken: ReplySyntaxError | None = None

    @property
    def has_partial(self) -> bool:
        """Whether bytes of an unfinished reply are held."""
        return bool(self._buffer) or self._code is not None

    def feed(self, data: bytes) -> list[SmtpReply]:
        """Take more bytes; return every reply they complete, in order."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._feed(data)
        except ReplySyntaxError as e:
            self._broken = e
            raise

    def close(self) -> None:
        """The stream ended: raise if it ended inside a reply."""
        if self.has_partial:
            raise ReplySyntaxError("connection closed in the middle of a reply")

    def _feed(self, data: bytes) -> list[SmtpReply]:
        buffer = self._buffer + data if self._buffer else data
        replies: list[SmtpReply] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end == -1:
                break
            if end + 1 - start > self._max_line:
                raise ReplySyntaxError(f"reply line longer than {self._max_line} octets")
            if end == start or buffer[end - 1] != 0x0D:
                raise ReplySyntaxError("reply line not ended by CRLF")
            reply = self._line(buffer[start : end - 1])
            if reply is not None:
                replies.append(reply)
            start = end + 1
        rest = buffer[start:]
        if len(rest) >= self._max_line:
            raise ReplySyntaxError(f"reply line longer than {self._max_line} octets")
        self._buffer = rest
        return replies

    def _line(self, raw: bytes) -> SmtpReply | None:
        if len(raw) < 3 or not raw[:3].isdigit():
            raise ReplySyntaxError(f"reply line without a code: {raw[:40]!r}")
        code = int(raw[:3])
        if not (2 <= raw[0] - 0x30 <= 5 and raw[1] - 0x30 <= 5):
            raise ReplySyntaxError(f"not a reply code: {code}")
        sep = raw[3:4]
        if sep not in (b"", b" ", b"-"):
            raise ReplySyntaxError(f"bad character after reply code: {raw[:40]!r}")
        if self._code is not None and code != self._code:
            raise ReplySyntaxError(f"reply code changed within a reply: {self._code} then {code}")
        text = raw[4:].decode("utf-8", errors="replace")
        if _BAD_TEXT.search(text):
            raise ReplySyntaxError("control character in reply text")
        self._code = code
        self._lines.append(text)
        if len(self._lines) > self._max_lines:
            raise ReplySyntaxError(f"reply of more than {self._max_lines} lines")
        if sep == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], None
        return _make_reply(code, lines)


def _make_reply(code: int, lines: list[str]) -> SmtpReply:
    """Split off an enhanced status if the first line has one of the code's class."""
    match = _ENHANCED_PREFIX.match(lines[0])
    if match is None or int(match.group(1)) != code // 100:
        return SmtpReply(code, None, tuple(lines))
    enhanced = f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
    written = match.group(0).rstrip(" ")
    stripped = []
    for line in lines:
        if line == written:
            stripped.append("")
        elif line.startswith(written + " "):
            stripped.append(line[len(written) + 1 :])
        else:
            stripped.append(line)
    return SmtpReply(code, enhanced, tuple(stripped))


def parse_ehlo_reply(reply: SmtpReply) -> tuple[str, dict[str, tuple[str, ...]]]:
    """Read a 250 reply to EHLO: the server's name and its extensions with their parameters.

    Keywords are upper-cased (``{"SIZE": ("10485760",), "AUTH": ("PLAIN", "LOGIN")}``).
    """
    if reply.code != 250:
        raise ReplySyntaxError(f"not a positive EHLO reply: {reply.code}")
    first = reply.lines[0].split()
    domain = first[0] if first else ""
    extensions: dict[str, tuple[str, ...]] = {}
    for line in reply.lines[1:]:
        words = line.split()
        if words:
            extensions[words[0].upper()] = tuple(words[1:])
    return domain, extensions


# --------------------------------------------------------------------------- commands

_VERB = re.compile(r"[A-Za-z]{1,16}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value: any of %d33-60 / %d62-126, or non-ASCII (RFC 6531); i.e. no "=", SP, controls.
_VALUE = re.compile(r"[^\x00-\x20=\x7f]+")


@dataclass(frozen=True, slots=True)
class CommandLine:
    """A command line split once: the verb upper-cased, and the argument as written.

    ``argument`` has surrounding spaces removed; ``ascii`` says whether the whole line
    was ASCII (non-ASCII is only allowed where SMTPUTF8 is in effect).
    """

    verb: str
    argument: str
    ascii: bool


def parse_command_line(line: bytes) -> CommandLine:
    """Split a command line (without its CRLF) into verb and argument.

    NUL, CR, LF and other control characters anywhere, invalid UTF-8, and a verb that is
    not 1-16 letters all raise :class:`CommandSyntaxError` with a 500 5.5.2 reply.
    """
    if _CONTROL.search(line):
        if b"\x00" in line:
            raise CommandSyntaxError(500, "5.5.2", "NUL character in command")
        raise CommandSyntaxError(500, "5.5.2", "Control character in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError(500, "5.5.2", "Command is not valid UTF-8") from None
    verb, _, argument = text.strip(" ").partition(" ")
    if not _VERB.fullmatch(verb):
        raise CommandSyntaxError(500, "5.5.2", "Syntax error, command unrecognized")
    return CommandLine(verb.upper(), argument.strip(" "), line.isascii())


def format_command(
    verb: str, argument: str | None = None, *, limit: int = MAX_COMMAND_LINE
) -> bytes:
    """Write a command line with its CRLF; ValueError if it holds a control or is too long."""
    text = verb if not argument else f"{verb} {argument}"
    encoded = text.encode("utf-8")
    if _CONTROL.search(encoded):
        raise ValueError(f"control character in command: {text!r}")
    if len(encoded) + 2 > limit:
        raise ValueError(f"command line longer than {limit} octets")
    return encoded + CRLF


def split_path_argument(argument: str, keyword: str) -> tuple[str, str]:
    """Take ``FROM:<path> params`` apart into the path (with brackets) and the parameters.

    ``keyword`` is ``"FROM"`` or ``"TO"``, matched case-insensitively; one or more
    spaces after the colon are tolerated, as most servers do.  The path ends at the
    first ``>`` outside a quoted string, so ``<"a> b"@x>`` is one path.
    """
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword.upper() + ":":
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: expected {keyword}:<address>")
    rest = argument[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: expected {keyword}:<address>")
    end = _path_end(rest)
    if end == -1:
        raise CommandSyntaxError(501, "5.5.4", "Syntax: unbalanced < or quote in address")
    path, params = rest[: end + 1], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise CommandSyntaxError(501, "5.5.4", "Syntax: expected a space after the address")
    return path, params.strip(" ")


def _path_end(text: str) -> int:
    """Index of the ``>`` that closes the path at the start of ``text``, or -1."""
    quoted = False
    i, n = 1, len(text)
    while i < n:
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            return i
        i += 1
    return -1


def parse_parameters(text: str) -> dict[str, str | None]:
    """Parse ESMTP parameters ``KEY[=VALUE] ...``: keys upper-cased, values as written.

    A repeated keyword, an empty value, or a keyword or value with characters RFC 5321
    does not allow raises :class:`CommandSyntaxError` (501 5.5.4).  Values are returned
    raw: the caller xtext-decodes the ones defined as xtext (ENVID, ORCPT, AUTH).
    """
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise CommandSyntaxError(501, "5.5.4", f"Bad parameter keyword {key[:40]!r}")
        if eq and not _VALUE.fullmatch(value):
            raise CommandSyntaxError(501, "5.5.4", f"Bad value for parameter {key.upper()}")
        upper = key.upper()
        if upper in params:
            raise CommandSyntaxError(501, "5.5.4", f"Parameter {upper} given twice")
        params[upper] = value if eq else None
    return params


def format_parameters(params: Mapping[str, str | None]) -> str:
    """Write ESMTP parameters as `` KEY=VALUE`` words (with a leading space), or ``""``."""
    words = []
    for key, value in params.items():
        if not _KEYWORD.fullmatch(key) or (value is not None and not _VALUE.fullmatch(value)):
            raise ValueError(f"bad ESMTP parameter {key!r}={value!r}")
        words.append(key if value is None else f"{key}={value}")
    return "".join(f" {w}" for w in words)


_XCHAR_OK = frozenset(range(33, 127)) - {ord("+"), ord("=")}
_HEX_UPPER = frozenset(b"0123456789ABCDEF")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``+2B`` is ``+``); the octets must be UTF-8.

    Strict: a ``+`` not followed by two upper-case hex digits, a character outside
    ``!``..``~``, or a raw ``+``/``=`` raises :class:`CommandSyntaxError` (501 5.5.4).
    """
    raw = text.encode("utf-8", errors="surrogatepass")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x2B:
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX_UPPER:
                raise CommandSyntaxError(501, "5.5.4", "Bad xtext: + needs two hex digits")
            out.append(int(pair, 16))
            i += 3
            continue
        if byte not in _XCHAR_OK:
            raise CommandSyntaxError(501, "5.5.4", "Bad xtext character")
        out.append(byte)
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError(501, "5.5.4", "Bad xtext: not UTF-8") from None


def xtext_encode(text: str) -> str:
    """Encode ``text`` (as UTF-8 octets) in xtext: printable ASCII except ``+ =`` kept."""
    return "".join(chr(b) if b in _XCHAR_OK else f"+{b:02X}" for b in text.encode("utf-8"))


# --------------------------------------------------------------------------- message text


class DotStuffer:
    """Turns message text into DATA wire bytes, chunk by chunk.

    Line ends are normalised to CRLF (a bare CR or bare LF becomes CRLF, so the output
    can never hold the ambiguous sequences that smuggling relies on) and a dot at the
    start of a line is doubled (RFC 5321 section 4.5.2).  :meth:`finish` ends the last
    line if needed and adds the ``.CRLF`` terminator.

    With ``line_length_limit`` (0: none) a line longer than that many octets is broken
    as Postfix's SMTP client breaks it: after every ``limit`` octets of output that more
    octets of the same line follow, ``CRLF SP`` is inserted, and the space counts
    towards the next piece.  A line of exactly ``limit`` octets is sent whole; the dot
    added by stuffing is not counted (RFC 5321 section 4.5.3.1.6 does not count it).

    Between chunks only two flags and the current line's column are kept, so a CRLF, a
    leading dot or a break split across chunks is handled without buffering.  Chunks
    whose lines all fit are checked with a few C-level searches and not split at all.
    """

    __slots__ = ("_column", "_finished", "_limit", "_skip_lf")

    def __init__(self, line_length_limit: int = 0) -> None:
        self._limit = check_line_length_limit(line_length_limit)
        self._column = 0  # octets of the current output line so far (0: at a line start)
        self._skip_lf = False  # the previous chunk ended with CR: drop a leading LF
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        """Wire bytes for one more chunk of text (possibly ``b""``)."""
        if self._finished:
            raise ValueError("feed() after finish()")
        if not chunk:
            return b""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
            if not chunk:
                self._skip_lf = False
                return b""
        self._skip_lf = chunk[-1:] == b"\r"
        lf = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        at_line_start = self._column == 0
        if self._limit and self._needs_breaking(lf):
            lf = self._break_lines(lf)
        else:
            last = lf.rfind(b"\n")
            self._column = self._column + len(lf) if last == -1 else len(lf) - last - 1
        stuffed = lf.replace(b"\n.", b"\n..")
        if at_line_start and stuffed[:1] == b".":
            stuffed = b"." + stuffed
        return stuffed.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The end of the text: a CRLF if the last line was open, then ``.CRLF``."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        return b".\r\n" if self._column == 0 else b"\r\n.\r\n"

    def _needs_breaking(self, lf: bytes) -> bool:
        """Whether a line of ``lf`` (LF line ends), the open one included, is too long."""
        limit = self._limit
        first = lf.find(b"\n")
        if first == -1:
            return self._column + len(lf) > limit
        if self._column + first > limit:
            return True
        last = lf.rfind(b"\n")
        return len(lf) - last - 1 > limit or _has_line_longer(lf, first + 1, last, limit, b"\n")

    def _break_lines(self, lf: bytes) -> bytes:
        """``lf`` with ``LF SP`` inserted wherever a line goes on past the limit."""
        limit = self._limit
        column = self._column
        out: list[bytes] = []
        lines = lf.split(b"\n")
        for index, line in enumerate(lines):
            if index:
                out.append(b"\n")
                column = 0
            at, length = 0, len(line)
            while at < length:
                if column == limit:  # full, and the line goes on: break it here
                    out.append(b"\n ")
                    column = 1
                take = min(limit - column, length - at)
                out.append(line[at : at + take])
                at += take
                column += take
        self._column = column
        return b"".join(out)


def check_line_length_limit(limit: int) -> int:
    """``limit`` if it can break lines (0, or 2 and up: one octet besides the space)."""
    if limit < 0 or limit == 1:
        raise ValueError(f"a line length limit is 0 (none) or at least 2, not {limit}")
    return limit


def dot_stuff(text: bytes, line_length_limit: int = 0) -> bytes:
    """The whole DATA wire form of ``text``, terminator included (for small messages)."""
    stuffer = DotStuffer(line_length_limit)
    return stuffer.feed(text) + stuffer.finish()


class DataProblem(enum.Enum):
    """Why received text is refused even though its end was found."""

    BARE_LF = "bare LF in message text"
    BARE_CR = "bare CR in message text"


class DataDecoder:
    """Receives the text after ``354``: removes dot-stuffing and finds ``CRLF.CRLF``.

    :meth:`feed` returns ``(text, rest)``: the unstuffed text the bytes completed, and
    ``None`` while the text goes on, or (once the terminator is seen) the bytes that
    followed it, which belong to the command stream.  The terminator is only
    ``CRLF . CRLF`` (or ``. CRLF`` at the very start): see the module docstring.

    The first problem found (bare LF, bare CR) is kept in :attr:`problem`; from then on
    no more text is returned (the message will be refused, so there is no point copying
    it), but the end is still looked for.  :meth:`discard` does the same on the
    caller's say-so (e.g. the size limit).  :attr:`size` counts unstuffed octets,
    including discarded ones.  Lines may have any length: the text of a long line is
    returned as its bytes arrive, and at most four bytes (a possible start of the
    terminator) are held between calls, so memory does not grow with a line.
    """

    __slots__ = ("_at_line_start", "_carry", "_discarding", "problem", "size")

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True
        self._discarding = False
        self.problem: DataProblem | None = None
        self.size = 0

    def discard(self) -> None:
        """Stop returning text (it will not be kept); keep looking for the end."""
        self._discarding = True

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Unstuffed text completed by ``data``, and the bytes after the end (or None)."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        if self._at_line_start and data[:3] == b".\r\n":
            return b"", data[3:]
        end = data.find(_TERMINATOR)
        if end != -1:
            text = self._segment(data[: end + 2])
            return text, data[end + 5 :]
        keep = _terminator_prefix_len(data, self._at_line_start)
        if keep:
            self._carry = data[-keep:]
            data = data[:-keep]
        return self._segment(data), None

    def _segment(self, segment: bytes) -> bytes:
        """Check and unstuff a piece of text that holds no terminator."""
        if not segment:
            return b""
        at_start = self._at_line_start
        self._at_line_start = segment[-2:] == b"\r\n"
        if self.problem is None:
            crlf = segment.count(b"\r\n")
            if segment.count(b"\n") != crlf:
                self.problem = DataProblem.BARE_LF
            elif segment.count(b"\r") != crlf:
                self.problem = DataProblem.BARE_CR
        if at_start and segment[:1] == b".":
            segment = segment[1:]
        text = segment.replace(b"\r\n.", b"\r\n")
        self.size += len(text)
        if self.problem is not None or self._discarding:
            return b""
        return text


def _has_line_longer(text: bytes, start: int, stop: int, limit: int, eol: bytes) -> bool:
    """Whether a line of ``text[start:stop]`` (separated by ``eol``, one at ``stop``) is
    longer than ``limit``.

    Rather than split the text into its lines, jump: from a line's start, the last line
    end within ``limit`` octets ends every line up to there, all short enough; if there
    is none, the line at hand is too long.  Each step moves about ``limit`` octets, each
    a search in C.
    """
    at = start
    width = len(eol)
    while stop - at > limit:
        end = text.rfind(eol, at, at + limit + width)
        if end == -1:
            return True
        at = end + width
    return False


def _terminator_prefix_len(data: bytes, at_line_start: bool) -> int:
    """How many trailing bytes of ``data`` may begin a terminator, to hold back.

    At the start of a line (the very start of the text) ``.`` and ``.CR`` may be the
    short terminator ``. CRLF``: asked first, or ``.CR`` would hold back only its CR
    and let the dot through as text.
    """
    if at_line_start and data in (b".", b".\r"):
        return len(data)
    for k in (4, 3, 2, 1):
        if data.endswith(_TERMINATOR[:k]):
            return k
    return 0

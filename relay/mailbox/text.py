"""The queue's text as a mailbox stores it: LF line ends and, for mbox, ``>From`` quoting.

The queue keeps a message as it travelled (CRLF line ends); Unix mailboxes, mbox and
Maildir alike, store LF, and an mbox cannot hold a line starting with ``From `` in a
message (it would start a new one).  The mboxrd convention quotes every line matching
``^>*From `` with one more ``>``, so a reader removes one ``>`` from each such line and
gets the text back exactly, whatever it contained.

:class:`MailboxText` does this on a stream, chunk by chunk, in memory bounded by one
line prefix: a line is held back only while it could still turn into ``>*From `` (or
while a chunk ends between CR and LF).  It is pure (no I/O), so a test can split the
text at every position and compare with :func:`mailbox_text`, the whole-text version.
"""

from __future__ import annotations

import re

__all__ = ["MailboxText", "mailbox_text", "unquote_mboxrd"]

_FROM = re.compile(rb">*From ")
_FROM_LINES = re.compile(rb"^>*From ", re.MULTILINE)
_QUOTED_LINES = re.compile(rb"^>(>*From )", re.MULTILINE)
# A line start that may still become ">*From " when more bytes arrive.
_PREFIX = re.compile(rb">*(?:F(?:r(?:o(?:m)?)?)?)?")


class MailboxText:
    """Converts CRLF text to a mailbox's LF text, quoting ``From`` lines if asked."""

    def __init__(self, *, quote_from: bool) -> None:
        self._quote = quote_from
        self._held_cr = False
        self._partial = b""  # the start of a line that may become a From line
        self._at_line_start = True
        self._last = b""  # the last byte produced, for finish(ensure_newline=True)

    def feed(self, data: bytes) -> bytes:
        """The converted form of ``data``, as much of it as can be decided now."""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._held_cr = True
        data = data.replace(b"\r\n", b"\n")
        out = self._quote_lines(data) if self._quote else data
        if out:
            self._last = out[-1:]
        return out

    def finish(self, *, ensure_newline: bool) -> bytes:
        """Whatever is still held, plus a final LF if asked and the text lacks one."""
        tail = self._partial + (b"\r" if self._held_cr else b"")
        self._partial = b""
        self._held_cr = False
        if tail:
            self._last = tail[-1:]
        if ensure_newline and self._last != b"\n":
            tail += b"\n"
            self._last = b"\n"
        return tail

    def _quote_lines(self, data: bytes) -> bytes:
        buf = self._partial + data
        self._partial = b""
        if not buf:
            return b""
        out: list[bytes] = []
        start = 0
        if not self._at_line_start:
            newline = buf.find(b"\n")
            if newline == -1:
                return buf
            out.append(buf[: newline + 1])
            start = newline + 1
        last_newline = buf.rfind(b"\n", start)
        if last_newline != -1:
            out.append(_FROM_LINES.sub(rb">\g<0>", buf[start : last_newline + 1]))
            start = last_newline + 1
        tail = buf[start:]
        self._at_line_start = True
        if tail:
            if _PREFIX.fullmatch(tail):
                self._partial = tail
            else:
                if _FROM.match(tail):
                    out.append(b">")
                out.append(tail)
                self._at_line_start = False
        return b"".join(out)


def mailbox_text(text: bytes, *, quote_from: bool, ensure_newline: bool) -> bytes:
    """The whole-text form of :class:`MailboxText` (the reference the tests compare with)."""
    converted = text.replace(b"\r\n", b"\n")
    if quote_from:
        converted = _FROM_LINES.sub(rb">\g<0>", converted)
    if ensure_newline and not converted.endswith(b"\n"):
        converted += b"\n"
    return converted


def unquote_mboxrd(text: bytes) -> bytes:
    """Undo mboxrd quoting: one ``>`` less on every line matching ``^>+From ``."""
    return _QUOTED_LINES.sub(rb"\1", text)

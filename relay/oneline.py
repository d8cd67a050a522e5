"""Text from outside made safe to show on one line: in a log line, a reply, a bounce.

Clients choose their HELO name, AUTH user name and addresses, remote servers their reply
texts, and a local command its output.  Any of them may hold a CR, an LF, a terminal
escape or a Unicode line separator; written to the log as they came, they would start
what looks like a new log line (a forged "authenticated as" for a grep to find) or send
escape sequences to the operator's terminal.  So every such string goes through this
module before it is logged or put in a one-line reply text, and nowhere else decides
what "safe" means.

:func:`escape` keeps printable text as it is and writes every other character the way a
Python string literal would (``\\r``, ``\\x1b``, ``\\u2028``): nothing is lost, and the
log shows what the client sent.  :func:`one_line` is for reply texts, which may span
several lines by nature (a multi-line SMTP reply, a command's output): it folds each
run of white space into one space first, then escapes what is left, and may shorten
the result.
"""

from __future__ import annotations

from typing import Final

__all__ = ["REPLY_TEXT_LIMIT", "escape", "one_line"]

REPLY_TEXT_LIMIT: Final = 900
"""Characters in a reply text the relay makes from others' words (a 1000-octet line fits)."""


def _escaped(char: str) -> str:
    """One non-printable character as a Python escape (``\\r``, ``\\x9b``, ``\\u2028``)."""
    return char.encode("unicode_escape").decode("ascii")


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped (printable text unchanged)."""
    if text.isprintable():  # the common case, and cheap: one pass in C
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one printable line: white space folded, the rest escaped, cut at ``limit``.

    A text cut short ends in ``...`` and is ``limit`` characters long in all.
    """
    folded = escape(" ".join(text.split()))
    if limit is None or len(folded) <= limit:
        return folded
    return folded[: max(limit - 3, 0)] + "..."

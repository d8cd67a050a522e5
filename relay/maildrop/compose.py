"""What ``relay sendmail`` does to the text a program hands it, before it is dropped.

Programs write ``\\n`` line ends, leave out ``Date:`` or ``Message-ID:``, and with ``-t``
put the recipients (Bcc included) in the header.  Here, as pure functions:

* :func:`read_text` reads standard input the way sendmail does: up to a line holding a
  lone ``.`` unless ``-i``, never more than the size limit;
* :func:`to_crlf` turns bare LF line ends into CRLF (a CRLF stays as it is);
* :func:`split_header` cuts the header section into its fields (continuation lines
  kept with their field); a first line that is not a field starts the body;
* :func:`header_recipients` gives the addresses of ``To:``, ``Cc:`` and ``Bcc:``
  (``-t``); :func:`without_fields` removes ``Bcc:``;
* :func:`missing_fields` makes ``From:``, ``Date:`` and ``Message-ID:`` where the
  header lacks them, with the standard :mod:`email` package.

The clock and the identity are passed in, so tests need neither.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email import policy
from email.parser import BytesHeaderParser
from email.utils import formataddr, formatdate, getaddresses, make_msgid
from typing import BinaryIO

__all__ = [
    "MessageTooLarge",
    "assemble",
    "header_recipients",
    "missing_fields",
    "read_text",
    "split_header",
    "to_crlf",
    "without_fields",
]

_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_RECIPIENT_FIELDS = ("to", "cc", "bcc")


class MessageTooLarge(ValueError):
    """The text is over the size limit."""


def read_text(stream: BinaryIO, *, dot_ends: bool, limit: int) -> bytes:
    """The message on ``stream``; with ``dot_ends``, a line holding a lone ``.`` ends it.

    Raises MessageTooLarge as soon as more than ``limit`` octets have been read.
    """
    if not dot_ends:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise MessageTooLarge(f"message larger than {limit} octets")
        return bytes(data)
    lines: list[bytes] = []
    size = 0
    while True:
        line = stream.readline(limit + 2 - size)
        if not line or line in (b".\n", b".\r\n", b"."):
            break
        size += len(line)
        if size > limit:
            raise MessageTooLarge(f"message larger than {limit} octets")
        lines.append(line)
    return b"".join(lines)


def to_crlf(text: bytes) -> bytes:
    """``text`` with every bare LF made CRLF, and ending in a line end."""
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return _BARE_LF.sub(b"\r\n", text)


def split_header(text: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and CRLF) and the body.

    ``text`` has CRLF line ends.  The header ends at the first empty line (which belongs
    to neither part) or at the first line that is neither a field nor a continuation,
    which starts the body.
    """
    fields: list[bytes] = []
    at = 0
    while at < len(text):
        end = text.find(b"\r\n", at)
        end = len(text) if end < 0 else end + 2
        line = text[at:end]
        if line == b"\r\n":
            return fields, text[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            break
        at = end
    return fields, text[at:]


def assemble(fields: Iterable[bytes], body: bytes) -> bytes:
    """The text again: the fields, an empty line, the body."""
    return b"".join(fields) + b"\r\n" + body


def _name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii").lower()


def without_fields(fields: Sequence[bytes], names: Iterable[str]) -> list[bytes]:
    """``fields`` without those named ``names`` (case-insensitive)."""
    drop = {n.lower() for n in names}
    return [f for f in fields if _name(f) not in drop]


def header_recipients(fields: Sequence[bytes]) -> list[str]:
    """The addresses in ``To:``, ``Cc:`` and ``Bcc:`` (``-t``), in order, as written."""
    wanted = [f for f in fields if _name(f) in _RECIPIENT_FIELDS]
    if not wanted:
        return []
    parsed = BytesHeaderParser(policy=policy.compat32).parsebytes(b"".join(wanted) + b"\r\n")
    values: list[str] = []
    for name in _RECIPIENT_FIELDS:
        values.extend(str(v) for v in parsed.get_all(name, []))
    return [address for _, address in getaddresses(values) if address]


def missing_fields(
    fields: Sequence[bytes],
    *,
    sender: str,
    full_name: str | None,
    hostname: str,
    now: float,
) -> list[bytes]:
    """The ``From:``, ``Date:`` and ``Message-ID:`` fields the header lacks, CRLF-ended."""
    present = {_name(f) for f in fields}
    added: list[str] = []
    if "from" not in present:
        added.append(f"From: {formataddr((full_name or '', sender), charset='utf-8')}")
    if "date" not in present:
        added.append(f"Date: {formatdate(now, localtime=True)}")
    if "message-id" not in present:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}")
    return [f"{line}\r\n".encode() for line in added]

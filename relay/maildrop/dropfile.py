"""The format of a file in the maildrop: a magic line, the envelope as JSON, the text.

::

    RELAY-MAILDROP 1\\n
    {"sender": "<alice@example.test>", "recipients": ["<bob@example.test>"],
     "protocol": "local", "helo": null, "size": 1234}\\n
    <the message text, CRLF line ends, exactly "size" octets>

The envelope line is one JSON object (at most :data:`MAX_ENVELOPE` octets); addresses
are SMTP paths (``<>`` is the null sender), parsed with the gateway's parser.
``protocol`` is ``local`` for a message read from standard input, or what the ``-bs``
dialogue was (``SMTP``, ``ESMTP``); ``helo`` is the name given there.  ``size`` lets the
pickup tell a complete file from a cut one (a user can write anything into the drop
directory, not only through ``relay sendmail``).

Nothing in a file is trusted beyond what it describes: who submitted it is the file's
owner as the kernel reports it, never a field.  :func:`parse_drop_file` never raises
anything but :class:`DropFileError`, whatever the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path

__all__ = [
    "MAGIC",
    "MAX_ENVELOPE",
    "MAX_RECIPIENTS",
    "DropFile",
    "DropFileError",
    "encode_drop_file",
    "parse_drop_file",
]

MAGIC = b"RELAY-MAILDROP 1\n"
MAX_ENVELOPE = 1024 * 1024
MAX_RECIPIENTS = 10_000
_PROTOCOLS = ("local", "SMTP", "ESMTP", "UTF8SMTP")


class DropFileError(ValueError):
    """A file that is not a well-formed maildrop file; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class DropFile:
    """A parsed maildrop file: the envelope and the text."""

    sender: Address | None
    recipients: tuple[Address, ...]
    protocol: str
    helo: str | None
    text: bytes


def encode_drop_file(
    sender: Address | None,
    recipients: Sequence[Address],
    text: bytes,
    *,
    protocol: str = "local",
    helo: str | None = None,
) -> bytes:
    """The file's bytes for a message (what ``relay sendmail`` writes)."""
    envelope = {
        "sender": "<>" if sender is None else sender.smtp_path(),
        "recipients": [r.smtp_path() for r in recipients],
        "protocol": protocol,
        "helo": helo,
        "size": len(text),
    }
    line = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
    return b"".join((MAGIC, line, b"\n", text))


def parse_drop_file(data: bytes, *, max_text: int) -> DropFile:
    """The message in ``data``; DropFileError if it is not one, or its text is over ``max_text``."""
    if not data.startswith(MAGIC):
        raise DropFileError("not a maildrop file (no RELAY-MAILDROP 1 line)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_ENVELOPE + 1)
    if end < 0:
        raise DropFileError("envelope line missing or too long")
    try:
        envelope = json.loads(data[len(MAGIC) : end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DropFileError(f"envelope is not JSON: {e}") from None
    if not isinstance(envelope, dict):
        raise DropFileError("envelope is not a JSON object")
    text = data[end + 1 :]
    size = envelope.get("size")
    if type(size) is not int or size != len(text):
        raise DropFileError(f"text is {len(text)} octets, the envelope says {size!r}")
    if size > max_text:
        raise DropFileError(f"text of {size} octets is over the limit of {max_text}")
    protocol = envelope.get("protocol")
    if protocol not in _PROTOCOLS:
        raise DropFileError(f"unknown protocol {protocol!r}")
    helo = envelope.get("helo")
    if helo is not None and (
        not isinstance(helo, str) or not helo.isprintable() or len(helo) > 255
    ):
        raise DropFileError("helo is not a printable name")
    return DropFile(
        _sender(envelope.get("sender")),
        _recipients(envelope.get("recipients")),
        str(protocol),
        helo,
        text,
    )


def _sender(value: object) -> Address | None:
    if not isinstance(value, str):
        raise DropFileError("sender is not a string")
    try:
        return parse_reverse_path(value, smtputf8=True)
    except AddressError as e:
        raise DropFileError(f"bad sender: {e}") from None


def _recipients(value: object) -> tuple[Address, ...]:
    if not isinstance(value, list) or not value:
        raise DropFileError("recipients is not a non-empty list")
    if len(value) > MAX_RECIPIENTS:
        raise DropFileError(f"more than {MAX_RECIPIENTS} recipients")
    found: dict[Address, None] = {}
    for item in value:
        if not isinstance(item, str):
            raise DropFileError("a recipient is not a string")
        try:
            found.setdefault(parse_forward_path(item, smtputf8=True))
        except AddressError as e:
            raise DropFileError(f"bad recipient: {e}") from None
    return tuple(found)

"""The header lines local delivery adds, and the ``Delivered-To`` lines it looks for.

Every copy the local channel writes starts with ``Return-Path: <sender>`` (the envelope
sender, which the message text does not otherwise carry) and ``Delivered-To: address``
(where this copy went).  ``Delivered-To`` is also the loop detector, as in Postfix and
qmail: a message that already carries one for the address being delivered has been
here before (an alias forwarding to an address that forwards back), and is bounced
instead of going round for ever.
"""

from __future__ import annotations

import re

from relay.address import Address

__all__ = ["delivered_to_addresses", "delivery_headers", "forward_header", "header_block_end"]

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def delivery_headers(return_path: Address | None, delivered_to: str) -> bytes:
    """``Return-Path`` and ``Delivered-To`` lines (CRLF, like the queued text)."""
    sender = "" if return_path is None else str(return_path)
    return f"Return-Path: <{sender}>\r\nDelivered-To: {delivered_to}\r\n".encode()


def forward_header(delivered_to: str) -> bytes:
    """The ``Delivered-To`` line a forwarded copy carries (its loop marker)."""
    return f"Delivered-To: {delivered_to}\r\n".encode()


def header_block_end(data: bytes) -> int:
    """Where the header block ends in ``data`` (the index of its blank line), or -1."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    match = _BLANK_LINE.search(data)
    return -1 if match is None else match.start() + 1


def delivered_to_addresses(data: bytes) -> frozenset[str]:
    """The casefolded addresses of every ``Delivered-To:`` header in ``data``'s header block.

    ``data`` is the start of the message; if it holds no blank line, all of it is
    treated as headers.  Folded header lines are unfolded; angle brackets are removed.
    """
    end = header_block_end(data)
    block = data if end == -1 else data[:end]
    found: set[str] = set()
    current: bytes | None = None
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and current is not None:
            current += b" " + line.strip()
            continue
        if current is not None:
            _add(found, current)
        current = line if line[:13].lower() == b"delivered-to:" else None
    if current is not None:
        _add(found, current)
    return frozenset(found)


def _add(found: set[str], line: bytes) -> None:
    value = line[13:].strip().decode("utf-8", "replace").strip("<> \t")
    if value:
        found.add(value.casefold())

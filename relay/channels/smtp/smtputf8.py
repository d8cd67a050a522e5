"""Whether a message needs SMTPUTF8 on its way out: what it holds, not what it was called.

A client that says ``SMTPUTF8`` on MAIL FROM (the envelope's ``smtputf8`` flag) only
*declares* that it may send UTF-8; many clients say it for every message.  Taking the
declaration as the need would bounce (5.6.7) all-ASCII mail at every server without
SMTPUTF8.  So, as Postfix does, the need is worked out per transaction.  It is there when:

* an address of the transaction has a non-ASCII local part: the return path, or a
  recipient that travels in this transaction (a domain never does: it is kept as
  A-labels); or
* the client declared SMTPUTF8 and the header section holds non-ASCII bytes (RFC 6532
  UTF-8 headers).

Headers are only looked at for declared mail.  Non-ASCII headers in mail whose client did
*not* declare SMTPUTF8 are legacy 8-bit headers (Latin-1 subjects and the like): they
went through before SMTPUTF8 existed, and requiring it now would bounce them at every
server without it.  This is Postfix's choice too (``smtputf8_autodetect_classes`` is off
for mail received by SMTP, for exactly this reason); such mail goes as it came.

When the need is not there, MAIL FROM goes without SMTPUTF8, even to a server that offers
it.

The header section is read through the message's :class:`~relay.interfaces.ITextReader`
(asynchronously: the spool reads in its thread pool) up to the first empty line, and at
most :data:`HEADER_LIMIT` octets: a header section longer than that is judged by its
first 64 KiB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from relay.address import Address
from relay.envelope import Recipient
from relay.interfaces import IMessage

__all__ = ["HEADER_LIMIT", "addresses_need_smtputf8", "header_end", "headers_need_smtputf8"]

HEADER_LIMIT: Final = 64 * 1024
"""The most of a message's text read to find non-ASCII in its header section."""

_READ_SIZE: Final = 16 * 1024


def addresses_need_smtputf8(
    return_path: Address | None,
    recipients: Iterable[Recipient],
    in_transaction: Callable[[Recipient], bool],
) -> bool:
    """Whether the return path or a recipient ``in_transaction`` has a non-ASCII local part.

    ``in_transaction`` is asked only about non-ASCII recipients (it may route them).
    """
    if return_path is not None and return_path.needs_smtputf8:
        return True
    return any(r.address.needs_smtputf8 and in_transaction(r) for r in recipients)


async def headers_need_smtputf8(message: IMessage, limit: int = HEADER_LIMIT) -> bool:
    """Whether ``message``'s header section (its first ``limit`` octets) has non-ASCII bytes.

    Reading stops at the first empty line, at the first non-ASCII byte, or at ``limit``;
    the body is never read.  A failed read fails the call.
    """
    reader = message.open_text()
    seen = b""
    try:
        while len(seen) < limit:
            chunk = await reader.read(min(_READ_SIZE, limit - len(seen)))
            if not chunk:
                break
            # re-scan the last 3 octets too: an empty line may straddle two chunks
            start = max(0, len(seen) - 3)
            seen += chunk
            end = header_end(seen, start)
            if end is not None:
                return not seen[:end].isascii()
            if not chunk.isascii():  # no empty line yet: every octet read is header
                return True
    finally:
        reader.close()
    return not seen[:limit].isascii()


def header_end(text: bytes, start: int = 0) -> int | None:
    """Where the header section of ``text`` ends (before its empty line), or None if unseen.

    Looks for the empty line at or after ``start``; a text that begins with an empty line
    has no header section (0).  Bare LF line ends are accepted as well as CRLF.
    """
    if text.startswith((b"\r\n", b"\n")):
        return 0
    ends = [
        i + len(mark) // 2 for mark in (b"\r\n\r\n", b"\n\n") if (i := text.find(mark, start)) != -1
    ]
    return min(ends) if ends else None

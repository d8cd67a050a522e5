"""The ``Received:`` trace header every intake prepends (RFC 5321 section 4.4).

Layout, after Postfix (clauses on folded lines, so a reader sees one fact per line)::

    Received: from client.helo (unknown [192.0.2.1])
        (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
        (authenticated as alice)
        by hub.example.test (relay) with ESMTPSA
        for <bob@example.test>; Tue, 02 Jan 2024 10:00:00 +0000

Why there is no ``id`` clause: the id a reader wants there is the queue id, and the spool
assigns it while it writes the message, text included, in one durable record.  The header
is part of that text, so it must exist before the id does; writing it after the store
would mean a second write (and a window in which the stored text lacks its trace).  The
gateway's log line for the message joins the two instead: it names the queue id next to
the client address and HELO name that appear here.

``for`` is given only when the message has exactly one recipient: listing several would
tell each recipient who else got the mail (including Bcc recipients).

Every value that came from the client (HELO name, user name) was validated by the engine
or is filtered here to printable ASCII without parentheses or backslashes, so it cannot
break out of its clause or the header.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.address import Address

__all__ = ["local_received_header", "received_header"]


def received_header(
    *,
    helo: str | None,
    client_ip: str | None,
    client_name: str | None,
    hostname: str,
    protocol: str,
    when: float,
    tls: str | None = None,
    auth_user: str | None = None,
    recipient: Address | None = None,
    software: str = "relay",
) -> bytes:
    """The header, CRLF-terminated, folded on clause boundaries."""
    tcp_info = f"{_comment(client_name) if client_name else 'unknown'} {_literal(client_ip)}"
    lines = [f"Received: from {_comment(helo) if helo else 'unknown'} ({tcp_info})"]
    if tls:
        version, _, cipher = tls.partition(" ")
        lines.append(f"\t(using {_comment(version)} with cipher {_comment(cipher)})")
    if auth_user:
        lines.append(f"\t(authenticated as {_comment(auth_user)})")
    lines.append(f"\tby {hostname} ({software}) with {protocol}")
    stamp = _date(int(when))
    if recipient is not None:
        lines.append(f"\tfor {_comment(recipient.smtp_path())}; {stamp}")
    else:
        lines[-1] += f"; {stamp}"
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def local_received_header(
    *,
    uid: int,
    hostname: str,
    when: float,
    helo: str | None = None,
    protocol: str | None = None,
    software: str = "relay",
) -> bytes:
    """The header for mail a local program submitted (``relay sendmail``), after Postfix::

        Received: by hub.example.test (relay, from userid 1000); Tue, 02 Jan 2024 ...

    ``uid`` is who owned the submitted file, as the kernel said.  A ``-bs`` dialogue adds
    its HELO name and protocol: ``Received: from helo`` / ``by ... with ESMTP; date``.
    """
    lines = [f"Received: from {_comment(helo)}"] if helo else []
    by = f"by {hostname} ({software}, from userid {int(uid)})"
    if protocol:
        by += f" with {_comment(protocol)}"
    lead = "\t" if helo else "Received: "
    lines.append(f"{lead}{by}; {_date(int(when))}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date-time, cached: a busy gateway stamps many messages per second."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


@functools.lru_cache(maxsize=1024)
def _literal(ip: str | None) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 address-literal)."""
    if not ip:
        return "[unknown]"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{_comment(ip)}]"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return f"[{mapped}]" if mapped is not None else f"[IPv6:{address.compressed}]"
    return f"[{address}]"


_UNSAFE_IN_COMMENT = re.compile(r"[^!-'*-\[\]-~]")  # printable ASCII but ( ) \\ and space


def _comment(text: str) -> str:
    """``text`` safe inside a header comment: printable ASCII, no ``( ) \\``."""
    return _UNSAFE_IN_COMMENT.sub("?", text[:255])

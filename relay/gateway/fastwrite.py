"""Send a reply at once when Twisted has nothing queued for the socket.

Why this exists: an SMTP server in lock-step with its client writes one small reply per
command.  ``transport.write`` queues it and arms EPOLLOUT; the reactor sends it on its
next pass and disarms EPOLLOUT: two ``epoll_ctl`` calls and one more event dispatch per
reply, for a send the socket could have taken immediately.  On ``bench/smtp_in.py``
(seven replies per message) that path was about a quarter of the gateway's CPU.

When the transport is plain TCP (not TLS), connected, not closing, and Twisted holds no
unsent bytes for it, sending now is exactly what its ``doWrite`` would do a moment later,
in the same order.  In every other case (TLS, bytes already queued, a partial send,
``EAGAIN``, an error) the rest goes to ``transport.write``, so Twisted keeps ordering,
flow control and error handling.  The check reads two attributes that are Twisted's own
(``_tempDataLen``, ``_writeDisconnected``); if a Twisted release renames them the check
fails safe (``getattr`` defaults say "not idle") and every write takes the normal path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write_now"]


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: straight to the socket if it is idle plain TCP."""
    if (
        type(transport) is tcp.Server
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
        and getattr(transport, "_tempDataLen", 1) == 0
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
            if not data:
                return
    transport.write(data)

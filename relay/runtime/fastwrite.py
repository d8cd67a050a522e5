"""Send a reply at once when Twisted has nothing queued for the socket.

Why this exists: an SMTP server in lock-step with its client writes one small reply per
command.  ``transport.write`` queues it and arms EPOLLOUT; the reactor sends it on its
next pass and disarms EPOLLOUT: two ``epoll_ctl`` calls and one more event dispatch per
reply, for a send the socket could have taken immediately (``bench/smtp_in.py`` measures
it; the figures are in the README).

The same holds for the SMTP channel's client connections (one command or a pipelined
group at a time; ``tcp.Client`` shares ``tcp.Server``'s writing code) and for the UNIX
socket between a gateway worker and the spool's process (:mod:`relay.handoff`: one small
frame per message each way; ``unix.Server`` is a ``tcp.Server`` underneath).

When the transport is plain TCP or a UNIX stream (not TLS), connected, not closing, and
Twisted holds no unsent bytes for it, sending now is exactly what its ``doWrite`` would
do a moment later, in the same order.  In every other case (TLS, bytes already queued, a
partial send, ``EAGAIN``, an error) the rest goes to ``transport.write``, so Twisted
keeps ordering, flow control and error handling.

The check reads state that is Twisted's own, not its API: ``tcp.Server``'s
``_tempDataLen`` and ``_writeDisconnected``, ``offset`` and ``dataBuffer``.  Every one is
read with a ``getattr`` default that says "not idle", so if a Twisted release renames or
drops one, every write takes the normal path: slower, never wrong.
tests/test_fastwrite.py checks on a live connection that they are still there
and still mean what we think, so such a release fails CI instead of costing CPU quietly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, unix

__all__ = ["is_idle_plain_tcp", "write_now"]

_PLAIN: tuple[type, ...] = tuple(
    kind
    for kind in (
        getattr(tcp, "Server", None),
        getattr(tcp, "Client", None),
        getattr(unix, "Server", None),
    )
    if kind
)


def is_idle_plain_tcp(transport: Any) -> bool:
    """Whether ``transport`` is a connected plain TCP (or UNIX) socket with nothing queued."""
    if type(transport) not in _PLAIN:
        return False
    buffer = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    return (
        getattr(transport, "TLS", True) is False
        and bool(getattr(transport, "connected", False))
        and not getattr(transport, "disconnecting", True)
        and getattr(transport, "_writeDisconnected", True) is False
        and getattr(transport, "_tempDataLen", None) == 0
        and isinstance(buffer, bytes | memoryview)
        and isinstance(offset, int)
        and offset == len(buffer)
        and callable(getattr(transport, "writeSomeData", None))
    )


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: straight to the socket if it is idle plain TCP."""
    if is_idle_plain_tcp(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
            if not data:
                return
    transport.write(data)

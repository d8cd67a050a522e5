"""The errors and sentinels of both SMTP engines, defined once.

As in h11, errors split by whose fault they are:

* :class:`LocalProtocolError`: *our* side asked its engine for something SMTP does not
  allow now (a reply when none is due, a command out of sequence on the client) -- a
  defect of the adapter, raised at once.
* :class:`RemoteProtocolError`: *the peer* broke the protocol.  The client engine raises
  it (a garbage reply, bytes before TLS); the server engine never raises for what a
  client sends, it answers with a reply instead, since a remote peer must never be able
  to cause an exception there.

:class:`Sentinel` holds what ``next_event`` returns when it has no event.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Sentinel",
]


class LocalProtocolError(Exception):
    """We asked the engine for something SMTP does not allow now (a defect of the caller)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol (garbage, an unexpected reply, bytes before TLS)."""


class Sentinel(enum.Enum):
    """What ``next_event`` returns when it has no event."""

    NEED_DATA = "need-data"  # feed the engine more bytes
    PAUSED = "paused"  # the server engine waits for the reply to its last event
    CLOSED = "closed"  # the session is over: close the connection


NEED_DATA: Final = Sentinel.NEED_DATA
PAUSED: Final = Sentinel.PAUSED
CLOSED: Final = Sentinel.CLOSED

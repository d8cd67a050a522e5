"""The phone link's built-in settings, defined once.

The session engine's :class:`~relay.sansio.phone.session.SessionOptions` and the
``[phone]`` section of the configuration both start from these values.  They live
apart from both: the engine cannot import the configuration (it is sans-I/O), and the
configuration must not import the engine (that would pull the link's cryptography into
every ``relay sendmail``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["COMPRESSION", "ENCRYPTION", "HANDSHAKE_TIMEOUT", "MAX_MESSAGE_SIZE"]

COMPRESSION: Final = True
"""Offer compression of message text (a site's ``compression``)."""

ENCRYPTION: Final = False
"""Offer encryption after the handshake (a site's ``encryption``)."""

HANDSHAKE_TIMEOUT: Final = 60.0
"""Seconds a peer may stay silent after the line is up (``[phone] handshake_timeout``)."""

MAX_MESSAGE_SIZE: Final = 64 << 20
"""Bytes of one message's text a call takes when the site sets no ``max_message_size``."""

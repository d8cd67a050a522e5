"""The two ways a phone engine can fail: the peer broke the protocol, or we misused the API.

As in h11, the split tells the adapter what to do: a :class:`PhoneProtocolError` is
answered (an abort record, then the line dropped) and logged with the peer's name; a
:class:`LocalPhoneError` is a defect in our own code and propagates.
"""

from __future__ import annotations

__all__ = ["LocalPhoneError", "PhoneProtocolError"]


class PhoneProtocolError(Exception):
    """The peer sent something the protocol does not allow; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalPhoneError(Exception):
    """We called the engine in a way its state does not allow."""

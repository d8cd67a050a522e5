"""The phone engines' exceptions: the peer broke the protocol, or we misused an engine.

The split is the one h11 makes: :class:`PhoneProtocolError` is about bytes that came in
(it carries a reason fit for the log and for the hang-up), :class:`LocalPhoneError`
about calls our own code made (a record larger than agreed, a send on a dead link).
Engines never let a :class:`PhoneProtocolError` escape from their ``receive_data``: they
turn it into an event (for the link, ``LinkDead``), so that no received byte can raise.
"""

from __future__ import annotations

__all__ = ["LocalPhoneError", "PhoneError", "PhoneProtocolError"]


class PhoneError(Exception):
    """Base of the phone engines' exceptions."""


class PhoneProtocolError(PhoneError):
    """The peer sent something the protocol does not allow; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalPhoneError(PhoneError):
    """Our own code used an engine outside its rules (a bug here, not on the line)."""

"""Exceptions shared across the relay.

Errors that carry a :class:`relay.reply.Reply` carry it so the layer that catches them
can answer a peer or record a disposition without guessing why something failed.
"""

from __future__ import annotations

from relay.reply import Reply

__all__ = [
    "ContractViolation",
    "DigestMismatch",
    "MessageRefused",
    "RelayError",
    "SessionFailed",
    "SpoolError",
]


class RelayError(Exception):
    """Base of the relay's own exceptions."""


class SessionFailed(RelayError):
    """A channel could not open (or keep) a session; every address gets ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class ContractViolation(RelayError):
    """A channel answered outside the MMDF contract (e.g. MOK in address-then-text mode).

    A defect of the channel, not of the message: the message is deferred, never lost.
    """

    def __init__(self, channel: str, problem: str) -> None:
        super().__init__(f"channel {channel!r} broke the contract: {problem}")
        self.channel = channel
        self.problem = problem


class SpoolError(RelayError):
    """The spool could not make a change durable; nothing half-done is visible."""


class DigestMismatch(RelayError):
    """A message's text does not match the size or hash its sender announced."""


class MessageRefused(RelayError):
    """A receiving store refuses a whole message for good (e.g. it has looped): the
    sender gets ``reply`` as its final answer instead of a temporary failure."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

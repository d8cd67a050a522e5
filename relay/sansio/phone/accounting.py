"""What a call did, as the engine reports it at the end: outcome, bytes, frames, times.

One frozen value per call, for the driver's log line, the relay's call records and the
benchmark.  Payload is the message text moved (from the resume offset on); the link's own
counters give the bytes on the wire.  Efficiency needs the line's bit rate, which only
the driver knows: given it, each direction's efficiency is payload / (rate / 10 *
seconds), ten bits a byte as on an asynchronous serial line.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["CallOutcome", "CallSummary"]


class CallOutcome(enum.Enum):
    """How a call ended."""

    COMPLETED = "completed"  # hang-up agreed: every message both ways has its final reply
    LINE_DROPPED = "line-dropped"  # the line went before the hang-up
    TIMEOUT = "timeout"  # the peer stayed silent in the handshake
    UNKNOWN_SITE = "unknown-site"
    AUTH_FAILED = "auth-failed"
    VERSION_MISMATCH = "version-mismatch"
    PROTOCOL_ERROR = "protocol-error"
    PEER_ABORTED = "peer-aborted"
    LOCAL_ABORT = "local-abort"


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The accounting of one call, at one end."""

    role: str
    peer: str
    outcome: CallOutcome
    reason: str
    seconds: float
    handshake_seconds: float | None
    messages_sent: int
    messages_received: int
    payload_bytes_sent: int
    payload_bytes_received: int
    text_wire_bytes_sent: int  # text after compression, before framing
    text_wire_bytes_received: int
    wire_bytes_sent: int
    wire_bytes_received: int
    frames_sent: int
    frames_resent: int
    frames_damaged: int
    rtt: float | None
    line_rate: int | None = None  # bits per second, when the driver knows it

    @property
    def compression_ratio_sent(self) -> float | None:
        """Payload bytes per text byte on the line (1.0 = nothing gained), or None."""
        if not self.text_wire_bytes_sent:
            return None
        return self.payload_bytes_sent / self.text_wire_bytes_sent

    @property
    def compression_ratio_received(self) -> float | None:
        """The same for what we received."""
        if not self.text_wire_bytes_received:
            return None
        return self.payload_bytes_received / self.text_wire_bytes_received

    def efficiency(self, payload_bytes: int) -> float | None:
        """Payload ÷ what the line could carry in the call's time (None without a rate)."""
        if not self.line_rate or self.seconds <= 0:
            return None
        return payload_bytes / (self.line_rate / 10 * self.seconds)

    @property
    def efficiency_sent(self) -> float | None:
        """Whole-call efficiency of what we sent."""
        return self.efficiency(self.payload_bytes_sent)

    @property
    def efficiency_received(self) -> float | None:
        """Whole-call efficiency of what we received."""
        return self.efficiency(self.payload_bytes_received)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form for call records and the benchmark."""
        out: dict[str, Any] = {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "outcome"
        }
        out["outcome"] = self.outcome.value
        out["compression_ratio_sent"] = self.compression_ratio_sent
        out["compression_ratio_received"] = self.compression_ratio_received
        out["efficiency_sent"] = self.efficiency_sent
        out["efficiency_received"] = self.efficiency_received
        return out

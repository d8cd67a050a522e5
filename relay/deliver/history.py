"""The last delivery and the last failure per channel, for ``relay status``.

The recorder tells :class:`DeliveryHistory` every disposition it records (the same
moment it logs it); the history keeps, per channel, only the newest success and the
newest failure (deferred, bounced or expired), so its size is bounded by the number of
channels.  Nothing here is durable: after a restart it starts empty, and says so (a
channel with no entry has had no attempt since the relay started).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.deliver.logging import DispositionStatus, describe_reply
from relay.envelope import Destination
from relay.reply import Reply

__all__ = ["DeliveryHistory", "LastDisposition"]


@dataclass(frozen=True, slots=True)
class LastDisposition:
    """One remembered disposition."""

    when: float
    queue_id: str
    recipient: str
    destination: str
    status: str
    reply: str

    def to_json(self) -> dict[str, Any]:
        """As ``relay status --json`` shows it."""
        return {
            "time": self.when,
            "queue_id": self.queue_id,
            "recipient": self.recipient,
            "destination": self.destination,
            "status": self.status,
            "reply": self.reply,
        }


class DeliveryHistory:
    """Per channel: the newest delivery and the newest failure since the relay started."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, LastDisposition]] = {}

    def note(
        self,
        *,
        when: float,
        queue_id: str,
        recipient: str,
        destination: Destination | None,
        status: DispositionStatus,
        reply: Reply,
    ) -> None:
        """Remember a disposition if it is its channel's newest of its kind."""
        channel = destination.channel if destination is not None else "unrouted"
        kind = "last_delivery" if status is DispositionStatus.SENT else "last_failure"
        self._last.setdefault(channel, {})[kind] = LastDisposition(
            when,
            queue_id,
            recipient,
            str(destination) if destination is not None else "",
            status.value,
            describe_reply(reply),
        )

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{channel: {"last_delivery": {...} | None, "last_failure": {...} | None}}``."""
        return {
            channel: {
                kind: (last[kind].to_json() if kind in last else None)
                for kind in ("last_delivery", "last_failure")
            }
            for channel, last in sorted(self._last.items())
        }

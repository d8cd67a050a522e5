"""A perfect record link with the Link API, for session tests that need no lossy line.

Records are length-prefixed on a byte stream that never loses or damages a byte (memory,
a raw pty, TCP loopback), so the session engine can be tested before and apart from the
real link.  ``idle`` is true once every record has been handed to ``data_to_send``: on a
perfect line what is written is received.
"""

from __future__ import annotations

from relay.sansio.phone.link import LinkDead, LinkParams, LinkStats, RecordReceived

PlainParams = LinkParams


class PlainLink:
    """Length-prefixed records over a perfect byte stream."""

    def __init__(self, params: PlainParams | None = None, now: float = 0.0) -> None:
        self.params = params or PlainParams()
        self._out = bytearray()
        self._in = bytearray()
        self._events: list[RecordReceived | LinkDead] = []
        self._dead = False
        self.sent = self.received = self.records_sent = 0
        self.payload_sent = self.payload_received = 0
        self.reconfigured: list[PlainParams] = []

    def receive_data(self, data: bytes, now: float) -> None:
        if self._dead:
            return
        if not data:
            self._dead = True
            self._events.append(LinkDead("end of stream"))
            return
        self.received += len(data)
        self._in += data
        while len(self._in) >= 4:
            size = int.from_bytes(self._in[:4], "big")
            if size > self.params.max_record:
                self._dead = True
                self._events.append(LinkDead("record too large"))
                return
            if len(self._in) < 4 + size:
                return
            record = bytes(self._in[4 : 4 + size])
            del self._in[: 4 + size]
            self.payload_received += size
            self._events.append(RecordReceived(record))

    def send_record(self, record: bytes) -> None:
        self._out += len(record).to_bytes(4, "big") + record
        self.records_sent += 1
        self.payload_sent += len(record)

    def reconfigure(self, params: PlainParams) -> None:
        self.reconfigured.append(params)
        self.params = params

    def data_to_send(self, now: float, max_bytes: int | None = None) -> bytes:
        n = len(self._out) if max_bytes is None else min(max_bytes, len(self._out))
        out = bytes(self._out[:n])
        del self._out[:n]
        self.sent += n
        return out

    def next_event(self) -> RecordReceived | LinkDead | None:
        return self._events.pop(0) if self._events else None

    def next_deadline(self) -> float | None:
        return None

    def tick(self, now: float) -> None:
        pass

    @property
    def queued_bytes(self) -> int:
        return len(self._out)

    @property
    def unsent_bytes(self) -> int:
        return len(self._out)

    @property
    def idle(self) -> bool:
        return not self._out

    def stats(self) -> LinkStats:
        return LinkStats(
            self.sent,
            self.received,
            self.payload_sent,
            self.payload_received,
            self.records_sent,
            0,
            0,
            None,
        )

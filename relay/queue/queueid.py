"""Queue ids: unique, sortable by arrival, safe as file names and in log lines.

An id is the arrival time in microseconds since the epoch as 14 upper-case hex digits
(enough until the year 4253), e.g. ``0615E2A4C1B3F0``.  Fixed width makes the text order
the numeric order, so ``sorted(ids)`` is arrival order; hex digits need no quoting in a
shell, a file name or a log line.

Uniqueness does not rest on the clock: the generator never hands out a value less than
or equal to the last one, bumping by one microsecond when two messages arrive in the
same microsecond or the clock steps back.  At start the spool seeds it with the largest
id found on disk, so a restart with a clock that went backwards cannot reuse an id.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["QueueIdGenerator", "is_valid_queue_id"]

_WIDTH = 14
_PATTERN = re.compile(r"[0-9A-F]{14}")


def is_valid_queue_id(text: str) -> bool:
    """True when ``text`` has the form of a queue id."""
    return _PATTERN.fullmatch(text) is not None


class QueueIdGenerator:
    """Hands out strictly increasing ids derived from ``now()`` (seconds, a float)."""

    def __init__(self, now: Callable[[], float], floor: str | None = None) -> None:
        self._now = now
        self._last = int(floor, 16) if floor is not None else -1

    def next(self) -> str:
        """A new id, greater than every id handed out or observed before."""
        value = max(int(self._now() * 1_000_000), self._last + 1)
        self._last = value
        return f"{value:0{_WIDTH}X}"

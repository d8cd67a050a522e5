"""Durations as operators write them: ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` or plain seconds.

One integer and at most one unit letter, nothing else: no fractions, no ``"1h30m"``, no
spaces. A grammar this small has no surprising readings, and every value the relay
needs is comfortably expressed in it. Values are returned as float seconds because
that is what Twisted's clocks take.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DURATION", "DurationError", "format_duration", "parse_duration"]

_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_PATTERN = re.compile(r"([0-9]+)([smhd]?)")

MAX_DURATION = 100 * 365 * 86400
"""A century: anything longer is a typo, and refusing it keeps timers finite."""


class DurationError(ValueError):
    """A value that is not a duration in the grammar above."""


def parse_duration(value: str | int) -> float:
    """Seconds in ``value``: an int (seconds) or a string ``"<digits>[s|m|h|d]"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DurationError(f"not a duration: {value!r}")
    if isinstance(value, int):
        return _checked(value, str(value))
    match = _PATTERN.fullmatch(value)
    if match is None:
        raise DurationError(f"not a duration: {value!r}")
    number, unit = match.groups()
    return _checked(int(number) * _UNITS[unit or "s"], value)


def _checked(seconds: int, text: str) -> float:
    """``seconds`` as a float, if it is neither negative nor absurdly long."""
    if seconds < 0:
        raise DurationError(f"negative duration: {text}")
    if seconds > MAX_DURATION:
        raise DurationError(f"duration longer than a century: {text}")
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` in the same grammar (``300.0`` → ``"5m"``)."""
    whole = int(seconds)
    if whole != seconds or whole < 0:
        return f"{seconds:g}s"
    for unit in ("d", "h", "m"):
        if whole and whole % _UNITS[unit] == 0:
            return f"{whole // _UNITS[unit]}{unit}"
    return f"{whole}s"

"""Splitting a configuration string at a separator that a backslash can escape.

Chat scripts split an expect field at ``-`` (``ogin:-BREAK-ogin:``) and transport
descriptions split at ``:`` (``serial:/dev/ttyS0:baudrate=115200``); in both, a
backslash before the separator keeps it in the field.  The escapes are left in the
fields for the caller to interpret, since each kind of string has its own.
"""

from __future__ import annotations

__all__ = ["split_unescaped"]


def split_unescaped(text: str, separator: str) -> list[str]:
    """``text`` split at each ``separator`` not preceded by a backslash (escapes kept)."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        if text[index] == "\\" and index + 1 < len(text):
            current.append(text[index : index + 2])
            index += 2
            continue
        if text[index] == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(text[index])
        index += 1
    parts.append("".join(current))
    return parts

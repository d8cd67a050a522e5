"""The few file primitives every mailbox writer shares: whole writes and durable directories.

``write_all`` goes through the module attribute ``_write`` so a test can make a write
fail part-way (a short write, then ``ENOSPC``) without touching ``os.write`` for the rest
of the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["fsync_directory", "write_all"]

_write: Callable[[int, bytes | memoryview], int] = os.write


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = _write(fd, view)
        view = view[written:]


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a new, linked or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Who owns the spool: an exclusive ``flock`` on ``<spool>/lock``.

Exactly one process may write the log: the daemon while it runs, else a ``relay queue``
command that opened the spool directly.  The kernel drops a ``flock`` when its holder
dies, even by ``kill -9``, so a stale lock cannot outlive a crash and needs no clean-up;
the holder's pid is written into the file only to make error messages helpful.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from relay.errors import SpoolError

__all__ = ["SpoolLock", "SpoolLocked"]


class SpoolLocked(SpoolError):
    """Another process owns the spool (the daemon, or another command)."""


class SpoolLock:
    """An exclusive, non-blocking flock on one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise SpoolLocked; blocking I/O (keep off the reactor)."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise SpoolLocked(f"the spool at {self.path.parent} is in use{holder}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (by process {text})" if text.isdigit() else ""

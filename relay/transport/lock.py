"""UUCP-style device locks, so that two programs never share a serial port.

The convention every Unix serial program follows (uucico, cu, minicom, pppd, getty's
friends): before opening ``/dev/ttyS0`` a program creates ``LCK..ttyS0`` in the lock
directory (``/var/lock``), holding its process id in the HoneyDanBer ASCII format, ten
characters right-aligned and a newline (``"%10d\\n"``).  Whoever finds the file there
checks whether that process still lives; a lock left by a dead process is stale and is
removed, a live one means the port is busy.

Creation is atomic the way UUCP does it: the content is written to a temporary file in
the same directory, which is then hard-linked to the lock name (``link`` fails if the
name exists, so exactly one of two racing programs wins).  A stale lock is renamed
away before it is checked again and removed, so a racer cannot remove a lock another
racer has just made.  The lock is released only if it still holds our pid.

These are a few small file-system calls without fsync (a lock dies with a reboot
anyway), cheap enough for the reactor thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Final

from relay.config import PhoneSection
from relay.oneline import escape

__all__ = ["DEFAULT_LOCK_DIR", "DeviceLock", "DeviceLockError", "DeviceLocked", "lock_name"]

DEFAULT_LOCK_DIR: Final = PhoneSection().lock_dir  # [phone] lock_dir, defined in the config
_ATTEMPTS: Final = 5  # stale locks removed in a row before giving up (a race gone mad)


class DeviceLockError(OSError):
    """The lock could not be taken or checked (the message says why and where)."""


class DeviceLocked(DeviceLockError):
    """Another live process holds the device."""

    def __init__(self, device: str, path: Path, pid: int | None) -> None:
        owner = f"process {pid}" if pid is not None else "an unreadable lock file"
        super().__init__(
            errno.EBUSY,
            f"{device} is in use by {owner} (lock {path}; remove it only if no program "
            "uses the port)",
        )
        self.device = device
        self.path = path
        self.pid = pid


def lock_name(device: str) -> str:
    """``LCK..ttyS0`` for ``/dev/ttyS0``; a device below /dev keeps its sub-path (``pts_3``).

    Symbolic links are resolved first, so two names of one port share one lock."""
    real = Path(os.path.realpath(device))
    try:
        relative = real.relative_to("/dev")
    except ValueError:
        relative = Path(real.name)
    return "LCK.." + str(relative).replace("/", "_")


def _read_pid(path: Path) -> int | None:
    """The pid in a lock file (HDB ASCII, or the old 4-byte binary form), or None."""
    data = path.read_bytes()[:64]
    text = data.strip()
    if text.isdigit():
        return int(text)
    if len(data) == 4:
        return int.from_bytes(data, "little")
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class DeviceLock:
    """The lock of one device in one directory; :meth:`acquire`, then :meth:`release`."""

    def __init__(self, device: str, directory: Path | str = DEFAULT_LOCK_DIR) -> None:
        self.device = device
        self.directory = Path(directory)
        self.path = self.directory / lock_name(device)
        self.held = False
        self._content = f"{os.getpid():10d}\n".encode("ascii")

    def acquire(self) -> None:
        """Take the lock or raise :class:`DeviceLocked` (busy) / :class:`DeviceLockError`."""
        if self.held:
            raise DeviceLockError(errno.EALREADY, f"{self.path} is already held by us")
        for _ in range(_ATTEMPTS):
            if self._create():
                self.held = True
                return
            self._remove_if_stale()
        raise DeviceLockError(errno.EBUSY, f"cannot take {self.path}: it keeps coming back")

    def release(self) -> None:
        """Remove the lock if it is still ours (another program's is left alone)."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _create(self) -> bool:
        """Make the lock atomically; False if a lock file is already there."""
        temporary = self.directory / f"LTMP.{os.getpid()}.{id(self)}"
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            raise DeviceLockError(
                error.errno, f"cannot create a lock in {self.directory}: {error.strerror}"
            ) from error
        try:
            os.write(descriptor, self._content)
            os.close(descriptor)
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                return False
            except OSError as error:
                raise DeviceLockError(
                    error.errno, f"cannot create {self.path}: {error.strerror}"
                ) from error
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def _remove_if_stale(self) -> None:
        """Remove the lock if its process is dead; raise :class:`DeviceLocked` if alive."""
        try:
            pid = _read_pid(self.path)
        except FileNotFoundError:
            return  # gone meanwhile: try again
        if pid is None or _alive(pid):
            raise DeviceLocked(self.device, self.path, pid)
        aside = self.directory / f"LSTALE.{os.getpid()}.{id(self)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = _read_pid(aside)
            if moved != pid:  # a racer's fresh lock was moved: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    def __repr__(self) -> str:
        return f"<DeviceLock {escape(str(self.path))} held={self.held}>"

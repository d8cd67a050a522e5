"""mbox delivery: append under two locks, quote ``From`` lines, roll back on failure.

The format is mboxrd: each message starts with a ``From sender date`` line, every text
line matching ``^>*From `` gets one more ``>`` (:mod:`relay.mailbox.text`), and a blank
line ends the message.  Two locks are taken, because mail readers use either: a
dot-lock (``<mbox>.lock`` created with ``O_EXCL``, considered stale and removed after
``stale_lock_after`` seconds, as Postfix does after 500 s) and an ``fcntl`` lock on the
file.  Neither is waited on for long: the pool thread retries a few times, then the
delivery answers ``LOCK`` and the deliverer tries again later.

The mailbox is never left corrupt.  The size before the delivery is remembered; if any
write or the final fsync fails, the file is truncated back to that size (and fsynced)
before the error is reported, so a reader sees the mailbox as it was, never half a
message.  ``O_APPEND`` with both locks held means nobody else appended in between.

For a system user's mailbox the file is created (if missing) by the relay and handed to
the user; it is then opened and written as the user (:mod:`relay.mailbox.identity`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from relay.fileio import fsync_directory, write_all
from relay.mailbox.errors import DeliveryError, Step, describe_path, reply_for_oserror
from relay.mailbox.identity import Identity, acting_as, can_switch
from relay.mailbox.maildir import make_directories
from relay.reply import Reply, ReplyCode

__all__ = ["MboxDelivery", "from_line"]

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_LOCK_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_DOTLOCK_OPTIONAL = (errno.EACCES, errno.EPERM, errno.EROFS)


def from_line(sender: str | None, when: float) -> bytes:
    """The ``From sender date`` line that starts a message (``MAILER-DAEMON`` for ``<>``).

    Whitespace in the sender (a quoted local part) would break the line's fields, so it
    becomes ``_`` here only; the Return-Path header keeps the real address.
    """
    who = "".join("_" if char.isspace() else char for char in sender) if sender else ""
    return f"From {who or 'MAILER-DAEMON'} {time.asctime(time.localtime(when))}\n".encode()


class MboxDelivery:
    """One message appended to one mbox: ``ensure_open``, ``write``…, ``commit`` or ``abort``.

    Blocking: call from a worker thread.  Failures raise :class:`DeliveryError` after
    the mailbox has been restored; ``abort`` never raises.

    ``identity`` writes the file; ``lock_identity`` makes the dot-lock in the mailbox's
    directory.  ``create_as_relay`` creates a missing mailbox as the relay and gives it
    to ``identity`` (system users' mailboxes under the mail root); ``make_parents``
    creates missing directories; ``dotlock_may_fail`` goes on without a dot-lock where
    the directory is not writable (mail to a ``/file`` named in aliases, as Postfix).
    """

    def __init__(
        self,
        path: Path,
        *,
        identity: Identity | None = None,
        lock_identity: Identity | None = None,
        create_as_relay: bool = False,
        make_parents: bool = True,
        dotlock_may_fail: bool = False,
        lock_attempts: int = 10,
        lock_delay: float = 0.1,
        stale_lock_after: float = 500.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self._identity = identity
        self._lock_identity = lock_identity
        self._create_as_relay = create_as_relay
        self._make_parents = make_parents
        self._dotlock_may_fail = dotlock_may_fail
        self._lock_attempts = max(1, lock_attempts)
        self._lock_delay = lock_delay
        self._stale_after = stale_lock_after
        self._clock = clock
        self._sleep = sleep
        self._fd: int | None = None
        self._dotlock: Path | None = None
        self._start = 0
        self._needs_newline = False

    @property
    def dotlock_path(self) -> Path:
        """Where the dot-lock goes: ``<mbox>.lock`` beside the mailbox."""
        return self.path.with_name(self.path.name + ".lock")

    def ensure_open(self) -> None:
        """Take the locks and open the mailbox (creating it if missing) unless done."""
        if self._fd is not None:
            return
        step = Step.LOCK
        try:
            self._take_dotlock()
            step = Step.OPEN
            fd = self._open()
            self._fd = fd
            step = Step.LOCK
            self._take_fcntl_lock(fd)
            step = Step.OPEN
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _refusal(f"{describe_path(self.path)} is not a regular file")
            if info.st_nlink != 1:
                raise _refusal(f"{describe_path(self.path)} has {info.st_nlink} hard links")
            self._start = info.st_size
            self._needs_newline = info.st_size > 0 and os.pread(fd, 1, info.st_size - 1) != b"\n"
        except DeliveryError:
            self._release()
            raise
        except OSError as error:
            self._release()
            reply = reply_for_oserror(error, step, self.path)
            if error.errno == errno.EAGAIN and step is Step.LOCK:
                reply = Reply(ReplyCode.LOCK, f"mailbox {describe_path(self.path)} is locked")
            raise DeliveryError(reply) from error

    def write(self, data: bytes) -> None:
        """Append ``data`` (already quoted); on failure truncate back, then raise."""
        self.ensure_open()
        assert self._fd is not None
        if self._needs_newline:
            data = b"\n" + data
            self._needs_newline = False
        try:
            write_all(self._fd, data)
        except OSError as error:
            raise self._failed(error) from error

    def commit(self) -> Path:
        """Write the blank line that ends the message, fsync, unlock; return the path."""
        self.write(b"\n")
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as error:
            raise self._failed(error) from error
        self._release()
        return self.path

    def abort(self) -> None:
        """Abandon the message: the mailbox goes back to its size before it; never raises."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._roll_back()
        self._release()

    # --- internals -------------------------------------------------------------------

    def _failed(self, error: OSError) -> DeliveryError:
        """Roll back after a failed write and build the error to raise."""
        reply = reply_for_oserror(error, Step.WRITE, self.path)
        try:
            self._roll_back()
        except OSError as undo:
            reply = Reply(reply.code, f"{reply.text}; rollback failed: {undo.strerror}")
        self._release()
        return DeliveryError(reply)

    def _roll_back(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, self._start)
        os.fsync(self._fd)

    def _take_dotlock(self) -> None:
        lock = self.dotlock_path
        made_parents = False
        for attempt in range(self._lock_attempts):
            try:
                with acting_as(self._lock_identity):
                    # Empty, as Postfix makes it: nothing to write means nothing half-made.
                    os.close(os.open(lock, _LOCK_FLAGS, 0o600))
                self._dotlock = lock
                return
            except FileExistsError:
                if self._remove_if_stale(lock):
                    continue
            except FileNotFoundError:
                if not self._make_parents or made_parents:
                    raise
                make_directories(self.path.parent, mode=0o755)
                made_parents = True
                continue
            except OSError as error:
                if self._dotlock_may_fail and error.errno in _DOTLOCK_OPTIONAL:
                    return
                raise
            if attempt + 1 < self._lock_attempts:
                self._sleep(self._lock_delay)
        raise BlockingIOError(errno.EAGAIN, "dot-lock held", str(lock))

    def _remove_if_stale(self, lock: Path) -> bool:
        """Remove a dot-lock older than the stale limit; True if the caller should retry."""
        try:
            with acting_as(self._lock_identity):
                age = self._clock() - os.lstat(lock).st_mtime
                if age <= self._stale_after:
                    return False
                os.unlink(lock)
        except FileNotFoundError:
            pass
        return True

    def _open(self) -> int:
        if not self._create_as_relay:
            with acting_as(self._identity):
                try:
                    return os.open(self.path, _OPEN_FLAGS)
                except FileNotFoundError:
                    fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT, 0o600)
                    fsync_directory(self.path.parent)
                    return fd
        try:
            with acting_as(self._identity):
                return os.open(self.path, _OPEN_FLAGS)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                if self._identity is not None and can_switch():
                    os.fchown(fd, self._identity.uid, self._identity.gid)
            finally:
                os.close(fd)
            fsync_directory(self.path.parent)
        with acting_as(self._identity):
            return os.open(self.path, _OPEN_FLAGS)

    def _take_fcntl_lock(self, fd: int) -> None:
        for attempt in range(self._lock_attempts):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if attempt + 1 < self._lock_attempts:
                self._sleep(self._lock_delay)
        raise BlockingIOError(errno.EAGAIN, "fcntl lock held", str(self.path))

    def _release(self) -> None:
        """Unlock and close the file, remove our dot-lock; never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)
        lock, self._dotlock = self._dotlock, None
        if lock is not None:
            with contextlib.suppress(OSError), acting_as(self._lock_identity):
                os.unlink(lock)


def _refusal(text: str) -> DeliveryError:
    """A mailbox that exists but must not be written (temporary: an admin fixes it)."""
    return DeliveryError(Reply(ReplyCode.FOPN, text))

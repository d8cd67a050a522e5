"""Maildir delivery, as D. J. Bernstein's maildir(5) describes it, with durability.

A message is written under ``tmp/`` with a name no other delivery can use, fsynced,
then hard-linked into ``new/`` and its ``tmp/`` name removed; only after ``new/`` itself
is fsynced does the delivery count as done.  A reader therefore never sees a partial
message in ``new/``, and a crash at any point leaves either nothing in ``new/`` or the
whole message.  ``link()`` is used rather than ``rename()`` because ``rename`` silently
replaces an existing name: on a clash ``link`` fails with ``EEXIST`` and a new name is
picked, so no delivered message is ever overwritten.

Names follow the modern convention: ``<secs>.M<usec>P<pid>R<random>Q<n>.<host>`` in
``tmp/``; in ``new/`` the device and inode of the file (``V``/``I``) and its size
(``,S=``, which Dovecot and Courier read as a hint) are added once they are known.

The Maildir (and ``tmp``, ``new``, ``cur``) is created when missing.  For a mailbox that
belongs to a system user, the Maildir directory is made by the relay and handed to the
user, and everything inside it is done as the user (:mod:`relay.mailbox.identity`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.fileio import fsync_directory, write_all
from relay.mailbox.errors import DeliveryError, Step, reply_for_oserror
from relay.mailbox.identity import Identity, acting_as, can_switch

__all__ = ["MaildirDelivery", "MaildirName", "MaildirNamer", "make_directories"]

_NAME_ATTEMPTS = 16
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(frozen=True, slots=True)
class MaildirName:
    """One unique name; ``tmp`` while writing, ``final(...)`` once the file is complete."""

    seconds: int
    microseconds: int
    pid: int
    random: int
    sequence: int
    host: str

    @property
    def tmp(self) -> str:
        """The name under ``tmp/``."""
        return (
            f"{self.seconds}.M{self.microseconds}P{self.pid}"
            f"R{self.random:016x}Q{self.sequence}.{self.host}"
        )

    def final(self, device: int, inode: int, size: int) -> str:
        """The name under ``new/``: the same, plus device, inode and size."""
        return (
            f"{self.seconds}.M{self.microseconds}P{self.pid}V{device:x}I{inode:x}"
            f"R{self.random:016x}Q{self.sequence}.{self.host},S={size}"
        )


class MaildirNamer:
    """Makes Maildir names: time, pid, 64 random bits and a per-process counter.

    Time and pid alone collide (two threads in the same microsecond); the counter makes
    names from one process distinct and the random bits make them distinct across
    processes that reuse a pid.  Thread-safe: ``itertools.count`` advances atomically.
    """

    def __init__(
        self,
        hostname: str,
        *,
        clock: Callable[[], float] = time.time,
        random_bits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self.host = sanitise_host(hostname)
        self._clock = clock
        self._random_bits = random_bits
        self._sequence = itertools.count(1)

    def new_name(self) -> MaildirName:
        """A name not used before by this namer."""
        now = self._clock()
        seconds = int(now)
        microseconds = min(int((now - seconds) * 1_000_000), 999_999)
        return MaildirName(
            seconds,
            microseconds,
            os.getpid(),
            self._random_bits(64),
            next(self._sequence),
            self.host,
        )


def sanitise_host(hostname: str) -> str:
    """The host part of a name: ``/`` and ``:`` (and ``,``) escaped as maildir(5) says."""
    host = hostname or "localhost"
    for char, escaped in (("/", r"\057"), (":", r"\072"), (",", r"\054")):
        host = host.replace(char, escaped)
    return host


class MaildirDelivery:
    """One message going into one Maildir: ``ensure_open``, ``write``…, ``commit`` or ``abort``.

    Every method does blocking I/O: call them from a worker thread.  A failure raises
    :class:`DeliveryError` with the reply to give; ``abort`` never raises.
    """

    def __init__(
        self, maildir: Path, namer: MaildirNamer, *, identity: Identity | None = None
    ) -> None:
        self.maildir = maildir
        self._namer = namer
        self._identity = identity
        self._fd: int | None = None
        self._name: MaildirName | None = None

    @property
    def _tmp_path(self) -> Path:
        assert self._name is not None
        return self.maildir / "tmp" / self._name.tmp

    def ensure_open(self) -> None:
        """Create the file under ``tmp/`` (and the Maildir if missing) unless already done."""
        if self._fd is not None:
            return
        try:
            try:
                with acting_as(self._identity):
                    self._create_tmp_file()
            except FileNotFoundError:
                self._make_maildir()
                with acting_as(self._identity):
                    self._create_tmp_file()
        except OSError as error:
            raise DeliveryError(reply_for_oserror(error, Step.CREATE, self._where())) from error

    def write(self, data: bytes) -> None:
        """Append ``data`` to the file being written."""
        self.ensure_open()
        assert self._fd is not None
        try:
            write_all(self._fd, data)
        except OSError as error:
            raise DeliveryError(reply_for_oserror(error, Step.WRITE, self._tmp_path)) from error

    def commit(self) -> Path:
        """Make the message durable and visible in ``new/``; return its path there."""
        self.ensure_open()
        assert self._fd is not None and self._name is not None
        new_dir = self.maildir / "new"
        try:
            with acting_as(self._identity):
                fd, self._fd = self._fd, None
                try:
                    os.fsync(fd)
                    stat = os.fstat(fd)
                finally:
                    os.close(fd)
                final = self._link_into(new_dir, stat.st_dev, stat.st_ino, stat.st_size)
                try:
                    fsync_directory(new_dir)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp_path)
                return final
        except OSError as error:
            self.abort()
            raise DeliveryError(reply_for_oserror(error, Step.WRITE, new_dir)) from error

    def abort(self) -> None:
        """Give up: close and remove the ``tmp/`` file; ``new/`` is untouched."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._name is not None:
            with contextlib.suppress(OSError), acting_as(self._identity):
                os.unlink(self._tmp_path)
            self._name = None

    # --- internals -------------------------------------------------------------------

    def _where(self) -> Path:
        return self._tmp_path if self._name is not None else self.maildir

    def _create_tmp_file(self) -> None:
        for _ in range(_NAME_ATTEMPTS):
            self._name = self._namer.new_name()
            try:
                self._fd = os.open(self._tmp_path, _FILE_FLAGS, 0o600)
                return
            except FileExistsError:
                continue
        raise FileExistsError(f"no unique name in {self.maildir / 'tmp'}")

    def _link_into(self, new_dir: Path, device: int, inode: int, size: int) -> Path:
        """Hard-link the tmp file into ``new/`` under a name nobody has; never overwrite."""
        assert self._name is not None
        name = self._name
        for _ in range(_NAME_ATTEMPTS):
            final = new_dir / name.final(device, inode, size)
            try:
                os.link(self._tmp_path, final, follow_symlinks=False)
                return final
            except FileExistsError:
                name = self._namer.new_name()
        raise FileExistsError(f"no unique name in {new_dir}")

    def _make_maildir(self) -> None:
        """Create what is missing: parents and the Maildir as the relay, the rest as its owner."""
        created = make_directories(self.maildir, mode=0o700)
        if created and self._identity is not None and can_switch():
            os.chown(self.maildir, self._identity.uid, self._identity.gid, follow_symlinks=False)
        with acting_as(self._identity):
            made = False
            for sub in ("tmp", "new", "cur"):
                try:
                    os.mkdir(self.maildir / sub, 0o700)
                    made = True
                except FileExistsError:
                    pass
            if made:
                fsync_directory(self.maildir)


def make_directories(path: Path, *, mode: int) -> bool:
    """``mkdir -p`` that fsyncs each new entry's parent; True if ``path`` itself was made.

    Parents get mode 0755 (a mail root must be searchable), ``path`` gets ``mode``.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created_target = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode if directory == path else 0o755)
        except FileExistsError:
            continue
        fsync_directory(directory.parent)
        created_target = created_target or directory == path
    return created_target

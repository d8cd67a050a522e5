"""Where the spool keeps things under its directory, and the few durable file operations.

::

    <spool>/lock                  flock()ed by whoever owns the spool (daemon or command)
    <spool>/control               the daemon's UNIX control socket (mode 0600)
    <spool>/key                   the secret that keys record headers (relay.queue.key)
    <spool>/log/0000000001.seg    the append-only log, in numbered segments
    <spool>/quarantine/           damaged bytes set aside by recovery, one file each

Every name the spool writes is listed here so that nothing else guesses at the layout.
The helpers are blocking and must only run off the reactor thread (or in a command).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from relay.fileio import fsync_directory, write_all

__all__ = ["TEMP_SUFFIX", "SpoolLayout", "write_file_durably"]

TEMP_SUFFIX = ".tmp"
_SEGMENT_SUFFIX = ".seg"
_SEGMENT_DIGITS = 10


@dataclass(frozen=True, slots=True)
class SpoolLayout:
    """The paths of one spool directory."""

    root: Path

    @property
    def log_dir(self) -> Path:
        """The directory of segment files."""
        return self.root / "log"

    @property
    def quarantine_dir(self) -> Path:
        """Where recovery copies damaged records."""
        return self.root / "quarantine"

    @property
    def lock_path(self) -> Path:
        """The file whose flock says who owns the spool."""
        return self.root / "lock"

    @property
    def key_path(self) -> Path:
        """The spool's header key: created with the spool, never replaced."""
        return self.root / "key"

    @property
    def control_path(self) -> Path:
        """The daemon's control socket."""
        return self.root / "control"

    def segment_path(self, number: int) -> Path:
        """The file of segment ``number``."""
        return self.log_dir / f"{number:0{_SEGMENT_DIGITS}d}{_SEGMENT_SUFFIX}"

    def make_dirs(self) -> None:
        """Create the spool's directories (private to the owner) if missing."""
        for directory in (self.root, self.log_dir, self.quarantine_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def segment_numbers(self) -> list[int]:
        """The numbers of the segment files present, ascending."""
        if not self.log_dir.is_dir():
            return []
        numbers = []
        for path in self.log_dir.iterdir():
            stem = path.name.removesuffix(_SEGMENT_SUFFIX)
            named = path.name.endswith(_SEGMENT_SUFFIX) and len(stem) == _SEGMENT_DIGITS
            if named and stem.isdigit():
                numbers.append(int(stem))
        return sorted(numbers)

    def temp_files(self) -> list[Path]:
        """Leftover temporary files of an interrupted write."""
        found: list[Path] = []
        for directory in (self.root, self.log_dir, self.quarantine_dir):
            if directory.is_dir():
                found.extend(p for p in directory.iterdir() if p.name.endswith(TEMP_SUFFIX))
        return sorted(found)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent or complete after a crash.

    Temp file, fsync, ``link`` (which, unlike ``rename``, never replaces an existing file),
    fsync of the directory.  Raises FileExistsError if ``path`` exists.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_directory(path.parent)

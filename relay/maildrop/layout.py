"""The paths of the maildrop, and making them with the right modes.

Every name either side uses is here.  The helpers block (mkdir, chmod, stat): the daemon
runs them in a thread, ``relay sendmail`` directly.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DROP_MODE", "TEMP_PREFIX", "MaildropLayout", "is_drop_name"]

DROP_MODE = 0o1733  # sticky; anyone may create, nobody but the owner may list
TEMP_PREFIX = "."  # a file still being written (the pickup leaves it alone)


@dataclass(frozen=True, slots=True)
class MaildropLayout:
    """The directories under one ``[relay] maildrop`` path."""

    root: Path

    @property
    def drop_dir(self) -> Path:
        """Where sendmail writes (mode 1733)."""
        return self.root / "drop"

    @property
    def quarantine_dir(self) -> Path:
        """Where files the pickup could not take are kept for the operator (0700)."""
        return self.root / "quarantine"

    def prepare(self) -> None:
        """Create the directories if missing, with their modes (the umask ignored).

        A directory that exists is left as it is unless this process owns it, in which
        case its mode is set (an operator's ``chmod`` mistake repaired at start).
        """
        for path, mode in (
            (self.root, 0o755),
            (self.drop_dir, DROP_MODE),
            (self.quarantine_dir, 0o700),
        ):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700, parents=path == self.root)
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(f"{path} is not a directory")
            if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
                os.chmod(path, mode)


def is_drop_name(name: str) -> bool:
    """Whether ``name`` in the drop directory is a finished file (not a dot-name)."""
    return bool(name) and not name.startswith(TEMP_PREFIX)

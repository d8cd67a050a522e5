"""Writing one file into the drop directory, durably, as the submitting user.

The file is created under a dot-name with ``O_EXCL | O_NOFOLLOW`` (so a name someone
else planted is never opened), written, fsynced, renamed to its final name and the
directory fsynced: after :func:`drop` returns, the file survives a crash, and the pickup
never sees a half-written one (it ignores dot-names).  The final name carries 128 random
bits, so the rename never meets an existing name.

Mode 0644, whatever the umask: the daemon may run as another user than the submitter
and must read the file.  Nobody else can find it to read it: the drop directory is not
listable (1733) and the names cannot be guessed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time

from relay.fileio import fsync_directory, write_all
from relay.maildrop.layout import TEMP_PREFIX, MaildropLayout

__all__ = ["drop"]

FILE_MODE = 0o644


def drop(layout: MaildropLayout, data: bytes) -> str:
    """Write ``data`` as a new file in the drop directory; its final name.  Raises OSError.

    A maildrop that does not exist yet (the relay never started) is made first.
    """
    directory = layout.drop_dir
    if not directory.is_dir():
        layout.prepare()
    token = secrets.token_hex(16)
    temp = directory / f"{TEMP_PREFIX}{token}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        name = f"{time.time_ns():x}.{os.getpid()}.{token}"
        os.rename(temp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)
    return name

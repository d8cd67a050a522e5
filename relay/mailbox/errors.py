"""OS errors met while writing a mailbox, mapped to MMDF replies.

Why these choices (Postfix's local(8) and its ``mbox_dsn`` are the model):

* A **full disk** (``ENOSPC``) is the host's problem, not the recipient's: ``FSPC``,
  temporary, so the mail waits until space comes back.
* A **quota** (``EDQUOT``) or a file grown past its limit (``EFBIG``) is the recipient's
  mailbox being full: ``QUOT``, 552 5.2.2, a bounce the sender can act on.
* **Permission** problems (``EACCES``, ``EPERM``, a read-only file system) are almost
  always a mistake an administrator fixes (a Maildir created by the wrong user, a
  mail root made read-only): temporary, so nothing bounces while it is being fixed.
* A **missing or unmakeable directory** (``ENOENT``, ``ENOTDIR``) is ``FCRT``:
  temporary for the same reason.
* A **lock** held by someone else is ``LOCK``: temporary.
* Anything else is a temporary I/O failure of the kind of step that failed: mail that
  the relay accepted is never bounced because of a fault of the host it runs on.

The reply text names the step and the path, so the log line and (after the lifetime)
the DSN say what to fix.
"""

from __future__ import annotations

import enum
import errno
import os

from relay.errors import RelayError
from relay.oneline import escape
from relay.reply import Reply, ReplyCode

__all__ = ["DeliveryError", "Step", "describe_path", "reply_for_oserror"]


class Step(enum.Enum):
    """What the mailbox code was doing when the OS said no; decides the default reply."""

    CREATE = "create"
    OPEN = "open"
    LOCK = "lock"
    WRITE = "write"


class DeliveryError(RelayError):
    """A delivery to one mailbox, file or command failed; ``reply`` says how and why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


_DEFAULT_FOR_STEP = {
    Step.CREATE: ReplyCode.FCRT,
    Step.OPEN: ReplyCode.FOPN,
    Step.LOCK: ReplyCode.LOCK,
    Step.WRITE: ReplyCode.FIO,
}

_BY_ERRNO: dict[int, ReplyCode] = {
    errno.ENOSPC: ReplyCode.FSPC,
    errno.EDQUOT: ReplyCode.QUOT,
    errno.EFBIG: ReplyCode.QUOT,
    errno.EACCES: ReplyCode.FOPN,
    errno.EPERM: ReplyCode.FOPN,
    errno.EROFS: ReplyCode.FOPN,
    errno.ENOENT: ReplyCode.FCRT,
    errno.ENOTDIR: ReplyCode.FCRT,
    errno.EISDIR: ReplyCode.FOPN,
    errno.ELOOP: ReplyCode.FOPN,
    errno.EMFILE: ReplyCode.LIO,
    errno.ENFILE: ReplyCode.LIO,
    errno.ENOMEM: ReplyCode.LIO,
    errno.EAGAIN: ReplyCode.LOCK,
}


def reply_for_oserror(error: OSError, step: Step, path: object) -> Reply:
    """The reply for ``error`` met while doing ``step`` on ``path`` (one line of text)."""
    code = _BY_ERRNO.get(error.errno or 0, _DEFAULT_FOR_STEP[step])
    reason = error.strerror or type(error).__name__
    text = f"cannot {step.value} {describe_path(path)}: {reason}"
    if code is ReplyCode.QUOT:
        return Reply(code, f"mailbox full: {text}")
    return Reply(code, text)


def describe_path(path: object) -> str:
    """``path`` as it may appear in a one-line reply: control characters escaped."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return escape(text)

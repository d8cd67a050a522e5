"""The phone channel's read side: a message the link has received, read the MMDF way.

When the link has checked a message from a site against its hash and remembered its id,
the text waits in the link's directory (:mod:`relay.channels.phone.inbox`).  From there
it enters the queue the way MMDF's channels fed ``submit``: the channel is read through
its read-mail calls (:class:`~relay.interfaces.IReadSession`, here :class:`HeldMessage`)
and :func:`submit_held` is the other end, the spool's side, which answers each address
and the text.  The text is read in chunks off the reactor thread; its copy is dropped
only once the queue has the message (``answer_message`` with a success) or the message
is refused for good (``abort_message``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from relay.address import Address
from relay.envelope import Envelope, Recipient
from relay.fileio import fsync_directory
from relay.interfaces import IReadSession
from relay.reply import Reply

__all__ = ["HeldMessage"]

READ_SIZE: Final = 65536


@implementer(IReadSession)
class HeldMessage:
    """One received message in the link's directory, as a read session of one message."""

    def __init__(self, text_path: Path, envelope: Envelope, reactor: Any) -> None:
        self._path = text_path
        self._envelope = envelope
        self._reactor = reactor
        self._given = False
        self._next_recipient = 0
        self._offset = 0
        self.replies: list[Reply] = []  # the answer given for each address, in order
        self.final: Reply | None = None

    def next_message(self) -> Deferred[tuple[str, Address | None] | None]:
        """``xx_rinit``: the message (mode ``m``: for mailboxes), then None."""
        if self._given:
            return succeed(None)
        self._given = True
        return succeed(("m", self._envelope.return_path))

    def next_recipient(self) -> Deferred[Recipient | None]:
        """``xx_radr``: the addresses the link accepted, then None."""
        recipients = self._envelope.recipients
        if self._next_recipient >= len(recipients):
            return succeed(None)
        self._next_recipient += 1
        return succeed(recipients[self._next_recipient - 1])

    def answer_recipient(self, reply: Reply) -> Deferred[None]:
        """``xx_wrply`` for an address: noted (the site was answered when it proposed)."""
        self.replies.append(reply)
        return succeed(None)

    def begin_text(self) -> Deferred[None]:
        """``xx_rtinit``: the text is read from its first byte."""
        self._offset = 0
        return succeed(None)

    def read_text(self) -> Deferred[bytes]:
        """``xx_rtxt``: the next chunk, read off the reactor thread; ``b""`` at the end."""
        d = self._in_thread(_read_at, self._path, self._offset, READ_SIZE)

        def advance(chunk: bytes) -> bytes:
            self._offset += len(chunk)
            return chunk

        return d.addCallback(advance)

    def answer_message(self, reply: Reply) -> Deferred[None]:
        """``xx_wrply`` for the text: once the queue has it, the link's copy goes."""
        self.final = reply
        if reply.code.is_success:
            return self._in_thread(_forget, self._path)
        return succeed(None)  # kept: stored again at the next start

    def abort_message(self) -> Deferred[None]:
        """``xx_rkill``: the message is refused for good; its copy goes."""
        return self._in_thread(_forget, self._path)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _forget(path: Path) -> None:
    """Drop the copy (the id's envelope beside it stays: it is the memory of the id)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_directory(path.parent)

"""The local channel's delivery targets: mailboxes, files, commands, remote addresses.

:class:`LocalTargets` carries out one planned item of an alias expansion
(:mod:`relay.channels.local.aliases`) and answers with a reply; the channel
(:mod:`relay.channels.local.channel`) decides which items to carry out and merges their
replies into one per address.  The mailbox formats themselves (Maildir, mbox, the pipe
to a command, the headers added) are :mod:`relay.mailbox`; this module runs them: file
writes in a small thread pool of the channel's own, never in the reactor thread
(mailbox writes fsync; a pool shared with the spool or DNS would let slow mailboxes
starve them; four threads keep a few fsyncs in flight on one disk without letting a
burst of local mail swamp the machine), commands through ``reactor.spawnProcess``, and
remote addresses as one new message stored in the queue.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relay.address import Address
from relay.channels.local.aliases import (
    CommandDelivery,
    FileDelivery,
    MailboxDelivery,
    RemoteDelivery,
)
from relay.channels.local.users import LocalRecipients, LocalUser
from relay.config import MailboxFormat
from relay.envelope import Envelope, Recipient, Submitter
from relay.interfaces import IMessage, IQueue, ITextReader, QueueSource
from relay.mailbox.errors import DeliveryError
from relay.mailbox.headers import delivery_headers, forward_header
from relay.mailbox.identity import Identity
from relay.mailbox.maildir import MaildirDelivery, MaildirNamer
from relay.mailbox.mbox import MboxDelivery, from_line
from relay.mailbox.pipe import reply_for_outcome, run_command
from relay.mailbox.text import MailboxText
from relay.oneline import one_line
from relay.reply import Reply, ReplyCode

__all__ = ["LocalTargets", "UnreadableText", "read_chunk"]

_T = TypeVar("_T")
_log = Logger()

_READ_SIZE = 65536
_FLUSH_SIZE = 256 * 1024  # text gathered in the reactor before one hop to the pool
TEXT_LIMIT = 300


class _Sink(Protocol):
    """What the channel needs of a mailbox writer (Maildir or mbox)."""

    def ensure_open(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def commit(self) -> Path: ...
    def abort(self) -> None: ...


class UnreadableText(Exception):
    """The queued text could not be read: a temporary failure of the address."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.reply = Reply(
            ReplyCode.AGN, one_line(f"cannot read the queued text: {error}", TEXT_LIMIT)
        )


class LocalTargets:
    """Writes one message to one target at a time; the local channel's hands."""

    def __init__(
        self,
        recipients: LocalRecipients,
        *,
        reactor: Any,
        hostname: str,
        queue: QueueSource | None = None,
        alias_identity: Identity | None = None,
        command_timeout: float = 1000.0,
        max_threads: int = 4,
        setsid: str | None = shutil.which("setsid"),
        namer: MaildirNamer | None = None,
        lock_attempts: int = 10,
        lock_delay: float = 0.1,
    ) -> None:
        self.recipients = recipients
        self._reactor = reactor
        self._queue = queue
        self.alias_identity = alias_identity
        self._command_timeout = command_timeout
        self._setsid = setsid
        self._namer = namer or MaildirNamer(hostname)
        self._lock_attempts = lock_attempts
        self._lock_delay = lock_delay
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="relay-local")
        self._shutdown_trigger: object | None = None
        self._mbox_locks: dict[Path, DeferredLock] = {}

    # --- mailboxes and files -----------------------------------------------------------

    async def mailbox(
        self, item: MailboxDelivery, message: IMessage, return_path: Address | None
    ) -> Reply:
        user = self.recipients.find_user(item.user)
        if user is None:
            return Reply(ReplyCode.USER, f"unknown user: {item.address}")
        headers = delivery_headers(return_path, item.address)
        if user.format is MailboxFormat.MAILDIR:
            maildir = MaildirDelivery(user.mailbox, self._namer, identity=user.identity)
            where = await self._write(maildir, message, b"", headers, quote_from=False)
        else:
            where = await self._append_mbox(self._user_mbox(user), message, return_path, headers)
        if isinstance(where, Reply):
            return where
        return Reply(ReplyCode.MOK, one_line(f"delivered to {item.address} ({where})", TEXT_LIMIT))

    def _user_mbox(self, user: LocalUser) -> MboxDelivery:
        return MboxDelivery(
            user.mailbox,
            identity=user.identity,
            create_as_relay=user.identity is not None,
            lock_attempts=self._lock_attempts,
            lock_delay=self._lock_delay,
        )

    async def file(
        self, item: FileDelivery, message: IMessage, return_path: Address | None
    ) -> Reply:
        if item.path == os.devnull:
            return Reply(ReplyCode.MOK, f"discarded ({os.devnull})")
        headers = delivery_headers(return_path, item.address)
        identity = self.alias_identity
        if item.path.endswith("/"):
            maildir = MaildirDelivery(Path(item.path), self._namer, identity=identity)
            where = await self._write(maildir, message, b"", headers, quote_from=False)
        else:
            mbox = MboxDelivery(
                Path(item.path),
                identity=identity,
                lock_identity=identity,
                make_parents=False,
                dotlock_may_fail=True,
                lock_attempts=self._lock_attempts,
                lock_delay=self._lock_delay,
            )
            where = await self._append_mbox(mbox, message, return_path, headers)
        if isinstance(where, Reply):
            return where
        return Reply(ReplyCode.MOK, one_line(f"delivered to file {where}", TEXT_LIMIT))

    async def _append_mbox(
        self, mbox: MboxDelivery, message: IMessage, return_path: Address | None, headers: bytes
    ) -> Path | Reply:
        """Append under an in-process lock too: fcntl locks do not exclude our own threads."""
        lock = self._mbox_locks.setdefault(mbox.path, DeferredLock())
        await lock.acquire()
        try:
            sender = None if return_path is None else str(return_path)
            first = from_line(sender, self._reactor.seconds())
            return await self._write(mbox, message, first, headers, quote_from=True)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._mbox_locks.pop(mbox.path, None)

    async def _write(
        self, sink: _Sink, message: IMessage, raw: bytes, headers: bytes, *, quote_from: bool
    ) -> Path | Reply:
        """Stream the text into ``sink`` in a few pool hops; the path written, or why not.

        Text is gathered in the reactor up to ``_FLUSH_SIZE`` per hop, so a typical
        message costs one hop (open, write, fsync, link) and a large one a few.
        """
        transform = MailboxText(quote_from=quote_from)
        pending = [raw, transform.feed(headers)]
        size = sum(map(len, pending))
        reader = message.open_text()
        try:
            while chunk := await read_chunk(reader):
                converted = transform.feed(chunk)
                pending.append(converted)
                size += len(converted)
                if size >= _FLUSH_SIZE:
                    data, pending, size = b"".join(pending), [], 0
                    await self.in_thread(_write_some, sink, data)
            pending.append(transform.finish(ensure_newline=quote_from))
            return await self.in_thread(_write_last, sink, b"".join(pending))
        except DeliveryError as error:
            await self.in_thread(sink.abort)
            return error.reply
        except BaseException:
            await self.in_thread(sink.abort)
            raise
        finally:
            reader.close()

    # --- commands ----------------------------------------------------------------------

    async def command(
        self,
        item: CommandDelivery,
        message: IMessage,
        return_path: Address | None,
        recipient: Recipient,
    ) -> Reply:
        identity = self.alias_identity
        sender = "" if return_path is None else str(return_path)
        env = {
            "PATH": "/usr/bin:/bin",
            "SHELL": "/bin/sh",
            "HOME": identity.home if identity is not None else "/",
            "LOGNAME": identity.name if identity is not None else "",
            "USER": identity.name if identity is not None else "",
            "SENDER": sender,
            "RECIPIENT": str(item.address),
            "LOCAL": item.address.local_part,
            "DOMAIN": item.address.domain,
            "EXTENSION": item.extension or "",
            "ORIGINAL_RECIPIENT": recipient.original or str(recipient.address),
            "QUEUE_ID": message.queue_id,
        }
        reader = message.open_text()
        transform = MailboxText(quote_from=False)
        first = [
            from_line(sender or None, self._reactor.seconds())
            + transform.feed(delivery_headers(return_path, str(item.address)))
        ]
        exhausted = False

        async def source() -> bytes:
            nonlocal exhausted
            if first:
                return first.pop()
            while not exhausted:
                chunk = await read_chunk(reader)
                if not chunk:
                    exhausted = True
                    return transform.finish(ensure_newline=False)
                converted = transform.feed(chunk)
                if converted:  # b"" here only means a CR is held back, not the end
                    return converted
            return b""

        try:
            outcome = await run_command(
                self._reactor,
                item.command,
                source,
                env=env,
                identity=identity,
                timeout=self._command_timeout,
                setsid=self._setsid,
            )
        except OSError as error:
            return Reply(
                ReplyCode.AGN, one_line(f"cannot run |{item.command}: {error}", TEXT_LIMIT)
            )
        finally:
            reader.close()
        return reply_for_outcome(item.command, outcome)

    # --- remote addresses --------------------------------------------------------------

    async def forward(
        self,
        remote: Sequence[RemoteDelivery],
        message: IMessage,
        return_path: Address | None,
        recipient: Recipient,
    ) -> Reply:
        """Store a new message for the remote targets; the deliverer routes it like any other."""
        queue = await self._the_queue()
        if queue is None:
            return Reply(ReplyCode.AGN, "cannot forward to remote addresses: no queue")
        original = recipient.original or str(recipient.address)
        addresses = [item.address for item in remote]
        previous = message.envelope
        envelope = Envelope(
            return_path=return_path,
            recipients=tuple(Recipient(a, None, original) for a in addresses),
            arrival=self._reactor.seconds(),
            submitter=Submitter(protocol="local"),
            body_type=previous.body_type,
            smtputf8=previous.smtputf8 or any(a.needs_smtputf8 for a in addresses),
            env_id=previous.env_id,
        )
        text = forward_header(str(recipient.address)) + await read_all(message)
        try:
            queue_id = await queue.store(envelope, text)
        except Exception as error:
            _log.failure("cannot queue the forwarded copy of {queue_id}", queue_id=message.queue_id)
            return Reply(
                ReplyCode.AGN, one_line(f"cannot queue the forwarded copy: {error}", TEXT_LIMIT)
            )
        shown = ", ".join(str(a) for a in addresses)
        return Reply(ReplyCode.MOK, one_line(f"forwarded to {shown} as {queue_id}", TEXT_LIMIT))

    async def _the_queue(self) -> IQueue | None:
        """The queue, once open (the spool service may still be opening it)."""
        if self._queue is None:
            return None
        opened: IQueue = await self._queue.when_ready()
        return opened

    def close(self) -> Deferred[None]:
        """Stop the thread pool; fire once its threads have ended.

        The deliverer must have stopped: a mailbox write still running is finished, not
        interrupted.  Stopping a pool joins its threads, which may wait for an fsync, so it
        runs in a thread of the reactor's own pool, never in the reactor thread.  (If the
        channel is never closed, the reactor stops the pool as it shuts down.)
        """
        if self._shutdown_trigger is None:
            return defer.succeed(None)
        self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
        self._shutdown_trigger = None
        stopped: Deferred[None] = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._pool.stop
        )
        return stopped

    # --- the pool ----------------------------------------------------------------------

    def in_thread(self, function: Callable[..., _T], *args: object) -> Deferred[_T]:
        """Run ``function`` in the channel's own pool, started on first use."""
        if self._shutdown_trigger is None:
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._pool.stop
            )
        return deferToThreadPool(self._reactor, self._pool, function, *args)


async def read_chunk(reader: ITextReader) -> bytes:
    """One chunk of the queued text; a read failure becomes :class:`UnreadableText`."""
    try:
        chunk: bytes = await reader.read(_READ_SIZE)
    except Exception as error:
        raise UnreadableText(error) from error
    return chunk


async def read_all(message: IMessage) -> bytes:
    """The whole queued text of ``message``."""
    reader = message.open_text()
    try:
        chunks = []
        while chunk := await read_chunk(reader):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        reader.close()


def _write_some(sink: _Sink, data: bytes) -> None:
    sink.ensure_open()
    sink.write(data)


def _write_last(sink: _Sink, data: bytes) -> Path:
    sink.ensure_open()
    sink.write(data)
    return sink.commit()

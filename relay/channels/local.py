"""The local channel: MMDF's ``lo_wtmail``, mailbox-stuffing in text-per-address mode.

For each address the deliverer hands it, the channel delivers the whole message and
answers ``MOK`` or a failure, inside :meth:`LocalSession.add_recipient`.  Delivering an
address means:

1. reading the message's header block once per message, for its ``Delivered-To``
   lines (the loop detector);
2. expanding the address through the aliases (:func:`relay.aliases.expand`) into a plan:
   user mailboxes, files, commands, remote addresses, and failures;
3. carrying out each item: a Maildir or mbox write in the channel's own small thread
   pool (never in the reactor thread), a command through ``reactor.spawnProcess``, and
   all remote addresses together as one *new* message stored in the queue;
4. answering with one reply for the address.

**One reply for many targets.**  When an alias expands to several targets the address
still gets one reply: ``MOK`` when every target took the message; the first temporary
failure if any target must be retried (the deliverer keeps the address queued); else the
first permanent failure (the sender hears about it, as Postfix would tell them about the
one bad member).  So that a retry does not deliver twice to the targets that already
got the message, the channel remembers (in memory, bounded) which targets of which
queued address succeeded, and skips them next time.

**Never an exception.**  Every failure becomes a reply (``relay.mailbox.errors`` maps
OS errors); a defect is logged and answered ``LIO`` (temporary), so one bad delivery
never takes the session down and never loses mail.

**Why a pool of our own.**  Mailbox writes fsync; a pool shared with the spool or DNS
would let slow mailboxes starve them.  Four threads keep a few fsyncs in flight on one
disk without letting a burst of local mail swamp the machine.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relay.address import Address
from relay.aliases import (
    CommandDelivery,
    FailedTarget,
    FileDelivery,
    MailboxDelivery,
    PlannedDelivery,
    RemoteDelivery,
    expand,
)
from relay.config import Config, MailboxFormat
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.interfaces import (
    IChannel,
    IChannelSession,
    IMessage,
    IQueue,
    ITextReader,
    SequencingMode,
)
from relay.local_users import (
    LocalRecipients,
    LocalUser,
    build_local_recipients,
    local_domain_test,
)
from relay.mailbox.errors import DeliveryError
from relay.mailbox.headers import (
    delivered_to_addresses,
    delivery_headers,
    forward_header,
    header_block_end,
)
from relay.mailbox.identity import Identity, can_switch, identity_of_owner
from relay.mailbox.maildir import MaildirDelivery, MaildirNamer
from relay.mailbox.mbox import MboxDelivery, from_line
from relay.mailbox.pipe import reply_for_outcome, run_command
from relay.mailbox.text import MailboxText
from relay.oneline import escape, one_line
from relay.reply import Reply, ReplyCode

__all__ = ["LocalChannel", "LocalSession", "QueueSource", "build_local_channel"]

_T = TypeVar("_T")
_log = Logger()

_READ_SIZE = 65536
_FLUSH_SIZE = 256 * 1024  # text gathered in the reactor before one hop to the pool
_HEADER_LIMIT = 256 * 1024  # how far to look for Delivered-To lines
_MEMO_LIMIT = 10_000
_TEXT_LIMIT = 300


class _Sink(Protocol):
    """What the channel needs of a mailbox writer (Maildir or mbox)."""

    def ensure_open(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def commit(self) -> Path: ...
    def abort(self) -> None: ...


class QueueSource(Protocol):
    """Something that will have the queue: the spool service's ``when_ready()``."""

    def when_ready(self) -> Deferred[Any]:
        """Fire with the open queue."""
        ...


class _UnreadableText(Exception):
    """The queued text could not be read: a temporary failure of the address."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.reply = Reply(
            ReplyCode.AGN, one_line(f"cannot read the queued text: {error}", _TEXT_LIMIT)
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of one planned item: which deliveries it covers, a label, a reply."""

    keys: tuple[str, ...]
    label: str
    reply: Reply


@implementer(IChannel)
class LocalChannel:
    """Delivers to local mailboxes, files and commands, expanding aliases (``lo_wtmail``)."""

    name = "local"
    mode = SequencingMode.TEXT_PER_ADDRESS

    def __init__(
        self,
        recipients: LocalRecipients,
        *,
        reactor: Any,
        hostname: str,
        is_local_domain: Callable[[str], bool],
        queue: IQueue | QueueSource | None = None,
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
        self._hostname = hostname
        self._is_local_domain = is_local_domain
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
        self._done: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        self.delivered = 0
        self.failed = 0

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: nothing to connect to; a session is ready at once."""
        return defer.succeed(LocalSession(self))

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

    # --- one address -------------------------------------------------------------------

    async def deliver(
        self,
        message: IMessage,
        return_path: Address | None,
        recipient: Recipient,
        delivered_to: Callable[[], Awaitable[frozenset[str]]],
    ) -> Reply:
        """Deliver ``message`` for ``recipient`` wherever its address leads; one reply."""
        try:
            reply = await self._deliver(message, return_path, recipient, delivered_to)
        except _UnreadableText as error:
            reply = error.reply
        except defer.CancelledError:
            raise  # the deliverer gave up on this address (stopping): not a defect
        except Exception:
            _log.failure(
                "local delivery of {queue_id} to {address} failed unexpectedly",
                queue_id=message.queue_id,
                address=escape(str(recipient.address)),
            )
            reply = Reply(ReplyCode.LIO, "internal error in the local channel (logged)")
        if reply.code.is_success:
            self.delivered += 1
        else:
            self.failed += 1
        return reply

    async def _deliver(
        self,
        message: IMessage,
        return_path: Address | None,
        recipient: Recipient,
        delivered_to: Callable[[], Awaitable[frozenset[str]]],
    ) -> Reply:
        context = self.recipients.expansion_context(
            is_local_domain=self._is_local_domain,
            read_include=_read_include,
            delivered_to=await delivered_to(),
        )
        address = recipient.address
        if self.recipients.aliases.has_includes:
            plan = await self._in_thread(expand, address, context)
        else:
            plan = expand(address, context)
        memo_key = (message.queue_id, str(address))
        already = self._done.get(memo_key, frozenset())
        outcomes: list[_Outcome] = []
        remote: list[RemoteDelivery] = []
        for item in plan:
            if item.key in already:
                outcomes.append(_Outcome((item.key,), item.label, _EARLIER))
            elif isinstance(item, RemoteDelivery):
                remote.append(item)
            else:
                reply = await self._carry_out(item, message, return_path, recipient)
                outcomes.append(_Outcome((item.key,), item.label, reply))
        if remote:
            reply = await self._forward(remote, message, return_path, recipient)
            label = ", ".join(item.label for item in remote)
            outcomes.append(_Outcome(tuple(item.key for item in remote), label, reply))
        return self._conclude(memo_key, address, outcomes)

    async def _carry_out(
        self,
        item: PlannedDelivery,
        message: IMessage,
        return_path: Address | None,
        recipient: Recipient,
    ) -> Reply:
        if isinstance(item, MailboxDelivery):
            return await self._to_mailbox(item, message, return_path)
        if isinstance(item, FileDelivery):
            return await self._to_file(item, message, return_path)
        if isinstance(item, CommandDelivery):
            return await self._to_command(item, message, return_path, recipient)
        assert isinstance(item, FailedTarget)
        return item.reply

    def _conclude(
        self, memo_key: tuple[str, str], address: Address, outcomes: list[_Outcome]
    ) -> Reply:
        """One reply for the address from its targets' (see the module docstring)."""
        if not outcomes:  # an alias whose include file lists nobody, as in Postfix
            return Reply(ReplyCode.MOK, f"{address} expands to no one: nothing to deliver")
        temporary = [o for o in outcomes if o.reply.code.is_temporary]
        permanent = [o for o in outcomes if o.reply.code.is_permanent]
        succeeded = [o for o in outcomes if o.reply.code.is_success]
        if temporary and succeeded:
            keys = frozenset(k for o in succeeded for k in o.keys)
            self._remember(memo_key, keys)
        else:
            self._done.pop(memo_key, None)
        failures = temporary or permanent
        if len(outcomes) == 1 and not failures:
            return outcomes[0].reply
        if not failures:
            labels = ", ".join(o.label for o in succeeded)
            return Reply(ReplyCode.MOK, one_line(f"delivered to {labels}", _TEXT_LIMIT))
        first = failures[0]
        if len(outcomes) == 1:
            return first.reply
        for other in (*temporary, *permanent):
            if other is not first:
                _log.warn(
                    "local delivery to {address}: {target}: {reply}",
                    address=escape(str(address)),
                    target=escape(other.label),
                    reply=escape(str(other.reply)),
                )
        others = f"; delivered to {len(succeeded)} of {len(outcomes)} targets" if succeeded else ""
        text = one_line(f"{first.label}: {first.reply.description}{others}", _TEXT_LIMIT)
        return Reply(first.reply.code, text, first.reply.smtp_code, first.reply.enhanced)

    def _remember(self, memo_key: tuple[str, str], keys: frozenset[str]) -> None:
        self._done[memo_key] = keys | self._done.get(memo_key, frozenset())
        self._done.move_to_end(memo_key)
        while len(self._done) > _MEMO_LIMIT:
            self._done.popitem(last=False)

    # --- mailboxes and files -----------------------------------------------------------

    async def _to_mailbox(
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
        return Reply(ReplyCode.MOK, one_line(f"delivered to {item.address} ({where})", _TEXT_LIMIT))

    def _user_mbox(self, user: LocalUser) -> MboxDelivery:
        return MboxDelivery(
            user.mailbox,
            identity=user.identity,
            create_as_relay=user.identity is not None,
            lock_attempts=self._lock_attempts,
            lock_delay=self._lock_delay,
        )

    async def _to_file(
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
        return Reply(ReplyCode.MOK, one_line(f"delivered to file {where}", _TEXT_LIMIT))

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
            while chunk := await _read(reader):
                converted = transform.feed(chunk)
                pending.append(converted)
                size += len(converted)
                if size >= _FLUSH_SIZE:
                    data, pending, size = b"".join(pending), [], 0
                    await self._in_thread(_write_some, sink, data)
            pending.append(transform.finish(ensure_newline=quote_from))
            return await self._in_thread(_write_last, sink, b"".join(pending))
        except DeliveryError as error:
            await self._in_thread(sink.abort)
            return error.reply
        except BaseException:
            await self._in_thread(sink.abort)
            raise
        finally:
            reader.close()

    # --- commands ----------------------------------------------------------------------

    async def _to_command(
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
                chunk = await _read(reader)
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
                ReplyCode.AGN, one_line(f"cannot run |{item.command}: {error}", _TEXT_LIMIT)
            )
        finally:
            reader.close()
        return reply_for_outcome(item.command, outcome)

    # --- remote addresses --------------------------------------------------------------

    async def _forward(
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
        text = forward_header(str(recipient.address)) + await _read_all(message)
        try:
            queue_id = await queue.store(envelope, text)
        except Exception as error:
            _log.failure("cannot queue the forwarded copy of {queue_id}", queue_id=message.queue_id)
            return Reply(
                ReplyCode.AGN, one_line(f"cannot queue the forwarded copy: {error}", _TEXT_LIMIT)
            )
        shown = ", ".join(str(a) for a in addresses)
        return Reply(ReplyCode.MOK, one_line(f"forwarded to {shown} as {queue_id}", _TEXT_LIMIT))

    async def _the_queue(self) -> IQueue | None:
        """The queue, once open (the spool service may still be opening it)."""
        if self._queue is None or IQueue.providedBy(self._queue):
            return self._queue
        opened: IQueue = await self._queue.when_ready()
        return opened

    # --- the pool ----------------------------------------------------------------------

    def _in_thread(self, function: Callable[..., _T], *args: object) -> Deferred[_T]:
        if self._shutdown_trigger is None:
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._pool.stop
            )
        return deferToThreadPool(self._reactor, self._pool, function, *args)


_EARLIER = Reply(ReplyCode.MOK, "delivered on an earlier attempt")


def build_local_channel(
    config: Config,
    queue: IQueue | QueueSource | None,
    reactor: Any,
    *,
    recipients: LocalRecipients | None = None,
) -> LocalChannel:
    """The local channel for ``config``, forwarding through ``queue``, run by ``reactor``.

    ``queue`` is the open IQueue, or the spool service (anything with ``when_ready()``
    firing with it): remote alias targets are stored there as new messages.

    ``recipients`` lets the caller share one :class:`LocalRecipients` with the SMTP
    gateway (``channel.recipients`` is it otherwise).  Raises
    :class:`relay.aliases.AliasesError` if the aliases file has problems.  When the
    relay runs as root, commands and files named in the aliases file are run and
    written as the file's owner, or ``nobody`` if root owns it (Postfix's rule).
    """
    if recipients is None:
        recipients = build_local_recipients(config)
    aliases_file = config.local.aliases
    alias_identity = None
    if aliases_file is not None and can_switch():
        alias_identity = identity_of_owner(aliases_file)
    return LocalChannel(
        recipients,
        reactor=reactor,
        hostname=config.relay.hostname,
        is_local_domain=local_domain_test(config),
        queue=queue,
        alias_identity=alias_identity,
    )


@implementer(IChannelSession)
class LocalSession:
    """One session of the local channel: MMDF's write-mail calls, text per address."""

    def __init__(self, channel: LocalChannel) -> None:
        self._channel = channel
        self._message: IMessage | None = None
        self._return_path: Address | None = None
        self._delivered_to: frozenset[str] | None = None

    def begin_message(
        self, mode: str, return_path: Address | None, message: IMessage
    ) -> Deferred[None]:
        """``xx_winit``: remember the message; its header block is read at the first address."""
        self._message = message
        self._return_path = return_path
        self._delivered_to = None
        return defer.succeed(None)

    def add_recipient(self, recipient: Recipient) -> Deferred[Reply]:
        """``xx_wadr``: deliver the whole message for this address; ``MOK`` or a failure."""
        if self._message is None:
            return defer.succeed(Reply(ReplyCode.PROT, "add_recipient before begin_message"))
        return defer.ensureDeferred(
            self._channel.deliver(self._message, self._return_path, recipient, self._loop_markers)
        )

    async def _loop_markers(self) -> frozenset[str]:
        """The message's ``Delivered-To`` addresses, read once per message."""
        if self._delivered_to is None:
            assert self._message is not None
            self._delivered_to = await _read_delivered_to(self._message)
        return self._delivered_to

    def end_recipients(self) -> Deferred[None]:
        """``xx_waend``: nothing to do (every address was delivered as it came)."""
        return defer.succeed(None)

    def begin_text(self) -> Deferred[None]:
        """``xx_wtinit``: not used in text-per-address mode; nothing to do."""
        return defer.succeed(None)

    def write_text(self, chunk: bytes) -> Deferred[None]:
        """``xx_wtxt``: not used in text-per-address mode; the chunk is ignored."""
        return defer.succeed(None)

    def end_text(self) -> Deferred[Reply]:
        """``xx_wtend``: not used in this mode; ``NOOP`` says nothing was delivered."""
        return defer.succeed(Reply(ReplyCode.NOOP, "the local channel delivers per address"))

    def abort_message(self) -> Deferred[None]:
        """``xx_wkill``: forget the message."""
        self._message = None
        self._delivered_to = None
        return defer.succeed(None)

    def end_session(self) -> Deferred[None]:
        """``xx_end``: nothing to close."""
        return defer.succeed(None)


# --- helpers -----------------------------------------------------------------------------


async def _read(reader: ITextReader) -> bytes:
    """One chunk of the queued text; a read failure becomes :class:`_UnreadableText`."""
    try:
        chunk: bytes = await reader.read(_READ_SIZE)
    except Exception as error:
        raise _UnreadableText(error) from error
    return chunk


async def _read_all(message: IMessage) -> bytes:
    reader = message.open_text()
    try:
        chunks = []
        while chunk := await _read(reader):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        reader.close()


async def _read_delivered_to(message: IMessage) -> frozenset[str]:
    """Read the start of the text up to the end of its header block (bounded)."""
    reader = message.open_text()
    data = b""
    try:
        while len(data) < _HEADER_LIMIT:
            chunk = await _read(reader)
            if not chunk:
                break
            data += chunk
            if header_block_end(data) != -1:
                break
    finally:
        reader.close()
    return delivered_to_addresses(data[:_HEADER_LIMIT])


def _write_some(sink: _Sink, data: bytes) -> None:
    sink.ensure_open()
    sink.write(data)


def _write_last(sink: _Sink, data: bytes) -> Path:
    sink.ensure_open()
    sink.write(data)
    return sink.commit()


def _read_include(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()

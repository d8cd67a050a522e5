"""The local channel: MMDF's ``lo_wtmail``, mailbox-stuffing in text-per-address mode.

For each address the deliverer hands it, the channel delivers the whole message and
answers ``MOK`` or a failure, inside :meth:`LocalSession.add_recipient`.  Delivering an
address means:

1. reading the message's header block once per message, for its ``Delivered-To``
   lines (the loop detector);
2. expanding the address through the aliases (:func:`.aliases.expand`) into a plan:
   user mailboxes, files, commands, remote addresses, and failures;
3. carrying out each item through :class:`~.targets.LocalTargets`: a Maildir or mbox
   write in the channel's own small thread pool (never in the reactor thread), a command
   through ``reactor.spawnProcess``, and all remote addresses together as one *new*
   message stored in the queue;
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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from relay.address import Address
from relay.channels.local.aliases import (
    CommandDelivery,
    FailedTarget,
    FileDelivery,
    MailboxDelivery,
    PlannedDelivery,
    RemoteDelivery,
    expand,
)
from relay.channels.local.targets import (
    TEXT_LIMIT,
    LocalTargets,
    UnreadableText,
    read_chunk,
)
from relay.channels.local.users import (
    LocalRecipients,
    build_local_recipients,
    local_domain_test,
)
from relay.config import Config
from relay.envelope import Destination, Recipient
from relay.interfaces import (
    IChannel,
    IChannelSession,
    IMessage,
    QueueSource,
    SequencingMode,
)
from relay.mailbox.headers import (
    delivered_to_addresses,
    header_block_end,
)
from relay.mailbox.identity import can_switch, identity_of_owner
from relay.oneline import escape, one_line
from relay.reply import Reply, ReplyCode

__all__ = ["LocalChannel", "LocalSession", "build_local_channel"]

_log = Logger()

_HEADER_LIMIT = 256 * 1024  # how far to look for Delivered-To lines
_MEMO_LIMIT = 10_000


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
        targets: LocalTargets,
        *,
        is_local_domain: Callable[[str], bool],
    ) -> None:
        """``targets`` carries out each planned delivery (and owns the thread pool)."""
        self.recipients = recipients
        self._is_local_domain = is_local_domain
        self.targets = targets
        self._done: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        self.delivered = 0
        self.failed = 0

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: nothing to connect to; a session is ready at once."""
        return defer.succeed(LocalSession(self))

    def close(self) -> Deferred[None]:
        """Stop the targets' thread pool; fire once its threads have ended."""
        return self.targets.close()

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
        except UnreadableText as error:
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
            plan = await self.targets.in_thread(expand, address, context)
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
            reply = await self.targets.forward(remote, message, return_path, recipient)
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
            return await self.targets.mailbox(item, message, return_path)
        if isinstance(item, FileDelivery):
            return await self.targets.file(item, message, return_path)
        if isinstance(item, CommandDelivery):
            return await self.targets.command(item, message, return_path, recipient)
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
            return Reply(ReplyCode.MOK, one_line(f"delivered to {labels}", TEXT_LIMIT))
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
        text = one_line(f"{first.label}: {first.reply.description}{others}", TEXT_LIMIT)
        return Reply(first.reply.code, text, first.reply.smtp_code, first.reply.enhanced)

    def _remember(self, memo_key: tuple[str, str], keys: frozenset[str]) -> None:
        self._done[memo_key] = keys | self._done.get(memo_key, frozenset())
        self._done.move_to_end(memo_key)
        while len(self._done) > _MEMO_LIMIT:
            self._done.popitem(last=False)


_EARLIER = Reply(ReplyCode.MOK, "delivered on an earlier attempt")


def build_local_channel(
    config: Config,
    queue: QueueSource | None,
    reactor: Any,
    *,
    recipients: LocalRecipients | None = None,
) -> LocalChannel:
    """The local channel for ``config``, forwarding through ``queue``, run by ``reactor``.

    ``queue`` is the queue, once open (a :class:`~relay.interfaces.QueueSource`): remote
    alias targets are stored there as new messages (None: they fail temporarily).

    ``recipients`` lets the caller share one :class:`LocalRecipients` with the SMTP
    gateway (``channel.recipients`` is it otherwise).  Raises
    :class:`~.aliases.AliasesError` if the aliases file has problems.  When the relay
    runs as root, commands and files named in the aliases file are run and
    written as the file's owner, or ``nobody`` if root owns it (Postfix's rule).
    """
    if recipients is None:
        recipients = build_local_recipients(config)
    aliases_file = config.local.aliases
    alias_identity = None
    if aliases_file is not None and can_switch():
        alias_identity = identity_of_owner(aliases_file)
    targets = LocalTargets(
        recipients,
        reactor=reactor,
        hostname=config.relay.hostname,
        queue=queue,
        alias_identity=alias_identity,
    )
    return LocalChannel(recipients, targets, is_local_domain=local_domain_test(config))


@implementer(IChannelSession)
class LocalSession:
    """One session of the local channel: MMDF's write-mail calls, text per address."""

    pipelines_addresses = False  # each address is a whole delivery, answered in turn

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


async def _read_delivered_to(message: IMessage) -> frozenset[str]:
    """Read the start of the text up to the end of its header block (bounded)."""
    reader = message.open_text()
    data = b""
    try:
        while len(data) < _HEADER_LIMIT:
            chunk = await read_chunk(reader)
            if not chunk:
                break
            data += chunk
            if header_block_end(data) != -1:
                break
    finally:
        reader.close()
    return delivered_to_addresses(data[:_HEADER_LIMIT])


def _read_include(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()

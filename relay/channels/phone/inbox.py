"""The receiving half of a call: mail from a site, stored through the spool.

Theory of operation
-------------------
A site that proved its secret is treated like an SMTP client that authenticated: each
recipient it proposes gets the answer the gateway would give at RCPT time (the relay's
routes, its local users, the relay rules with ``may_relay`` true), and the message is
stored in the queue exactly as the gateway stores one: a ``Received:`` header, an
envelope with the accepted recipients (routed afresh by this relay), the spool's
``store``, whose Deferred fires only once the message is on disk.  The link's final
"message OK" goes back only after that.

The link's own memory (the ids of messages a site has sent, the text of a message cut
off by a dropped line) is a :class:`relay.phone.filestore.FilePhoneStore` in the spool's
``phone/links`` directory: its commit checks the text against the announced hash and
makes the id durable ("already have it" from then on), keeping the text beside it.  Only
then is the message read from there into the queue, through the channel's read side
(:class:`~relay.channels.phone.held.HeldMessage`, an
:class:`~relay.interfaces.IReadSession`), and the kept copy removed.  A crash between
the two leaves the copy; :meth:`SpoolInbox.recover` stores every such copy at start (a
crash between the queue's store and the removal can duplicate a message, never lose
one).  When the queue refuses the store while the relay runs (a full disk, say), the
sender is told "not now" (its resend will be "already have it") and the copy is stored
again after :data:`STORE_RETRY_MIN` seconds, the delay doubling up to
:data:`STORE_RETRY_MAX`, until the queue takes it: the mail does not wait for a restart.

An id committed before is answered from the link's memory alone
(:func:`~relay.sansio.phone.session.held_acceptance`: "already have it" for the
recipients it stored, a temporary "not held for" for the others), never decided afresh:
a recipient accepted again would bring a second copy.  The sender offers a retry of the
others under a new id (:func:`relay.channels.phone.outbox.link_id`), decided afresh.

Loops: a message whose header already holds ``max_hops`` ``Received:`` lines is refused
for good (:class:`~relay.errors.MessageRefused`), as a gateway refuses one at DATA.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.address import Address
from relay.channels.phone.held import HeldMessage
from relay.envelope import Envelope, Recipient, Submitter
from relay.errors import MessageRefused
from relay.interfaces import IQueue, IReadSession, QueueSource
from relay.phone.filestore import FilePhoneStore
from relay.received import received_header
from relay.reply import Reply, ReplyCode, from_smtp
from relay.sansio.phone.session import Acceptance
from relay.sansio.smtp.wire import SmtpReply

__all__ = ["MAX_HOPS", "STORE_RETRY_MAX", "STORE_RETRY_MIN", "SpoolInbox", "count_hops"]

STORE_RETRY_MIN: Final = 5.0
"""Seconds before a committed message the queue could not store is stored again."""
STORE_RETRY_MAX: Final = 600.0
"""The longest wait between two such tries."""
MAX_HOPS: Final = 50
"""``Received:`` lines after which a message is taken to loop (Postfix's hopcount_limit)."""
_AOK: Final = Reply(ReplyCode.AOK)

_log = Logger()


def count_hops(text: bytes) -> int:
    """How many ``Received:`` header lines the header section of ``text`` holds."""
    end = text.find(b"\r\n\r\n")
    header = text if end < 0 else text[: end + 2]
    return sum(1 for line in header.split(b"\r\n") if line[:9].lower() == b"received:")


class SpoolInbox:
    """Accepts and stores what sites send (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        queue: QueueSource,
        decide: Callable[[Address], SmtpReply],
        reactor: Any,
        *,
        hostname: str,
        max_message_size: Callable[[str], int | None],
        max_hops: int = MAX_HOPS,
        clock: IReactorTime | None = None,
    ) -> None:
        """``decide`` answers a recipient as the gateway would for an authenticated
        client; ``max_message_size(site)`` is the limit for a site (None: none);
        ``clock`` times the retries of failed stores (default: ``reactor``)."""
        self._clock: IReactorTime = reactor if clock is None else clock
        self._retries: dict[tuple[str, str], IDelayedCall] = {}
        self.root = root
        self._links = FilePhoneStore(root, reactor)
        self._queue = queue
        self._decide = decide
        self._reactor = reactor
        self._hostname = hostname
        self._max_size = max_message_size
        self._max_hops = max_hops

    def accept(
        self, site: str, message_id: str, envelope: Envelope, size: int
    ) -> Deferred[Acceptance]:
        """Already held, too big, or a reply per recipient and the offset held."""
        limit = self._max_size(site)
        if limit is not None and size > limit:
            return succeed(
                Acceptance(whole=Reply(ReplyCode.FSIZ, f"over the limit of {limit} bytes"))
            )
        replies = tuple(self._answer(r.address) for r in envelope.recipients)
        d = self._links.accept(site, message_id, envelope, size)

        def decided(held: Acceptance) -> Acceptance:
            if held.whole is not None or any(r.code is not ReplyCode.AOK for r in held.replies):
                return held  # committed before: answered from memory, never accepted again
            return Acceptance(replies, held.offset)

        return d.addCallback(decided)

    def _answer(self, address: Address) -> Reply:
        reply = self._decide(address)
        if 200 <= reply.code < 300:
            return _AOK
        return from_smtp(reply.code, " ".join(reply.lines), reply.enhanced)

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        """Keep a piece of the text (unsynced until asked for the offset or committed)."""
        return self._links.write_text(site, message_id, offset, data)

    def commit(
        self, site: str, message_id: str, envelope: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        """Check the hash, remember the id, store in the queue; fire with the queue id."""
        d = self._links.commit(site, message_id, envelope, size, digest)
        return d.addCallback(lambda _: self._store_or_retry(site, message_id, envelope))

    def _store_or_retry(self, site: str, message_id: str, envelope: Envelope) -> Deferred[str]:
        """Store a committed message in the queue; if the queue fails, try again later
        (and pass the failure on)."""
        d = ensureDeferred(self._store(site, message_id, envelope))

        def failed(failure: Failure) -> Failure:
            if not isinstance(failure.value, (MessageRefused, FileNotFoundError)):
                self._retry_later(site, message_id, envelope, STORE_RETRY_MIN)
            return failure

        return d.addErrback(failed)

    def _retry_later(self, site: str, message_id: str, envelope: Envelope, delay: float) -> None:
        key = (site, message_id)
        if key in self._retries:
            return
        _log.warn(
            "phone: message {id} from {site} not stored in the queue; trying again in"
            " {delay:.0f} s",
            id=message_id,
            site=site,
            delay=delay,
        )
        self._retries[key] = self._clock.callLater(
            delay, self._retry, site, message_id, envelope, delay
        )

    def _retry(self, site: str, message_id: str, envelope: Envelope, delay: float) -> None:
        del self._retries[site, message_id]
        d = ensureDeferred(self._store(site, message_id, envelope))

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, (MessageRefused, FileNotFoundError)):
                return  # refused for good, or stored meanwhile: nothing left to store
            _log.failure("phone: cannot store {id} from {site}", failure, id=message_id, site=site)
            later = min(delay * 2.0, STORE_RETRY_MAX)
            self._retry_later(site, message_id, envelope, later)

        d.addErrback(failed)

    def stop_retries(self) -> None:
        """Cancel the stores waiting to be tried again (the next start recovers them)."""
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()

    async def _store(self, site: str, message_id: str, envelope: Envelope) -> str:
        path = self.root / site / "in" / "mail" / f"{message_id}.text"
        return await self._submit(site, HeldMessage(path, envelope, self._reactor), envelope)

    async def _submit(self, site: str, held: IReadSession, envelope: Envelope) -> str:
        """Read one message from the channel's read side into the queue (MMDF's fitting
        of a channel to ``submit``); ``envelope`` gives what the contract does not carry
        (body type, SMTPUTF8, ENVID)."""
        queue: IQueue = await self._queue.when_ready()
        head = await held.next_message()
        if head is None:
            raise RuntimeError("the read session has no message")
        _, return_path = head
        recipients = []
        while (recipient := await held.next_recipient()) is not None:
            recipients.append(Recipient(recipient.address, None, recipient.original))
            await held.answer_recipient(_AOK)  # the site was answered when it proposed
        await held.begin_text()
        chunks = []
        while chunk := await held.read_text():
            chunks.append(chunk)
        text = b"".join(chunks)
        if count_hops(text) >= self._max_hops:
            await held.abort_message()
            raise MessageRefused(
                Reply(ReplyCode.NDEL, "too many hops: a mail loop", enhanced="5.4.6")
            )
        now = self._reactor.seconds()
        header = received_header(
            helo=site,
            client_ip=None,
            client_name=site,
            hostname=self._hostname,
            protocol="phone",
            when=now,
            auth_user=site,
        )
        fresh = Envelope(
            return_path,
            tuple(recipients),
            now,
            Submitter("phone", client_name=site, helo=site, auth_user=site),
            envelope.body_type,
            envelope.smtputf8,
            envelope.env_id,
        )
        try:
            queue_id: str = await queue.store(fresh, header + text)
        except Exception:
            await held.answer_message(Reply(ReplyCode.FSPC, "cannot store the message now"))
            raise
        await held.answer_message(Reply(ReplyCode.OK))
        _log.info(
            "phone: message from {site} stored as {queue_id}: from={sender} nrcpt={count}",
            site=site,
            queue_id=queue_id,
            sender=fresh.sender_text,
            count=len(fresh.recipients),
        )
        return queue_id

    def forget(self, before: float) -> Deferred[int]:
        """Forget the ids committed before ``before`` (:meth:`FilePhoneStore.forget`)."""
        return self._links.forget(before)

    def recover(self) -> Deferred[int]:
        """Store what a crash left between the link's commit and the queue; fire with
        how many messages that was."""
        return ensureDeferred(self._recover())

    async def _recover(self) -> int:
        found: list[tuple[str, str, Envelope]] = await self._in_thread(_left_behind, self.root)
        for site, message_id, envelope in found:
            try:
                await self._store_or_retry(site, message_id, envelope)
            except Exception:
                _log.failure("phone: cannot recover {id} from {site}", id=message_id, site=site)
        return len(found)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)


def _left_behind(root: Path) -> list[tuple[str, str, Envelope]]:
    """(site, id, envelope) of each committed message whose text is still kept."""
    found: list[tuple[str, str, Envelope]] = []
    if not root.is_dir():
        return found
    for site_dir in sorted(root.iterdir()):
        mail = site_dir / "in" / "mail"
        if not mail.is_dir():
            continue
        for text_path in sorted(mail.glob("*.text")):
            message_id = text_path.name[: -len(".text")]
            env_path = mail / f"{message_id}.env"
            if env_path.exists():
                envelope = Envelope.from_dict(json.loads(env_path.read_bytes()))
                found.append((site_dir.name, message_id, envelope))
    return found

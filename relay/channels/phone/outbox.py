"""The sending half of a call: the mail queued for a site, read from the spool and settled
through the deliverer's recorder.

Theory of operation
-------------------
The link announces a call's whole inventory before any text flows (so the peer spends
no round trip asking), so the mail for a site cannot be handed over one transaction at
a time while the call runs: when the site has proven itself, :meth:`SpoolOutbox.outgoing`
takes every recipient routed to ``phone:SITE`` that is not final nor held, whether due
or resting, claims them the way the deliverer's scan does (so the deliverer leaves them
alone while the call has them), and offers each message once with those recipients.

The message id on the link is the queue id, a dot, and a digest of the recipients
offered (:func:`link_id`).  The receiver remembers an id it has committed with the answer
it gave each recipient, and answers a re-proposal of that id from memory, so:

* a resend after a drop offers the same recipients (every one offered was released
  with a temporary reply), hence the same id, and is recognised: each copy is stored
  exactly once;
* a retry of the recipients a call refused *for now* (its final reply arrived, the
  others were delivered or bounced) offers fewer recipients, hence a new id, and gets
  a fresh answer instead of the remembered refusal until the message expires.

The text is read from the spool in order
(one reader per message, kept while its text flows; a resend from an earlier offset
opens a fresh one).  Each :meth:`settle` hands the receiver's replies to the deliverer's
:class:`~relay.deliver.recorder.Recorder` as one attempt: delivered recipients are
committed, permanent failures bounce with a DSN, temporary ones are deferred, and the
delay warning and the lifetime limit apply as for any channel.  :meth:`release` ends a
call: what that call offered and did not settle is recorded as a temporary failure (the line
went before the receiver answered: sent again next call, never lost; the receiver's
memory of ids makes a resend of something it had stored an "already have it").

Offers are kept per call (``call``, any hashable token the caller picks, one per call),
not per site: a site may call in while we call it, and each call releases and settles
only what it offered itself.  The deliverer's claims keep a recipient in one call at a
time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from relay.address import Address
from relay.deliver.recorder import Recorder
from relay.deliver.work import Attempted, Claims, MessageWork
from relay.envelope import Destination, Envelope, RecipientState
from relay.interfaces import IQueue, ITextReader, QueueSource
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.session import Outgoing

__all__ = ["PHONE_CHANNEL", "Deliverer", "SpoolOutbox", "link_id"]

PHONE_CHANNEL: Final = "phone"
_READ_BLOCK: Final = 65536
_ID_DIGEST: Final = 16  # hex digits of the recipients' digest in a link id
_CUT_OFF: Final = Reply(ReplyCode.AGN, "the call ended before the site answered")

_log = Logger()


class Deliverer(Protocol):
    """What the outbox uses of the deliverer: its claims and (once open) its recorder."""

    @property
    def claims(self) -> Claims: ...
    @property
    def recorder(self) -> Recorder | None: ...


def link_id(queue_id: str, envelope: Envelope, indices: Sequence[int]) -> str:
    """The id a message goes by on the link when ``indices`` are its recipients offered."""
    hasher = hashlib.sha256()
    for index in indices:
        address = envelope.recipients[index].address.smtp_path()
        hasher.update(f"{index}:{address}\n".encode("utf-8", "surrogateescape"))
    return f"{queue_id}.{hasher.hexdigest()[:_ID_DIGEST]}"


@dataclass(eq=False)
class _Offered:
    work: MessageWork
    indices: tuple[int, ...]
    reader: ITextReader | None = None
    position: int = 0
    chunks: list[bytes] = field(default_factory=list)


class SpoolOutbox:
    """What a site gets in a call, from the spool (see the module docstring)."""

    def __init__(
        self,
        queue: QueueSource,
        deliverer: Deliverer,
        route: Callable[[Address], Destination],
    ) -> None:
        """``queue`` is the spool, once it is open; ``deliverer`` the deliverer whose claims
        and recorder a call shares; ``route`` routes a recipient the deliverer has not
        routed yet."""
        self._queue = queue
        self._deliverer = deliverer
        self._route = route
        self._offered: dict[tuple[Hashable, str, str], _Offered] = {}  # (call, site, id)

    def outgoing(self, site: str, call: Hashable = None) -> Deferred[Sequence[Outgoing]]:
        """Claim and describe every message with recipients for ``site``, oldest first,
        as offered in ``call``."""
        return ensureDeferred(self._outgoing(site, call))

    async def _outgoing(self, site: str, call: Hashable) -> list[Outgoing]:
        queue: IQueue = await self._queue.when_ready()
        if self._deliverer.recorder is None:  # the deliverer is not running
            return []
        claims = self._deliverer.claims
        offers = []
        offered_now = {o.work.queue_id for (_, s, _), o in self._offered.items() if s == site}
        for queue_id in await queue.list_messages():
            if queue_id in offered_now:
                continue
            selected = await self._select(queue, queue_id, site, claim=True)
            if selected is None:
                continue
            work, indices = selected
            try:
                size, digest = await _digest(queue.open_message(queue_id).open_text())
            except Exception:
                _log.failure(
                    "phone: cannot read {queue_id} for {site}", queue_id=queue_id, site=site
                )
                claims.end(work)
                continue
            envelope = work.envelope.with_recipients(
                tuple(work.envelope.recipients[i] for i in indices)
            )
            message_id = link_id(queue_id, work.envelope, indices)
            self._offered[call, site, message_id] = _Offered(work, indices)
            offers.append(Outgoing(message_id, envelope, size, digest))
        return offers

    async def _select(
        self, queue: IQueue, queue_id: str, site: str, *, claim: bool
    ) -> tuple[MessageWork, tuple[int, ...]] | None:
        """The message's recipients for ``site`` not final, not held, not claimed."""
        try:
            envelope, statuses = await queue.load(queue_id)
        except Exception:
            return None  # removed since it was listed
        wanted = Destination(PHONE_CHANNEL, site)
        indices = []
        for index, (recipient, status) in enumerate(
            zip(envelope.recipients, statuses, strict=True)
        ):
            if status.state.is_final or status.state is RecipientState.HELD:
                continue
            if self._deliverer.claims.owner((queue_id, index)) is not None:
                continue
            where = recipient.destination
            if where is None:
                try:
                    where = self._route(recipient.address)
                except Exception:
                    continue  # the deliverer fails it with the router's reason
            if where == wanted:
                indices.append(index)
        if not indices:
            return None
        work = MessageWork(queue_id, envelope, list(statuses))
        if claim:
            claims = self._deliverer.claims
            claims.begin(work)
            for index in indices:
                claims.claim(work, index)
            work.routes.update({i: wanted for i in indices})
        return work, tuple(indices)

    def read_text(
        self, site: str, message_id: str, offset: int, max_bytes: int, call: Hashable = None
    ) -> Deferred[bytes]:
        """Up to ``max_bytes`` of the text of a message ``call`` offered, from ``offset``."""
        return ensureDeferred(self._read_text((call, site, message_id), offset, max_bytes))

    async def _read_text(
        self, key: tuple[Hashable, str, str], offset: int, max_bytes: int
    ) -> bytes:
        offered = self._offered[key]  # a KeyError fails the Deferred: not offered in this call
        queue: IQueue = await self._queue.when_ready()
        if offered.reader is None or offset < offered.position:
            if offered.reader is not None:
                offered.reader.close()
            offered.reader = queue.open_message(offered.work.queue_id).open_text()
            offered.position = 0
            offered.chunks.clear()
        pending = b"".join(offered.chunks)
        offered.chunks.clear()
        # skip to the offset (a resumed message starts past its first byte)
        while offered.position + len(pending) < offset + max_bytes:
            block = await offered.reader.read(_READ_BLOCK)
            if not block:
                break
            pending += block
        start = offset - offered.position
        if start < 0 or start > len(pending):
            raise ValueError(f"{offered.work.queue_id}: offset {offset} is beyond the text")
        data = pending[start : start + max_bytes]
        rest = pending[start + len(data) :]
        offered.position = offset + len(data)
        if rest:
            offered.chunks.append(rest)
        return data

    def settle(
        self, site: str, message_id: str, replies: Sequence[Reply], call: Hashable = None
    ) -> Deferred[None]:
        """Record the receiver's reply for each recipient ``call`` offered (one attempt)."""
        offered = self._offered.pop((call, site, message_id), None)
        if offered is None:
            return succeed(None)
        self._record(offered, list(replies))
        return succeed(None)

    def release(self, site: str, call: Hashable = None) -> int:
        """``call`` is over: what it offered ``site`` and did not settle stays queued (a
        temporary failure is recorded).  Returns how many messages that was."""
        left = [key for key in self._offered if key[:2] == (call, site)]
        for key in left:
            offered = self._offered.pop(key)
            self._record(offered, [_CUT_OFF] * len(offered.indices))
        return len(left)

    def _record(self, offered: _Offered, replies: list[Reply]) -> None:
        if offered.reader is not None:
            offered.reader.close()
            offered.reader = None
        recorder = self._deliverer.recorder
        assert recorder is not None
        destination = Destination(PHONE_CHANNEL, "")
        outcomes = {
            index: Attempted(reply, offered.work.routes.get(index, destination))
            for index, reply in zip(offered.indices, replies, strict=True)
        }
        recorder.record(offered.work, offered.indices, outcomes)


async def _digest(reader: ITextReader) -> tuple[int, bytes]:
    """The size and SHA-256 of a text, read in blocks."""
    hasher = hashlib.sha256()
    size = 0
    try:
        while block := await reader.read(_READ_BLOCK):
            hasher.update(block)
            size += len(block)
    finally:
        reader.close()
    return size, hasher.digest()

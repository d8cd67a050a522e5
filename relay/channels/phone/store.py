"""The relay's phone store: the link's :class:`~relay.interfaces.IPhoneStore` over the spool.

Sending is :class:`~relay.channels.phone.outbox.SpoolOutbox` (the queue's mail for the
site, settled through the deliverer's recorder); receiving is
:class:`~relay.channels.phone.inbox.SpoolInbox` (the gateway's checks, the queue's
store, the link's durable memory of ids and partial texts in the spool's directory).
Each call has its own view (:meth:`SpoolPhoneStore.for_call`), so that what a call
offered is settled and released by that call alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.channels.phone.inbox import SpoolInbox
from relay.channels.phone.outbox import SpoolOutbox
from relay.envelope import Envelope
from relay.interfaces import IPhoneStore
from relay.reply import Reply
from relay.sansio.phone.session import Acceptance, Outgoing

__all__ = ["SpoolPhoneStore"]


@implementer(IPhoneStore)
class SpoolPhoneStore:
    """Both halves of a call's storage, over the spool."""

    def __init__(self, outbox: SpoolOutbox, inbox: SpoolInbox, call: Hashable = None) -> None:
        self.outbox = outbox
        self.inbox = inbox
        self.call = call

    def for_call(self) -> SpoolPhoneStore:
        """The store as one new call sees it (its offers its own)."""
        return SpoolPhoneStore(self.outbox, self.inbox, object())

    def release(self, site: str) -> int:
        """This call is over: what it offered ``site`` and did not settle stays queued."""
        return self.outbox.release(site, self.call)

    def outgoing(self, site: str) -> Deferred[Sequence[Outgoing]]:
        return self.outbox.outgoing(site, self.call)

    def read_text(self, site: str, message_id: str, offset: int, max_bytes: int) -> Deferred[bytes]:
        return self.outbox.read_text(site, message_id, offset, max_bytes, self.call)

    def settle(self, site: str, message_id: str, replies: Sequence[Reply]) -> Deferred[None]:
        return self.outbox.settle(site, message_id, replies, self.call)

    def accept(
        self, site: str, message_id: str, envelope: Envelope, size: int
    ) -> Deferred[Acceptance]:
        return self.inbox.accept(site, message_id, envelope, size)

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        return self.inbox.write_text(site, message_id, offset, data)

    def commit(
        self, site: str, message_id: str, envelope: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        return self.inbox.commit(site, message_id, envelope, size, digest)

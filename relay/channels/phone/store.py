"""The relay's phone store: the link's :class:`~relay.interfaces.IPhoneStore` over the spool.

Sending is :class:`~relay.channels.phone.outbox.SpoolOutbox` (the queue's mail for the
site, settled through the deliverer's recorder); receiving is
:class:`~relay.channels.phone.inbox.SpoolInbox` (the gateway's checks, the queue's
store, the link's durable memory of ids and partial texts in the spool's directory).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def __init__(self, outbox: SpoolOutbox, inbox: SpoolInbox) -> None:
        self.outbox = outbox
        self.inbox = inbox

    def outgoing(self, site: str) -> Deferred[Sequence[Outgoing]]:
        return self.outbox.outgoing(site)

    def read_text(self, site: str, message_id: str, offset: int, max_bytes: int) -> Deferred[bytes]:
        return self.outbox.read_text(site, message_id, offset, max_bytes)

    def settle(self, site: str, message_id: str, replies: Sequence[Reply]) -> Deferred[None]:
        return self.outbox.settle(site, message_id, replies)

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

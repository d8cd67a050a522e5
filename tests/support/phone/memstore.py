"""An in-memory IPhoneStore whose Deferreds fire at once, for the session's tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from relay.envelope import Envelope
from relay.errors import DigestMismatch
from relay.interfaces import IPhoneStore
from relay.phone.filestore import still_to_do
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.session import Acceptance, Outgoing, held_acceptance


@dataclass
class MemoryPhoneStore:
    """Mail held for sites (``outbox``), received from them (``inbox``), and partial text."""

    outbox: dict[str, dict[str, tuple[Envelope, bytes]]] = field(default_factory=dict)
    inbox: dict[str, dict[str, tuple[Envelope, bytes]]] = field(default_factory=dict)
    partial: dict[tuple[str, str], bytearray] = field(default_factory=dict)
    commits: list[tuple[str, str]] = field(default_factory=list)
    settled: list[tuple[str, str, tuple[Reply, ...]]] = field(default_factory=list)
    refuse_user: str | None = None  # a local part answered "unknown user"
    answered: dict[tuple[str, str], dict[str, Reply]] = field(default_factory=dict)
    """The reply accept gave each recipient, by site and id (kept with the commit)."""

    def put(self, site: str, message_id: str, envelope: Envelope, text: bytes) -> None:
        self.outbox.setdefault(site, {})[message_id] = (envelope, text)

    def outgoing(self, site: str) -> Deferred[Sequence[Outgoing]]:
        held = self.outbox.get(site, {})
        return succeed(
            [
                Outgoing(mid, env, len(text), hashlib.sha256(text).digest())
                for mid, (env, text) in held.items()
            ]
        )

    def read_text(self, site: str, message_id: str, offset: int, max_bytes: int) -> Deferred[bytes]:
        _, text = self.outbox[site][message_id]
        return succeed(text[offset : offset + max_bytes])

    def settle(self, site: str, message_id: str, replies: Sequence[Reply]) -> Deferred[None]:
        self.settled.append((site, message_id, tuple(replies)))
        envelope, text = self.outbox[site][message_id]
        left = still_to_do(envelope, replies)
        if left is None:
            del self.outbox[site][message_id]
        else:
            self.outbox[site][message_id] = (left, text)
        return succeed(None)

    def accept(
        self, site: str, message_id: str, envelope: Envelope, size: int
    ) -> Deferred[Acceptance]:
        if message_id in self.inbox.get(site, {}):
            held, _ = self.inbox[site][message_id]
            every = {r.address.smtp_path(): Reply(ReplyCode.AOK) for r in held.recipients}
            answered = self.answered.get((site, message_id), every)
            return succeed(held_acceptance(envelope, answered))
        replies = tuple(
            Reply(ReplyCode.USER)
            if r.address.local_part == self.refuse_user
            else Reply(ReplyCode.AOK)
            for r in envelope.recipients
        )
        self.answered[site, message_id] = {
            r.address.smtp_path(): reply
            for r, reply in zip(envelope.recipients, replies, strict=True)
        }
        held = self.partial.get((site, message_id), b"")
        return succeed(Acceptance(replies, len(held) if len(held) <= size else 0))

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        held = self.partial.setdefault((site, message_id), bytearray())
        del held[offset:]
        assert len(held) == offset, "pieces come in order from the offset named"
        held += data
        return succeed(None)

    def commit(
        self, site: str, message_id: str, envelope: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        text = bytes(self.partial.pop((site, message_id), b""))
        if len(text) != size or hashlib.sha256(text).digest() != digest:
            return fail(DigestMismatch(message_id))
        self.inbox.setdefault(site, {})[message_id] = (envelope, text)
        self.commits.append((site, message_id))
        return succeed(f"{site}/{message_id}")


implementer(IPhoneStore)(MemoryPhoneStore)

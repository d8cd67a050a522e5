"""What the local channel's tests share: a complete in-memory IQueue, configs, messages.

``MemQueue`` is a small but complete :class:`relay.interfaces.IQueue` (no durability:
it is a stand-in for the spool where a test only needs the contract); the tests at the
end of this file pin that it behaves by the contract, so the channel tests that use it
test the channel, not a broken fake.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.address import Address, parse_forward_path, parse_reverse_path
from relay.channels.local import (
    LocalChannel,
    LocalSession,
    build_local_channel,
)
from relay.config import Config, parse_config
from relay.envelope import (
    Destination,
    Envelope,
    Recipient,
    RecipientState,
    RecipientStatus,
    Submitter,
)
from relay.interfaces import IMessage, IQueue
from relay.local_users import local_domain_test
from relay.reply import Reply

from fakes import BytesMessage

__all__ = [
    "MemQueue",
    "deliver",
    "make_config",
    "make_message",
    "recipient",
    "shared_directory",
]


@implementer(IQueue)
class MemQueue:
    """The queue's contract in memory: per-recipient states, due times, listeners."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self._messages: dict[str, tuple[Envelope, bytes, list[RecipientStatus]]] = {}
        self._listeners: list[Any] = []
        self._next = 0
        self.fail_with: Exception | None = None

    def store(self, envelope: Envelope, text: bytes) -> Deferred[str]:
        """Keep the message; every recipient pending."""
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        self._next += 1
        queue_id = f"M{self._next:06d}"
        statuses = [RecipientStatus() for _ in envelope.recipients]
        self._messages[queue_id] = (envelope, text, statuses)
        self._notify()
        return defer.succeed(queue_id)

    def load(self, queue_id: str) -> Deferred[tuple[Envelope, Sequence[RecipientStatus]]]:
        """The envelope and states of a stored message."""
        if queue_id not in self._messages:
            return defer.fail(KeyError(queue_id))
        envelope, _, statuses = self._messages[queue_id]
        return defer.succeed((envelope, tuple(statuses)))

    def text(self, queue_id: str) -> bytes:
        """The stored text (for assertions)."""
        return self._messages[queue_id][1]

    def open_message(self, queue_id: str) -> IMessage:
        """The message as a channel sees it."""
        envelope, text, _ = self._messages[queue_id]
        return BytesMessage(queue_id, envelope, text)

    def update(self, queue_id: str, changes: Mapping[int, RecipientStatus]) -> Deferred[None]:
        """Record new states; drop the message once every recipient is final."""
        if queue_id not in self._messages:
            return defer.fail(KeyError(queue_id))
        statuses = self._messages[queue_id][2]
        for index, status in changes.items():
            statuses[index] = status
        if all(s.state.is_final for s in statuses):
            del self._messages[queue_id]
        return defer.succeed(None)

    def list_messages(self) -> Deferred[Sequence[str]]:
        """Ids, oldest first (ids sort by arrival)."""
        return defer.succeed(sorted(self._messages))

    def _due(self, now: float) -> list[tuple[str, int]]:
        due = []
        for queue_id in sorted(self._messages):
            for index, status in enumerate(self._messages[queue_id][2]):
                if status.state is RecipientState.PENDING or (
                    status.state is RecipientState.DEFERRED and (status.next_attempt or 0.0) <= now
                ):
                    due.append((queue_id, index))
        return due

    def due(self, now: float) -> Deferred[Iterable[tuple[str, int]]]:
        """Pending recipients, and deferred ones whose time has come."""
        return defer.succeed(self._due(now))

    def next_due_time(self) -> float | None:
        """The earliest next attempt of a deferred recipient."""
        times = [
            s.next_attempt
            for _, _, statuses in self._messages.values()
            for s in statuses
            if s.state is RecipientState.DEFERRED and s.next_attempt is not None
        ]
        return min(times, default=None)

    def due_by_destination(
        self, now: float
    ) -> Deferred[Mapping[Destination | None, Sequence[tuple[str, int]]]]:
        """:meth:`due`, grouped by the recipients' destinations."""
        grouped: dict[Destination | None, list[tuple[str, int]]] = {}
        for queue_id, index in self._due(now):
            destination = self._messages[queue_id][0].recipients[index].destination
            grouped.setdefault(destination, []).append((queue_id, index))
        return defer.succeed(grouped)

    def add_listener(self, callback: object) -> None:
        """Call ``callback()`` when mail is stored."""
        self._listeners.append(callback)

    def remove_listener(self, callback: object) -> None:
        """Stop calling it."""
        self._listeners.remove(callback)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def remove(self, queue_id: str) -> Deferred[None]:
        """Delete a message."""
        if self._messages.pop(queue_id, None) is None:
            return defer.fail(KeyError(queue_id))
        return defer.succeed(None)

    def _change(self, queue_id: str, change: Any) -> int:
        statuses = self._messages[queue_id][2]
        changed = 0
        for index, status in enumerate(statuses):
            new = change(status)
            if new != status:
                statuses[index] = new
                changed += 1
        return changed

    def hold(self, queue_id: str) -> Deferred[int]:
        """Hold every recipient not yet final."""
        return defer.succeed(
            self._change(
                queue_id,
                lambda s: s if s.state.is_final else replace(s, state=RecipientState.HELD),
            )
        )

    def release(self, queue_id: str) -> Deferred[int]:
        """Held recipients become deferred until their next attempt (or pending)."""

        def released(status: RecipientStatus) -> RecipientStatus:
            if status.state is not RecipientState.HELD:
                return status
            if status.next_attempt is None:
                return replace(status, state=RecipientState.PENDING)
            return replace(status, state=RecipientState.DEFERRED)

        return defer.succeed(self._change(queue_id, released))

    def flush_message(self, queue_id: str, channel: str | None = None) -> Deferred[int]:
        """Deferred recipients (on ``channel``) become due now."""
        if queue_id not in self._messages:
            return defer.fail(KeyError(queue_id))
        envelope = self._messages[queue_id][0]
        statuses = self._messages[queue_id][2]
        changed = 0
        for index, status in enumerate(statuses):
            destination = envelope.recipients[index].destination
            on_channel = channel is None or (destination and destination.channel == channel)
            if status.state is RecipientState.DEFERRED and on_channel:
                statuses[index] = replace(status, next_attempt=self.now)
                changed += 1
        return defer.succeed(changed)

    def flush(
        self, queue_ids: Iterable[str] | None = None, channel: str | None = None
    ) -> Deferred[int]:
        """:meth:`flush_message` for each message."""
        total = 0
        for queue_id in list(queue_ids if queue_ids is not None else self._messages):
            if queue_id in self._messages:
                total += self.flush_message(queue_id, channel).result
        return defer.succeed(total)


# --------------------------------------------------------------------------- helpers


def make_config(
    base: Path, local: str = "", *, aliases: str | None = None, extra: str = ""
) -> Config:
    """A configuration rooted at ``base``: local domain example.test, ``[local]`` as given.

    ``aliases`` is written to ``base/aliases`` and named in the configuration.
    """
    if aliases is not None:
        (base / "aliases").write_text(aliases)
        local += '\naliases = "aliases"'
    text = (
        '[relay]\nhostname = "mx.example.test"\n'
        'local_domains = ["example.test", "other.example.test"]\n'
        f"[local]\n{local}\n{extra}"
    )
    return parse_config(text, base)


def recipient(text: str, original: str | None = None) -> Recipient:
    """A recipient for ``local@domain``."""
    return Recipient(
        parse_forward_path(f"<{text}>", smtputf8=True), Destination("local", ""), original
    )


def make_message(
    text: bytes = b"Subject: test\r\n\r\nHello.\r\n",
    *,
    sender: str | None = "sender@remote.test",
    to: Sequence[str] = ("alice@example.test",),
    queue_id: str = "Q1",
) -> BytesMessage:
    """A queued message in memory."""
    envelope = Envelope(
        return_path=None if sender is None else parse_reverse_path(f"<{sender}>", smtputf8=True),
        recipients=tuple(recipient(t) for t in to),
        arrival=1_000_000.0,
        submitter=Submitter("ESMTP", "192.0.2.1"),
    )
    return BytesMessage(queue_id, envelope, text)


async def deliver(channel: LocalChannel, message: BytesMessage, *addresses: str) -> list[Reply]:
    """Drive one message through a session as the deliverer does in text-per-address mode."""
    session = await channel.open_session(Destination("local", ""))
    assert isinstance(session, LocalSession)
    await session.begin_message("m", message.envelope.return_path, message)
    replies = [await session.add_recipient(recipient(a)) for a in addresses]
    await session.end_recipients()
    await session.end_session()
    return replies


@contextmanager
def shared_directory() -> Iterator[Path]:
    """A world-writable directory outside pytest's private (0700) tree.

    Commands and files named in a root-owned aliases file run as ``nobody``; they need
    a place ``nobody`` can write.
    """
    with tempfile.TemporaryDirectory(prefix="relay-local-") as name:
        Path(name).chmod(0o1777)
        yield Path(name)


def channel_for(config: Config, queue: IQueue | None = None, **options: Any) -> LocalChannel:
    """The channel ``build_local_channel`` makes, remade with ``options`` if any."""
    from twisted.internet import reactor

    built = build_local_channel(config, queue, reactor)
    if not options:
        return built
    options.setdefault("alias_identity", built.alias_identity)
    return LocalChannel(
        built.recipients,
        reactor=reactor,
        hostname=config.relay.hostname,
        is_local_domain=local_domain_test(config),
        queue=queue,
        **options,
    )


def address(text: str) -> Address:
    """``local@domain`` parsed."""
    return parse_forward_path(f"<{text}>", smtputf8=True)


# --------------------------------------------------------------------------- its tests


def test_memqueue_provides_iqueue() -> None:
    """The in-memory queue verifies against IQueue."""
    assert verifyObject(IQueue, MemQueue())


def test_memqueue_stores_and_finishes_messages() -> None:
    """Stored messages are pending and due; once every recipient is final they are gone."""
    queue = MemQueue()
    seen: list[int] = []
    queue.add_listener(lambda: seen.append(1))
    message = make_message(to=("a@example.test", "b@example.test"))
    queue_id = queue.store(message.envelope, message.text).result
    assert seen == [1]
    assert list(queue.due(queue.now).result) == [(queue_id, 0), (queue_id, 1)]
    done = RecipientStatus(RecipientState.DELIVERED, 1)
    later = RecipientStatus(RecipientState.DEFERRED, 1, next_attempt=queue.now + 60)
    queue.update(queue_id, {0: done, 1: later})
    assert list(queue.due(queue.now).result) == []
    assert queue.next_due_time() == queue.now + 60
    assert queue.flush().result == 1
    assert list(queue.due(queue.now).result) == [(queue_id, 1)]
    queue.update(queue_id, {1: done})
    assert queue.list_messages().result == []


def test_memqueue_holds_and_releases() -> None:
    """Held recipients are never due until released."""
    queue = MemQueue()
    message = make_message()
    queue_id = queue.store(message.envelope, message.text).result
    assert queue.hold(queue_id).result == 1
    assert list(queue.due(queue.now).result) == []
    assert queue.release(queue_id).result == 1
    assert list(queue.due(queue.now).result) == [(queue_id, 0)]
    assert isinstance(queue.open_message(queue_id), BytesMessage)
    queue.remove(queue_id)
    failures: list[Any] = []
    queue.load(queue_id).addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(KeyError)

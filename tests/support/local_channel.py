"""What the local channel's tests share: configs, messages, a channel to deliver through.

Where a test needs a queue without the disk, it uses :class:`memqueue.MemoryQueue`,
the in-memory IQueue the deliverer's tests use too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relay.address import Address, parse_forward_path, parse_reverse_path
from relay.channels.local import (
    LocalChannel,
    LocalSession,
    build_local_channel,
)
from relay.channels.local.targets import LocalTargets
from relay.channels.local.users import local_domain_test
from relay.config import Config, parse_config
from relay.envelope import (
    Destination,
    Envelope,
    Recipient,
    Submitter,
)
from relay.interfaces import IQueue
from relay.queue.ready import QueueReady
from relay.reply import Reply

from support.fakes import BytesMessage

__all__ = [
    "deliver",
    "make_config",
    "make_message",
    "recipient",
    "shared_directory",
]


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


def channel_for(
    config: Config, queue: IQueue | QueueReady[Any] | None = None, **options: Any
) -> LocalChannel:
    """The channel ``build_local_channel`` makes, remade with ``options`` if any; an
    open ``queue`` is handed over as ``QueueReady.of(queue)``."""
    from twisted.internet import reactor

    source = queue if queue is None or isinstance(queue, QueueReady) else QueueReady.of(queue)
    built = build_local_channel(config, source, reactor)
    if not options:
        return built
    options.setdefault("alias_identity", built.targets.alias_identity)
    targets = LocalTargets(
        built.recipients, reactor=reactor, hostname=config.relay.hostname, queue=source, **options
    )
    return LocalChannel(built.recipients, targets, is_local_domain=local_domain_test(config))


def address(text: str) -> Address:
    """``local@domain`` parsed."""
    return parse_forward_path(f"<{text}>", smtputf8=True)

"""Drive the SMTP channel the way the deliverer does, and say what it would record.

:func:`deliver` follows the MMDF contract in address-then-text mode: open a session,
``begin_message``, ``add_recipient`` for every recipient *without waiting* (so a
pipelining server gets them in one write), ``end_recipients``, then the text if any
address got AOK (else ``abort_message``), and ``end_session``.  A session that cannot be
opened gives every recipient the SessionFailed reply, as the deliverer does.

:class:`Outcome` holds each recipient's reply and the reply that decides its fate (the
final reply for an AOK address), and :meth:`Outcome.actions` what the deliverer records:
COMMIT (delivered), RETRY / HOST_DEAD (deferred) or BOUNCE.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from relay.address import Address
from relay.channels.smtp import SmtpChannel
from relay.dns.mx import MxResolver
from relay.envelope import BodyType, Destination, Envelope, Recipient, Submitter
from relay.errors import SessionFailed
from relay.interfaces import IChannel, IChannelSession
from relay.reply import Action, Reply, ReplyCode

from support.fakes import BytesMessage
from support.smtpserver import Script, ScriptedSmtpFactory, start_server

__all__ = ["Outcome", "channel_for", "deliver", "deliver_on", "make_message", "serving"]


@dataclass
class Outcome:
    """What happened to each recipient of one message."""

    replies: list[Reply]  # the add_recipient replies (or the SessionFailed reply)
    final: Reply | None  # end_text's reply, None when no text was sent
    session_failed: bool = False

    def fate(self, index: int) -> Reply:
        """The reply that decides recipient ``index``'s state."""
        reply = self.replies[index]
        if reply.code is ReplyCode.AOK:
            assert self.final is not None
            return self.final
        return reply

    def actions(self) -> list[Action]:
        """What the deliverer records for each recipient."""
        return [self.fate(i).code.action for i in range(len(self.replies))]


def make_message(
    recipients: list[str],
    text: bytes = b"Subject: test\r\n\r\nHello.\r\n",
    *,
    sender: str | None = "sender@origin.test",
    body_type: BodyType = BodyType.SEVEN_BIT,
    smtputf8: bool = False,
    queue_id: str = "q1",
    env_id: str | None = None,
) -> BytesMessage:
    """A queued message (in memory) for ``recipients``."""
    rcpts = tuple(Recipient(_address(r)) for r in recipients)
    return_path = None if sender is None else _address(sender)
    envelope = Envelope(
        return_path,
        rcpts,
        0.0,
        Submitter("ESMTP"),
        body_type=body_type,
        smtputf8=smtputf8,
        env_id=env_id,
    )
    return BytesMessage(queue_id, envelope, text)


def _address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


async def deliver_on(
    session: IChannelSession, message: BytesMessage, chunk_size: int = 7
) -> Outcome:
    """One message on an open session (the session stays open)."""
    envelope = message.envelope
    await session.begin_message("m", envelope.return_path, message)
    waiting = [session.add_recipient(r) for r in envelope.recipients]
    await session.end_recipients()
    replies = list(await defer.gatherResults(waiting))
    if not any(r.code is ReplyCode.AOK for r in replies):
        await session.abort_message()
        return Outcome(replies, None)
    await session.begin_text()
    reader = message.open_text()
    while chunk := await reader.read(chunk_size):
        await session.write_text(chunk)
    reader.close()
    final = await session.end_text()
    return Outcome(replies, final)


async def deliver(
    channel: IChannel, destination: Destination | str, message: BytesMessage
) -> Outcome:
    """Open a session, deliver one message, end the session."""
    if isinstance(destination, str):
        destination = Destination("smtp", destination)
    try:
        session = await channel.open_session(destination)
    except SessionFailed as e:
        return Outcome([e.reply] * len(message.envelope.recipients), None, session_failed=True)
    try:
        return await deliver_on(session, message)
    finally:
        await session.end_session()


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[int, ScriptedSmtpFactory]]:
    """A scripted SMTP server on 127.0.0.1 for the duration of the block: (port, factory)."""
    from twisted.internet import reactor

    port, factory = start_server(reactor, script)
    try:
        yield port.getHost().port, factory
    finally:
        await port.stopListening()


def channel_for(**options: Any) -> SmtpChannel:
    """An SMTP channel on the real reactor with no DNS (for ``[address]:port`` smarthosts)."""
    from twisted.internet import reactor

    return SmtpChannel(reactor, MxResolver(None), "client.test", **options)

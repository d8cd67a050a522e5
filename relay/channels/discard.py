"""The discard channel: accepts every address and throws the text away.

Postfix's ``discard`` transport, in MMDF form.  It is the reference implementation of
the channel contract in both sequencing modes (the smallest object that satisfies it),
and the no-op channel the deliverer's benchmark and tests drive; routing a domain to it
silently drops its mail, which an operator sometimes wants (a sink for a test domain).
Even so it reads the whole text, so that a defect in how text is streamed to a channel
shows up here too.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.address import Address
from relay.envelope import Destination, Recipient
from relay.interfaces import IChannel, IChannelSession, IMessage, SequencingMode
from relay.reply import Reply, ReplyCode

__all__ = ["DiscardChannel", "DiscardSession"]

_READ_SIZE = 65536


@implementer(IChannel)
class DiscardChannel:
    """A channel that says yes to everything and keeps nothing."""

    def __init__(self, mode: SequencingMode, name: str = "discard") -> None:
        self.name = name
        self.mode = mode
        self.sessions_opened = 0
        self.messages_discarded = 0
        self.octets_discarded = 0

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: nothing to connect to; a session is ready at once."""
        self.sessions_opened += 1
        return defer.succeed(DiscardSession(self))


@implementer(IChannelSession)
class DiscardSession:
    """One session of the discard channel; counts what it discarded."""

    pipelines_addresses = False  # each address is answered before the next is asked

    def __init__(self, channel: DiscardChannel) -> None:
        self._channel = channel
        self._message: IMessage | None = None

    def begin_message(
        self, mode: str, return_path: Address | None, message: IMessage
    ) -> Deferred[None]:
        """``xx_winit``: remember the message (text-per-address mode reads it per address)."""
        self._message = message
        return defer.succeed(None)

    def add_recipient(self, recipient: Recipient) -> Deferred[Reply]:
        """``xx_wadr``: AOK in list mode; in per-address mode read the text, then MOK."""
        if self._channel.mode is SequencingMode.ADDRESS_THEN_TEXT:
            return defer.succeed(Reply(ReplyCode.AOK))
        if self._message is None:
            raise RuntimeError("add_recipient before begin_message")
        return defer.ensureDeferred(self._swallow(self._message))

    async def _swallow(self, message: IMessage) -> Reply:
        reader = message.open_text()
        try:
            while chunk := await reader.read(_READ_SIZE):
                self._channel.octets_discarded += len(chunk)
        finally:
            reader.close()
        self._channel.messages_discarded += 1
        return Reply(ReplyCode.MOK)

    def end_recipients(self) -> Deferred[None]:
        """``xx_waend``: nothing to do."""
        return defer.succeed(None)

    def begin_text(self) -> Deferred[None]:
        """``xx_wtinit``: nothing to do."""
        return defer.succeed(None)

    def write_text(self, chunk: bytes) -> Deferred[None]:
        """``xx_wtxt``: count and drop the chunk."""
        self._channel.octets_discarded += len(chunk)
        return defer.succeed(None)

    def end_text(self) -> Deferred[Reply]:
        """``xx_wtend``: the text is "delivered": OK for every accepted address."""
        self._channel.messages_discarded += 1
        self._message = None
        return defer.succeed(Reply(ReplyCode.OK))

    def abort_message(self) -> Deferred[None]:
        """``xx_wkill``: forget the message."""
        self._message = None
        return defer.succeed(None)

    def end_session(self) -> Deferred[None]:
        """``xx_end``: nothing to close."""
        return defer.succeed(None)

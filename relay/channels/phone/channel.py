"""The phone channel as the deliverer sees it: address-then-text, mail held for the call.

The link carries a call's mail as one batch it announces before any text flows, so the
deliverer does not hand phone mail over message by message: its job for a phone
destination is to keep the mail queued (retried, warned about after ``warn_after``,
bounced after ``give_up_after``, as for any channel) until the site's next call, which
takes every message waiting for the site (:mod:`relay.channels.phone.outbox`).  So
:meth:`PhoneChannel.open_session` tells its listeners (the call scheduler) that mail is
waiting and answers ``AGN``: a temporary "not now" that defers the recipients without marking the
site dead, so nothing holds them back when the site calls or is called.

The channel is built before the scheduler (the deliverer needs the channel, and the
calls the scheduler places settle through the deliverer), so the scheduler listens to
the channel (:meth:`PhoneChannel.add_listener`) rather than being given to it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.envelope import Destination
from relay.errors import SessionFailed
from relay.interfaces import IChannel, IChannelSession, SequencingMode
from relay.oneline import escape
from relay.reply import Reply, ReplyCode

__all__ = ["PhoneChannel"]


@implementer(IChannel)
class PhoneChannel:
    """Hands phone mail to the calls (see the module docstring)."""

    name = "phone"
    mode = SequencingMode.ADDRESS_THEN_TEXT

    def __init__(self, calls_out: frozenset[str]) -> None:
        """``calls_out`` are the sites we call (the others call us)."""
        self._calls_out = calls_out
        self._listeners: list[Callable[[str], object]] = []

    def add_listener(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(site)`` whenever mail for ``site`` is waiting for a call."""
        self._listeners.append(listener)

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: no session outside a call; the mail waits for the site's call."""
        site = destination.host
        for listener in self._listeners:
            listener(site)
        if site in self._calls_out:
            text = f"queued for the next call to {escape(site)}"
        else:
            text = f"waiting for {escape(site)} to call"
        return defer.fail(SessionFailed(Reply(ReplyCode.AGN, text, enhanced="4.4.1")))

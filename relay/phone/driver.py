"""The Twisted driver of one phone call: a Protocol around the session engine.

It works on any transport (a SerialPort on a tty or pty, TCP, stdio): bytes from the
transport go into the engine, the engine's bytes go out, a reactor timer wakes the
engine at its next deadline, and a :class:`~relay.phone.call.CallHandler` answers the
engine's storage questions from the store.

Writes are paced by the transport: the protocol registers as a *pull* producer, so the
transport asks for bytes each time its buffer has drained and the engine hands out only
what it has ready then (at most ``write_size`` bytes).  Frames therefore wait in the
link (which can still choose, resend and acknowledge) rather than in a transport buffer
the link cannot see, and the link's round-trip times stay honest on a slow line.

Reads are paced by the store: when received text waits for the store beyond
:attr:`PhoneProtocol.max_unstored` bytes, the protocol pauses the transport (its
``pauseProducing``: no more reads), so the link acknowledges nothing more and the peer
stops at its window; it resumes the transport once the store has caught up by half.
Memory per call stays bounded however slow the store.  While reading is paused the
protocol does not hear the peer either: a store stalled longer than the link's
``dead_after`` ends the call (the mail not committed stays with its sender).

When the engine ends the call the protocol writes what is left and drops the line;
:attr:`PhoneProtocol.ended` fires with the :class:`CallSummary`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.interfaces import IPhoneStore
from relay.phone.call import MAX_UNSTORED, CallHandler
from relay.sansio.phone.accounting import CallSummary
from relay.sansio.phone.link import LinkParams
from relay.sansio.phone.records import NONCE_SIZE, Role
from relay.sansio.phone.session import (
    PhoneSession,
    RecordLink,
    SessionOptions,
)

__all__ = ["PhoneProtocol", "session_factory"]

log = Logger()

SessionFactory = Callable[[float], PhoneSession]


def session_factory(
    *,
    role: Role,
    local_name: str,
    secrets: Mapping[str, bytes],
    new_link: Callable[[float], tuple[RecordLink, LinkParams]],
    peer_name: str | None = None,
    options: SessionOptions | None = None,
    site_options: Mapping[str, SessionOptions] | None = None,
) -> SessionFactory:
    """A factory of sessions for one end, each with a fresh nonce and link;
    ``site_options`` are this end's settings for particular peers (``options`` for the
    others), honoured on either end."""

    def make(now: float) -> PhoneSession:
        link, params = new_link(now)
        return PhoneSession(
            link=link,
            link_params=params,
            role=role,
            local_name=local_name,
            secrets=secrets.get,
            nonce=os.urandom(NONCE_SIZE),
            now=now,
            peer_name=peer_name,
            options=options,
            site_options=site_options.get if site_options is not None else None,
        )

    return make


@implementer(IPullProducer)
class PhoneProtocol(Protocol):
    """One call over one transport, either end."""

    write_size = 2048
    max_unstored = MAX_UNSTORED

    def __init__(
        self, new_session: SessionFactory, store: IPhoneStore, clock: IReactorTime
    ) -> None:
        self._new_session = new_session
        self._store = store
        self._clock = clock
        self._session: PhoneSession | None = None
        self._handler: CallHandler | None = None
        self._timer: IDelayedCall | None = None
        self._wanted = False
        self._closing = False
        self.reading_paused = False
        """True while the transport is paused because the store is behind."""
        self.ended: Deferred[CallSummary] = Deferred()
        self.summary: CallSummary | None = None

    # --- transport events ------------------------------------------------------------------

    def connectionMade(self) -> None:
        now = self._clock.seconds()
        self._session = self._new_session(now)
        self._handler = CallHandler(
            self._session,
            self._store,
            self._kick,
            on_backlog=self._on_backlog,
            max_unstored=self.max_unstored,
        )
        assert self.transport is not None
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]  # calls resumeProducing at once
        self._kick()

    def dataReceived(self, data: bytes) -> None:
        if self._session is None or self._closing:
            return
        self._session.receive_data(data, self._clock.seconds())
        self._kick()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._session is not None and not self._session.ended:
            self._session.receive_data(b"", self._clock.seconds())
            self._kick()
        if self.summary is None and self._handler is not None:
            self._handler.handle_events()
            self._finish(self._handler.summary)

    @property
    def unstored_bytes(self) -> int:
        """Bytes of received text waiting for the store."""
        return self._handler.unstored_bytes if self._handler is not None else 0

    def _on_backlog(self, behind: bool) -> None:
        """Stop reading the line while the store is behind, read again once it caught up."""
        if self.transport is None or self._closing:
            return
        self.reading_paused = behind
        if behind:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        else:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # --- IPullProducer ---------------------------------------------------------------------

    def resumeProducing(self) -> None:
        self._wanted = True
        self._write()

    def stopProducing(self) -> None:
        self._wanted = False

    # --- the engine ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Something happened: act on the engine's events, write, re-arm the timer.

        Re-entrant: a store answer that is already there calls back into here while the
        events are being handled; whichever call sees the end hangs up, once."""
        session, handler = self._session, self._handler
        if session is None or handler is None or self._closing:
            return
        summary = handler.handle_events()
        if not self._closing:
            self._write()
            summary = handler.handle_events() or summary
        if self._closing:
            return
        if summary is not None:
            self._hang_up(summary)
            return
        self._arm_timer()

    def _write(self) -> None:
        if not self._wanted or self._session is None or self.transport is None or self._closing:
            return
        data = self._session.data_to_send(self._clock.seconds(), self.write_size)
        if data:
            self._wanted = False  # the transport asks again when this has drained
            self.transport.write(data)

    def _arm_timer(self) -> None:
        assert self._session is not None
        deadline = self._session.next_deadline()
        self._cancel_timer()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._session is not None and not self._closing:
            self._session.tick(self._clock.seconds())
            self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _hang_up(self, summary: CallSummary) -> None:
        assert self._session is not None and self.transport is not None
        self._closing = True
        self._cancel_timer()
        rest = self._session.data_to_send(self._clock.seconds())
        if rest:
            self.transport.write(rest)
        self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self.transport.loseConnection()
        self._finish(summary)

    def _finish(self, summary: CallSummary | None) -> None:
        if self.summary is not None or summary is None:
            return
        self.summary = summary
        log.info(
            "phone: call with {peer} ended: {outcome}; sent {sent} received {received}",
            peer=summary.peer or "?",
            outcome=summary.outcome.value,
            sent=summary.messages_sent,
            received=summary.messages_received,
        )
        self.ended.callback(summary)

    def __repr__(self) -> str:
        return f"<PhoneProtocol {self._session.peer if self._session else '?'}>"

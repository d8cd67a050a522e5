"""One call's bookkeeping between the session engine and the durable store.

The engine asks with events; :class:`CallHandler` turns each into a call on the
:class:`~relay.interfaces.IPhoneStore` and, when its Deferred fires, gives the answer
back to the engine, then tells the driver (``on_change``) that there may be bytes to
write.  Nothing blocks: the engine keeps running while the store works, so text of other
messages flows while one is being committed.

The text of one incoming message is written piece by piece in order (each write waits
for the one before), and its commit waits for the last write.  A store failure on one
message fails that message only (a temporary reply: the sender keeps it for the next
call); the call goes on.

**Backpressure.**  Text the line brings faster than the store writes it waits here, in
memory.  :attr:`CallHandler.unstored_bytes` counts it; when it rises above
``max_unstored`` the handler calls ``on_backlog(True)`` (the driver stops reading the
line; the link then acknowledges nothing more and its window stops the peer), and
``on_backlog(False)`` once the store has brought it down to half of that.  What is held
per call is therefore about ``max_unstored`` plus what one read of the line brings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.errors import DigestMismatch
from relay.interfaces import IPhoneStore
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.accounting import CallSummary
from relay.sansio.phone.session import (
    Acceptance,
    Authenticated,
    CallEnded,
    CallFailing,
    CommitRequested,
    InventoryReceived,
    MessageSettled,
    PhoneSession,
    ProposalReceived,
    SessionEvent,
    TextReceived,
    TextWanted,
)

__all__ = ["MAX_UNSTORED", "CallHandler"]

log = Logger()
MAX_UNSTORED = 256 * 1024
"""Bytes of received text waiting for the store above which the line is not read."""
_STORED = Reply(ReplyCode.OK)  # the local queue id is logged here, not sent: bytes count


class CallHandler:
    """Answers one session's storage questions from a store."""

    def __init__(
        self,
        session: PhoneSession,
        store: IPhoneStore,
        on_change: Callable[[], None],
        observe: Callable[[SessionEvent], object] | None = None,
        *,
        on_backlog: Callable[[bool], None] | None = None,
        max_unstored: int = MAX_UNSTORED,
    ) -> None:
        """``observe``, if given, sees every event first (progress, call records);
        ``on_backlog`` is told when to stop (True) and resume (False) reading the line."""
        self._session = session
        self._store = store
        self._on_change = on_change
        self._observe = observe
        self._on_backlog = on_backlog
        self._max_unstored = max_unstored
        self._backlogged = False
        self.unstored_bytes = 0
        """Bytes of received text not yet written by the store."""
        self._writes: dict[int, Deferred[Any]] = {}
        self._failed_writes: set[int] = set()
        self.summary: CallSummary | None = None
        self.settled: list[MessageSettled] = []

    def handle_events(self) -> CallSummary | None:
        """Act on every event the session has; the summary once the call has ended."""
        while (event := self._session.next_event()) is not None:
            if self._observe is not None:
                self._observe(event)
            self._dispatch(event)
        return self.summary

    def _dispatch(self, event: SessionEvent) -> None:
        if isinstance(event, TextReceived):
            self._write(event)
        elif isinstance(event, TextWanted):
            self._read(event)
        elif isinstance(event, ProposalReceived):
            self._decide(event)
        elif isinstance(event, CommitRequested):
            self._commit(event)
        elif isinstance(event, MessageSettled):
            self._settle(event)
        elif isinstance(event, Authenticated):
            log.info("phone: {peer} authenticated", peer=event.peer)
            self._load_outgoing(event.peer)
        elif isinstance(event, InventoryReceived):
            log.debug("phone: peer holds {count} messages for us", count=len(event.items))
        elif isinstance(event, CallFailing):
            log.warn(
                "phone: call with {peer} failing ({outcome}): {reason}",
                peer=self._session.peer or "?",
                outcome=event.outcome.value,
                reason=event.reason,
            )
        elif isinstance(event, CallEnded):
            self.summary = event.summary

    def _answer(self, call: Callable[[], None]) -> None:
        """Give the engine an answer from a Deferred callback, then wake the driver."""
        if not self._session.ended:
            call()
        self._on_change()

    # --- sending ---------------------------------------------------------------------------

    def _load_outgoing(self, peer: str) -> None:
        def offer(messages: Any) -> None:
            for message in messages:
                self._session.offer(message)
            self._session.close_offers()

        def failed(failure: Failure) -> None:
            log.failure("phone: cannot list mail for {peer}", failure, peer=peer)
            self._session.close_offers()

        d = self._store.outgoing(peer)
        d.addCallbacks(
            lambda m: self._answer(lambda: offer(m)), lambda f: self._answer(lambda: failed(f))
        )

    def _read(self, event: TextWanted) -> None:
        peer = self._peer()
        d = self._store.read_text(peer, event.message_id, event.offset, event.max_bytes)

        def unavailable(failure: Failure) -> None:
            log.failure("phone: cannot read {id}", failure, id=event.message_id)
            reply = Reply(ReplyCode.FIO, "cannot read the message text")
            self._session.text_unavailable(event.message_id, reply)

        d.addCallbacks(
            lambda data: self._answer(
                lambda: self._session.provide_text(event.message_id, event.offset, data)
            ),
            lambda f: self._answer(lambda: unavailable(f)),
        )

    def _settle(self, event: MessageSettled) -> None:
        self.settled.append(event)
        d = self._store.settle(self._peer(), event.message_id, event.replies)

        def failed(failure: Failure) -> None:
            log.failure("phone: cannot record replies for {id}", failure, id=event.message_id)

        d.addErrback(failed)

    # --- receiving -------------------------------------------------------------------------

    def _decide(self, event: ProposalReceived) -> None:
        d = self._store.accept(event.peer, event.message_id, event.envelope, event.size)

        def decided(acceptance: Acceptance) -> None:
            if acceptance.offset and not event.resume:
                acceptance = Acceptance(acceptance.replies, 0, acceptance.whole)
            self._session.answer_proposal(event.job, acceptance)

        def failed(failure: Failure) -> None:
            log.failure("phone: cannot decide on {id}", failure, id=event.message_id)
            self._session.refuse(event.job, Reply(ReplyCode.FIO, "cannot store mail now"))

        d.addCallbacks(
            lambda a: self._answer(lambda: decided(a)), lambda f: self._answer(lambda: failed(f))
        )

    def _write(self, event: TextReceived) -> None:
        previous = self._writes.get(event.job, succeed(None))
        peer = self._peer()
        self._count_unstored(len(event.data))

        def write(_: object) -> Deferred[None]:
            return self._store.write_text(peer, event.message_id, event.offset, event.data)

        def written(result: object) -> object:
            self._count_unstored(-len(event.data))
            return result

        def failed(failure: Failure) -> None:
            if event.job in self._failed_writes:
                return
            self._failed_writes.add(event.job)
            log.failure("phone: cannot store text of {id}", failure, id=event.message_id)
            reply = Reply(ReplyCode.FIO, "cannot store the text now")
            self._answer(lambda: self._session.fail_receiving(event.job, reply))

        d: Deferred[Any] = previous.addCallback(write)
        d.addBoth(written)
        d.addErrback(failed)
        self._writes[event.job] = d

    def _count_unstored(self, change: int) -> None:
        """Keep :attr:`unstored_bytes`, and tell the driver when it crosses the bounds."""
        self.unstored_bytes += change
        if self._on_backlog is None:
            return
        if not self._backlogged and self.unstored_bytes > self._max_unstored:
            self._backlogged = True
            self._on_backlog(True)
        elif self._backlogged and self.unstored_bytes <= self._max_unstored // 2:
            self._backlogged = False
            self._on_backlog(False)

    def _commit(self, request: CommitRequested) -> None:
        event = request.proposal
        previous = self._writes.pop(event.job, succeed(None))

        def commit(_: object) -> Deferred[str] | None:
            if event.job in self._failed_writes:
                return None
            return self._store.commit(
                event.peer, event.message_id, request.envelope, event.size, event.digest
            )

        def committed(queue_id: str | None) -> None:
            if queue_id is not None:
                log.debug(
                    "phone: {id} from {peer} stored as {queue_id}",
                    id=event.message_id,
                    peer=event.peer,
                    queue_id=queue_id,
                )
                self._answer(lambda: self._session.commit_done(event.job, _STORED))

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, DigestMismatch):
                log.warn(
                    "phone: {id} from {peer} does not match its hash",
                    id=event.message_id,
                    peer=event.peer,
                )
                reply = Reply(ReplyCode.NET, "text damaged: send it again")
            else:
                log.failure("phone: cannot commit {id}", failure, id=event.message_id)
                reply = Reply(ReplyCode.FIO, "cannot store mail now")
            self._answer(lambda: self._session.commit_done(event.job, reply))

        previous.addCallback(commit).addCallbacks(committed, failed)

    def _peer(self) -> str:
        peer = self._session.peer
        assert peer is not None  # storage events come only after authentication
        return peer

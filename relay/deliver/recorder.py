"""Recording what happened: new recipient states, DSNs, warnings, in a crash-safe order.

Theory of operation
-------------------
Each job's outcomes arrive here (:meth:`Recorder.record`) once its transaction has
ended, so every recipient is committed only after its final reply.  For each recipient
the policy decides (:func:`relay.policy.retry.decide`) and one log event says so; then:

* delivered and deferred recipients (and those held back for a resting destination)
  are written at once, in one ``update`` per job;
* failed recipients are *held* until every job of the message in this scan has been
  recorded; then one DSN reports them all, and it is stored in the queue (``store``)
  **before** they are recorded as failed.  A crash between the two sends the DSN twice;
  the other order could lose it.  If the DSN cannot be stored, the recipients are
  deferred instead (with their failure as last reply) and fail again on their next try;
* after that, if the message is older than ``warn_after`` and was never warned, its
  recipients still undelivered are marked ``warned`` **first** and the delay DSN is
  stored after: a crash in between loses a warning, but a warning is never sent twice.

The finishing step of a message (failures and warning) is serialised per queue id, so
two scans' works for one message never race on its DSNs.  Claims are released only when
a write is durable; a write that fails releases them after ``failure_backoff`` seconds,
so a full disk does not turn into a tight loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.config import DeliverSection
from relay.deliver.dispositions import (
    Notice,
    attempted_status,
    delay_notice,
    expired_status,
    failure_notice,
    parked_status,
    read_headers,
    wants_failure_notice,
)
from relay.deliver.history import DeliveryHistory
from relay.deliver.logging import DispositionStatus, log_disposition
from relay.deliver.work import Claims, MessageWork, Outcome, Parked
from relay.envelope import RecipientState, RecipientStatus
from relay.instruments.series import BOUNCES, DELAY_WARNINGS, DELIVERIES, DELIVERY_LATENCY
from relay.interfaces import IQueue
from relay.oneline import escape
from relay.policy.dsn import DsnRecipient, is_double_bounce
from relay.policy.retry import Disposition, decide, expired_reply, is_expired, next_attempt
from relay.reply import Reply

__all__ = ["Recorder"]

_log = Logger()

_STATUS_OF = {
    Disposition.DELIVERED: DispositionStatus.SENT,
    Disposition.DEFER: DispositionStatus.DEFERRED,
    Disposition.DEFER_HOST_DEAD: DispositionStatus.DEFERRED,
}


class Recorder:
    """Turns outcomes into durable states and DSNs; see the module docstring."""

    def __init__(
        self,
        queue: IQueue,
        clock: IReactorTime,
        settings: DeliverSection,
        rng: random.Random,
        claims: Claims,
        *,
        hostname: str,
        postmaster: str,
        on_work_done: Callable[[MessageWork], None] = lambda work: None,
        on_released: Callable[[], None] = lambda: None,
        failure_backoff: float = 60.0,
        log: Logger | None = None,
        history: DeliveryHistory | None = None,
    ) -> None:
        """``history``, if given, hears of every disposition (``relay status``)."""
        self._queue = queue
        self._clock = clock
        self._settings = settings
        self._rng = rng
        self._claims = claims
        self._hostname = hostname
        self._postmaster = postmaster
        self.on_work_done = on_work_done
        self.on_released = on_released  # claims released late: their recipients are due
        self._failure_backoff = failure_backoff
        self._log = log if log is not None else _log
        self._history = history
        self._writes: dict[MessageWork, list[Deferred[None]]] = {}
        self._busy: set[Deferred[Any]] = set()
        self._finishing: dict[str, Deferred[None]] = {}

    # --- per job --------------------------------------------------------------------------

    def record(
        self, work: MessageWork, indices: Iterable[int], outcomes: Mapping[int, Outcome]
    ) -> None:
        """Record one job's outcomes; ``indices`` without an outcome are left as they are."""
        now = self._clock.seconds()
        changes: dict[int, RecipientStatus] = {}
        for index in sorted(outcomes):
            status = self._decide(work, index, outcomes[index], now)
            work.statuses[index] = status
            if index not in work.failures:
                changes[index] = status
        untouched = [i for i in indices if i not in outcomes]
        self._claims.release(work, untouched)
        if changes:
            self._writes.setdefault(work, []).append(self._write(work, changes))
        work.pending -= 1
        if work.pending == 0:
            self._finish(work)

    def _decide(
        self, work: MessageWork, index: int, outcome: Outcome, now: float
    ) -> RecipientStatus:
        previous = work.statuses[index]
        recipient = work.envelope.recipients[index]
        arrival = work.envelope.arrival
        warned = work.queue_id in self._claims.warned

        def emit(reply: Reply, status: DispositionStatus, attempt: int) -> None:
            log_disposition(
                self._log,
                queue_id=work.queue_id,
                recipient=recipient,
                destination=outcome.destination,
                reply=reply,
                status=status,
                delay=now - arrival,
                attempt=attempt,
            )
            channel = outcome.destination.channel if outcome.destination else "unrouted"
            DELIVERIES.labels(channel, status.value).inc()
            if status is not DispositionStatus.DEFERRED:
                DELIVERY_LATENCY.labels(channel).observe(now - arrival)
            if self._history is not None:
                self._history.note(
                    when=now,
                    queue_id=work.queue_id,
                    recipient=str(recipient.address),
                    destination=outcome.destination,
                    status=status,
                    reply=reply,
                )

        if isinstance(outcome, Parked):
            if not is_expired(arrival, now, self._settings.give_up_after):
                emit(outcome.reason, DispositionStatus.DEFERRED, previous.attempts)
                return parked_status(previous, outcome.until, outcome.reason, warned=warned)
            reply = expired_reply(previous.last_reply)
            expired = expired_status(previous, reply, now=now)
            entry = DsnRecipient(recipient, reply, previous.updated)
            work.failures[index] = (entry, expired, outcome.destination)
            emit(reply, DispositionStatus.EXPIRED, previous.attempts)
            return expired
        decision = decide(
            outcome.reply, arrival=arrival, now=now, give_up_after=self._settings.give_up_after
        )
        status = attempted_status(
            previous, decision, now=now, settings=self._settings, rng=self._rng, warned=warned
        )
        if decision.disposition is Disposition.BOUNCE:
            entry = DsnRecipient(recipient, decision.reply, now)
            work.failures[index] = (entry, status, outcome.destination)
            kind = DispositionStatus.EXPIRED if decision.expired else DispositionStatus.BOUNCED
        else:
            kind = _STATUS_OF[decision.disposition]
        emit(decision.reply, kind, status.attempts)
        return status

    def _write(self, work: MessageWork, changes: dict[int, RecipientStatus]) -> Deferred[None]:
        """One durable update; the claims go once it is durable (or later if it failed)."""
        indices = list(changes)
        done: Deferred[None] = Deferred()

        def written(_: object) -> None:
            self._claims.release(work, indices)
            done.callback(None)

        def failed(failure: Any) -> None:
            if failure.check(KeyError):  # the message left the queue (an operator's rm)
                self._log.info(
                    "deliver: {queue_id}: left the queue; its outcomes are not recorded",
                    queue_id=work.queue_id,
                )
                self._claims.release(work, indices)
                done.callback(None)
                return
            self._log.failure(
                "deliver: {queue_id}: cannot record recipients {indices}; "
                "they are tried again in {backoff} s",
                failure,
                queue_id=work.queue_id,
                indices=indices,
                backoff=self._failure_backoff,
            )
            work.holding.update(indices)
            self._clock.callLater(self._failure_backoff, self._late_release, work, indices)
            done.callback(None)

        self._track(self._queue.update(work.queue_id, changes)).addCallbacks(written, failed)
        return done

    def _late_release(self, work: MessageWork, indices: list[int]) -> None:
        work.holding.difference_update(indices)
        self._claims.release(work, indices)
        self.on_released()

    # --- per message ----------------------------------------------------------------------

    def _finish(self, work: MessageWork) -> None:
        """Every job of ``work`` is recorded: send its DSNs in order, then let it go.

        The work ends (and its last claims go) only after its writes are durable.
        """
        queue_id = work.queue_id
        previous = self._finishing.get(queue_id)
        writes = [w for w in self._writes.pop(work, []) if not w.called]
        if previous is None and not work.failures and not self._may_warn(work):
            if not writes:
                self._end(work)
            else:
                DeferredList(writes).addBoth(lambda _: self._end(work))
            return

        async def finish() -> None:
            if previous is not None:
                await previous
            if writes:
                await DeferredList(writes)
            try:
                if work.failures:
                    await self._fail(work)
                if self._may_warn(work):
                    await self._warn(work)
            except Exception:
                self._log.failure("deliver: {queue_id}: finishing failed", queue_id=queue_id)
            finally:
                self._end(work)

        done = self._track(ensureDeferred(finish()))
        if done.called:
            return
        self._finishing[queue_id] = done

        def forget(_: object) -> None:
            if self._finishing.get(queue_id) is done:
                del self._finishing[queue_id]

        done.addBoth(forget)

    def _end(self, work: MessageWork) -> None:
        self._claims.end(work)
        self.on_work_done(work)

    async def _fail(self, work: MessageWork) -> None:
        """One DSN for every failure held back, stored before the failures are recorded."""
        now = self._clock.seconds()
        failures = sorted(work.failures.items())
        entries = [entry for _, (entry, _, _) in failures]
        changes = {index: status for index, (_, status, _) in failures}
        notice = None
        if wants_failure_notice(work.envelope):
            headers = await self._headers(work.queue_id)
            notice = failure_notice(
                work.envelope,
                work.queue_id,
                entries,
                headers,
                hostname=self._hostname,
                postmaster=self._postmaster,
                now=now,
            )
        if notice is not None:
            try:
                dsn_id = await self._queue.store(notice.envelope, notice.text)
            except Exception:
                self._log.failure(
                    "deliver: {queue_id}: cannot queue the {kind} notice; "
                    "its recipients stay queued",
                    queue_id=work.queue_id,
                    kind=notice.kind,
                )
                await self._write(work, self._retry_later(work, changes, now))
                return
            self._log_notice(work.queue_id, notice, dsn_id)
        elif work.envelope.return_path is None:
            self._log.info(
                "deliver: {queue_id}: {count} failed recipients of a {what} dropped: "
                "nobody to tell",
                queue_id=work.queue_id,
                count=len(changes),
                what="double bounce" if is_double_bounce(work.envelope) else "null-sender message",
            )
        await self._write(work, changes)

    def _retry_later(
        self, work: MessageWork, changes: dict[int, RecipientStatus], now: float
    ) -> dict[int, RecipientStatus]:
        """Failed recipients whose DSN could not be stored: deferred, to fail again later."""
        out: dict[int, RecipientStatus] = {}
        for index, status in changes.items():
            when = next_attempt(now, max(status.attempts, 1), None, self._settings, self._rng)
            out[index] = replace(status, state=RecipientState.DEFERRED, next_attempt=when)
            work.statuses[index] = out[index]
        return out

    def _may_warn(self, work: MessageWork) -> bool:
        """Cheap checks first: a delay DSN may be due for this message now."""
        warn_after = self._settings.warn_after
        return (
            work.envelope.return_path is not None
            and warn_after > 0
            and self._clock.seconds() - work.envelope.arrival >= warn_after
            and work.queue_id not in self._claims.warned
        )

    async def _warn(self, work: MessageWork) -> None:
        """The one delay DSN: mark the recipients warned (durably) first, then store it."""
        queue_id = work.queue_id
        try:
            _, statuses = await self._queue.load(queue_id)
        except Exception:
            return  # the message is gone: nothing left to warn about
        if any(s.warned for s in statuses) or queue_id in self._claims.warned:
            return
        delayed = [
            index
            for index, status in enumerate(statuses)
            if not status.state.is_final
            and status.state is not RecipientState.HELD
            and self._claims.owner((queue_id, index)) in (None, work)
        ]
        if not delayed:
            return
        now = self._clock.seconds()
        self._claims.warned.add(queue_id)
        changes = {index: replace(statuses[index], warned=True) for index in delayed}
        try:
            await self._track(self._queue.update(queue_id, changes))
        except Exception:
            self._claims.warned.discard(queue_id)
            self._log.failure(
                "deliver: {queue_id}: cannot mark recipients warned", queue_id=queue_id
            )
            return
        for index, status in changes.items():
            work.statuses[index] = status
        until = work.envelope.arrival + self._settings.give_up_after
        entries = [
            DsnRecipient.from_status(
                work.envelope.recipients[index], statuses[index], will_retry_until=until
            )
            for index in delayed
        ]
        headers = await self._headers(queue_id)
        notice = delay_notice(
            work.envelope,
            queue_id,
            entries,
            headers,
            hostname=self._hostname,
            postmaster=self._postmaster,
            now=now,
        )
        if notice is None:
            return
        try:
            dsn_id = await self._queue.store(notice.envelope, notice.text)
        except Exception:
            self._log.failure(
                "deliver: {queue_id}: cannot queue the delay notice (not retried: "
                "a warning is never sent twice)",
                queue_id=queue_id,
            )
            return
        self._log_notice(queue_id, notice, dsn_id)

    async def _headers(self, queue_id: str) -> bytes:
        """The message's header section for a notice (b"" if it cannot be read)."""
        try:
            return await read_headers(self._queue.open_message(queue_id))
        except Exception:
            self._log.failure(
                "deliver: {queue_id}: cannot read the headers for a notice; sent without them",
                queue_id=queue_id,
            )
            return b""

    def _log_notice(self, queue_id: str, notice: Notice, dsn_id: str) -> None:
        (DELAY_WARNINGS if notice.kind == "delay" else BOUNCES).inc()
        self._log.info(
            "{queue_id}: {kind} notice queued as {dsn_id} for <{recipient}>",
            queue_id=queue_id,
            kind=notice.kind,
            dsn_id=dsn_id,
            recipient=escape(str(notice.envelope.recipients[0].address)),
        )

    # --- stopping -------------------------------------------------------------------------

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        if not d.called:
            self._busy.add(d)
            d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: object, d: Deferred[Any]) -> object:
        self._busy.discard(d)
        return result

    def drain(self) -> Deferred[None]:
        """Fire when every write, DSN and finishing step begun so far has ended."""
        if not self._busy:
            return defer.succeed(None)

        async def wait() -> None:
            while self._busy:
                await DeferredList(list(self._busy), consumeErrors=True)

        return ensureDeferred(wait())

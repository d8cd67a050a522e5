"""Taking due recipients from the queue and turning them into jobs: MMDF deliver's main loop.

Theory of operation
-------------------
The scheduler sleeps.  It scans the queue when the queue calls its listener (new mail,
a recipient fell due, a flush), when :meth:`Scheduler.wake` is called, and when its own
timer, set at :meth:`~relay.interfaces.IQueue.next_due_time`, fires.  Wake-ups that come
together make one scan; a wake-up during a scan makes one more scan after it.  Nothing
polls.

A scan asks the queue for the due recipients grouped by destination
(``due_by_destination``: answered from memory, no message is read), skips those it
already works on (:class:`~relay.deliver.work.Claims`), loads each message's envelope
and states, and claims the recipients.  A recipient not routed yet is routed now with
:class:`relay.policy.routing.Router` (the answer is remembered per address); one with
no route fails permanently with the router's reason.  Then, per message:

* recipients for a destination that rests (marked dead after a connection-level
  failure) are held back until it revives: no attempt is made or counted;
* recipients for a channel that is not running are deferred (a configuration problem,
  not the sender's);
* the others are grouped per destination into jobs of at most
  ``recipients_per_transaction``, oldest message first, and handed to the
  :class:`~relay.deliver.session_pool.SessionPool`.

At most ``active_limit`` messages are worked on at once (Postfix's active queue); a scan
that found more takes the oldest and scans again when half the active ones are done.

A :class:`DeliveryJob` runs one :class:`~relay.deliver.sequencer.Transaction` and hands
its outcome to the :class:`~relay.deliver.recorder.Recorder`; it is also where a
connection-level failure marks the destination dead, and a delivery revives it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from relay.address import Address
from relay.deliver.recorder import Recorder
from relay.deliver.sequencer import TEXT_CHUNK, Transaction, TransactionOutcome, Verdict
from relay.deliver.session_pool import JobResult, SessionPool
from relay.deliver.work import Attempted, Claims, MessageWork, Outcome, Parked
from relay.envelope import Destination, RecipientState, RecipientStatus
from relay.errors import ContractViolation
from relay.interfaces import IChannel, IChannelSession, IQueue
from relay.oneline import REPLY_TEXT_LIMIT, escape, one_line
from relay.policy.retry import DeadHosts
from relay.policy.routing import NoRoute, Router
from relay.reply import Action, Reply, ReplyCode

__all__ = ["DeliveryJob", "Scheduler"]

_log = Logger()

_ROUTE_CACHE: Final = 10_000  # addresses whose route is remembered


class Scheduler:
    """Scans the queue and hands jobs to the pool; see the module docstring."""

    def __init__(
        self,
        queue: IQueue,
        channels: Mapping[str, IChannel],
        router: Router,
        pool: SessionPool,
        make_recorder: Callable[[Scheduler], Recorder],
        claims: Claims,
        dead_hosts: DeadHosts,
        clock: IReactorTime,
        *,
        recipients_per_transaction: int,
        active_limit: int = 20_000,
        text_chunk: int = TEXT_CHUNK,
        log: Logger | None = None,
    ) -> None:
        if recipients_per_transaction < 1 or active_limit < 1:
            raise ValueError("recipients_per_transaction and active_limit must be positive")
        self.queue = queue
        self.channels = channels
        # The recorder reports back to this scheduler (work done, claims released late),
        # so it is made here, with those two methods, rather than patched afterwards.
        self.recorder = make_recorder(self)
        self.text_chunk = text_chunk
        self.log = log if log is not None else _log
        self._router = router
        self._pool = pool
        self._claims = claims
        self._dead = dead_hosts
        self._clock = clock
        self._per_transaction = recipients_per_transaction
        self._active_limit = active_limit
        self._routes: dict[Address, Destination | Reply] = {}
        self._dead_reasons: dict[Destination, Reply] = {}
        self._running = False
        self._scanning = False
        self._rescan = False
        self._truncated = False
        self._soon: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None
        self.scans = 0  # scans made, for tests and the benchmark

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the queue and scan it now."""
        self._running = True
        self.queue.add_listener(self.wake)
        self.wake()

    def stop(self) -> None:
        """Stop listening and scanning (the jobs already given to the pool go on)."""
        self._running = False
        self.queue.remove_listener(self.wake)
        for call in (self._soon, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._timer = None

    def wake(self) -> None:
        """Scan the queue soon (once, however often this is called before it runs)."""
        if not self._running:
            return
        if self._scanning:
            self._rescan = True
            return
        if self._soon is None:
            self._soon = self._clock.callLater(0, self._scan_now)

    def work_done(self, work: MessageWork) -> None:
        """A message's work ended: scan again if the last scan left mail behind."""
        if self._truncated and len(self._claims) <= self._active_limit // 2:
            self._truncated = False
            self.wake()

    # --- dead destinations ------------------------------------------------------------------

    def mark_dead(self, destination: Destination, reply: Reply) -> float | None:
        """Rest ``destination`` after ``reply``; until when (None: resting is turned off)."""
        if self._dead.delay <= 0:
            return None
        until = self._dead.mark_dead(destination, self._clock.seconds())
        self._dead_reasons[destination] = reply
        self.log.warn(
            "deliver: {destination} rests until {until:.0f} after {reply}; its mail waits",
            destination=escape(str(destination)),
            until=until,
            reply=escape(reply.smtp_line()),
        )
        return until

    def revive(self, destination: Destination) -> None:
        """``destination`` works again (a delivery to it succeeded, or a flush)."""
        if self._dead_reasons.pop(destination, None) is not None:
            self._dead.revive(destination)
            self._pool.kick()

    async def revive_matching(self, channel: str | None, queue_ids: Sequence[str] | None) -> None:
        """Revive the resting destinations of ``channel`` (or all), or of some messages."""
        wanted: set[Destination] | None = None
        if queue_ids is not None:
            wanted = set()
            for queue_id in queue_ids:
                wanted.update(await self._destinations_of(queue_id))
        for destination in list(self._dead_reasons):
            if channel is not None and destination.channel != channel:
                continue
            if wanted is not None and destination not in wanted:
                continue
            self.revive(destination)

    def suspended_reply(self, destination: Destination) -> Reply:
        """Why mail for a resting destination waits, for its log line and last reply."""
        reason = self._dead_reasons.get(destination)
        if reason is None:
            return Reply(ReplyCode.DHST, "delivery temporarily suspended")
        return Reply(
            reason.code,
            one_line(f"delivery temporarily suspended: {reason.description}", REPLY_TEXT_LIMIT),
            reason.effective_smtp_code,
            reason.effective_enhanced,
        )

    def resting_until(self, destination: Destination, now: float) -> float | None:
        """Until when ``destination`` rests, or None if it does not."""
        if not self._dead.is_dead(destination, now):
            return None
        return self._dead.dead_until(destination)

    # --- scanning ---------------------------------------------------------------------------

    def _scan_now(self) -> None:
        self._soon = None
        if not self._running:
            return
        self._scanning = True
        self.scans += 1
        d = ensureDeferred(self._scan())
        d.addErrback(lambda f: self.log.failure("deliver: scanning the queue failed", f))
        d.addBoth(self._scanned)

    def _scanned(self, _: object) -> None:
        self._scanning = False
        if self._rescan:
            self._rescan = False
            self.wake()
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Sleep until the queue's next due time (the queue's listener may wake us first)."""
        if not self._running:
            return
        when = self.queue.next_due_time()
        now = self._clock.seconds()
        timer = self._timer
        if timer is not None and timer.active():
            if when is not None and timer.getTime() == when:
                return
            timer.cancel()
        self._timer = None
        if when is not None and when > now:
            self._timer = self._clock.callLater(when - now, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    async def _scan(self) -> None:
        now = self._clock.seconds()
        self._dead.expire(now)
        for rested in [d for d in self._dead_reasons if self._dead.dead_until(d) is None]:
            del self._dead_reasons[rested]
        groups = await self.queue.due_by_destination(now)
        works: dict[str, MessageWork] = {}
        where: dict[str, dict[int, Destination | Reply]] = {}
        for destination, keys in groups.items():
            for queue_id, index in keys:
                if self._claims.owner((queue_id, index)) is not None:
                    continue
                work = works.get(queue_id)
                if work is None:
                    if len(self._claims) >= self._active_limit:
                        self._truncated = True
                        continue
                    work = await self._load(queue_id)
                    if work is None:
                        continue
                    works[queue_id] = work
                    where[queue_id] = {}
                    self._claims.begin(work)
                if not _is_due(work.statuses[index], now) or not self._claims.claim(work, index):
                    continue
                if destination is None:
                    where[queue_id][index] = self._route(work.envelope.recipients[index].address)
                else:
                    where[queue_id][index] = destination
        with self._pool.batch():
            for queue_id in sorted(works):
                self._launch(works[queue_id], where[queue_id], now)

    async def _load(self, queue_id: str) -> MessageWork | None:
        try:
            envelope, statuses = await self.queue.load(queue_id)
        except Exception:
            return None  # removed since the index answered
        return MessageWork(queue_id, envelope, list(statuses))

    def _route(self, address: Address) -> Destination | Reply:
        """Route an address not routed yet, remembering the answer (or the failure)."""
        found = self._routes.get(address)
        if found is None:
            try:
                found = self._router.route(address)
            except NoRoute as e:
                found = e.reply
            if len(self._routes) >= _ROUTE_CACHE:
                self._routes.clear()
            self._routes[address] = found
        return found

    async def _destinations_of(self, queue_id: str) -> set[Destination]:
        """Where a message's recipients go (nothing if it is not queued)."""
        try:
            envelope, _ = await self.queue.load(queue_id)
        except Exception:
            return set()
        found: set[Destination] = set()
        for recipient in envelope.recipients:
            where = recipient.destination or self._route(recipient.address)
            if isinstance(where, Destination):
                found.add(where)
        return found

    def _launch(
        self, work: MessageWork, where: Mapping[int, Destination | Reply], now: float
    ) -> None:
        """Turn one message's claimed recipients into jobs and immediate outcomes."""
        groups: dict[Destination, list[int]] = {}
        immediate: dict[int, Outcome] = {}
        for index in sorted(where):
            target = where[index]
            if isinstance(target, Reply):
                immediate[index] = Attempted(target, None)
                continue
            if target.channel not in self.channels:
                immediate[index] = Attempted(_not_running(target), target)
                continue
            until = self.resting_until(target, now)
            if until is not None:
                immediate[index] = Parked(until, self.suspended_reply(target), target)
                continue
            groups.setdefault(target, []).append(index)
        jobs = [
            DeliveryJob(self, work, destination, indices[start : start + self._per_transaction])
            for destination, indices in groups.items()
            for start in range(0, len(indices), self._per_transaction)
        ]
        work.pending += len(jobs)
        self.recorder.record(work, list(immediate), immediate)
        for job in jobs:
            self._pool.submit(job)


class DeliveryJob:
    """One transaction: a message, a destination, some recipients (a :class:`PoolJob`)."""

    def __init__(
        self,
        scheduler: Scheduler,
        work: MessageWork,
        destination: Destination,
        indices: Sequence[int],
    ) -> None:
        self.destination = destination
        self.work = work
        self.indices = tuple(indices)
        self._scheduler = scheduler
        self._transaction: Transaction | None = None
        self._recorded = False

    def run(self, session: IChannelSession) -> Deferred[JobResult]:
        """Run the transaction on ``session`` and record it; never fails."""
        return ensureDeferred(self._run(session))

    async def _run(self, session: IChannelSession) -> JobResult:
        scheduler = self._scheduler
        work = self.work
        try:
            try:
                message = scheduler.queue.open_message(work.queue_id)
            except Exception:
                scheduler.log.info(
                    "deliver: {queue_id}: left the queue before delivery", queue_id=work.queue_id
                )
                self._record({})
                return JobResult(Verdict.KEEP)
            channel = scheduler.channels[self.destination.channel]
            recipients = [
                (i, replace(work.envelope.recipients[i], destination=self.destination))
                for i in self.indices
            ]
            self._transaction = Transaction(
                channel.name,
                channel.mode,
                session,
                message,
                recipients,
                text_chunk=scheduler.text_chunk,
            )
            outcome = await self._transaction.run()
            self._transaction = None
            return self._settle(outcome)
        except Exception:
            scheduler.log.failure(
                "deliver: {queue_id}: delivery to {destination} failed inside the deliverer",
                queue_id=work.queue_id,
                destination=str(self.destination),
            )
            internal = Reply(ReplyCode.AGN, "internal error in the deliverer", enhanced="4.3.0")
            self._record({i: Attempted(internal, self.destination) for i in self.indices})
            return JobResult(Verdict.DROP)

    def _settle(self, outcome: TransactionOutcome) -> JobResult:
        scheduler = self._scheduler
        if outcome.violation is not None:
            self._log_violation(outcome.violation)
        until = None
        if outcome.verdict is Verdict.DEAD:
            reason = outcome.failure or next(
                (r for r in outcome.replies.values() if r.code.action is Action.HOST_DEAD), None
            )
            if reason is not None:
                until = scheduler.mark_dead(self.destination, reason)
        outcomes: dict[int, Outcome] = {}
        for index in self.indices:
            reply = outcome.replies.get(index)
            if reply is not None:
                outcomes[index] = Attempted(reply, self.destination)
            elif outcome.abandoned:
                continue
            elif index in outcome.unasked and until is not None:
                reason = scheduler.suspended_reply(self.destination)
                outcomes[index] = Parked(until, reason, self.destination)
            elif outcome.failure is not None:
                outcomes[index] = Attempted(outcome.failure, self.destination)
        delivered = any(r.code.action is Action.COMMIT for r in outcome.replies.values())
        if delivered and outcome.verdict is Verdict.KEEP:
            scheduler.revive(self.destination)
        self._record(outcomes)
        return JobResult(outcome.verdict, delivered)

    def fail_open(self, reply: Reply, violation: ContractViolation | None) -> Deferred[JobResult]:
        """The session did not open: every recipient of the job gets ``reply``."""
        if violation is not None:
            self._log_violation(violation)
        dead = reply.code.action is Action.HOST_DEAD
        if dead:
            self._scheduler.mark_dead(self.destination, reply)
        self._record({i: Attempted(reply, self.destination) for i in self.indices})
        return defer.succeed(JobResult(Verdict.DEAD if dead else Verdict.DROP))

    def park(self, until: float) -> None:
        """Held back while the destination rests: recorded with no attempt counted."""
        reason = self._scheduler.suspended_reply(self.destination)
        self._record({i: Parked(until, reason, self.destination) for i in self.indices})

    def abandon(self) -> None:
        """Never ran (the deliverer stops): nothing is recorded, the claims are let go."""
        self._record({})

    def cancel(self) -> None:
        """Cancel the transaction in progress (the deliverer stops)."""
        if self._transaction is not None:
            self._transaction.cancel()

    def _record(self, outcomes: Mapping[int, Outcome]) -> None:
        if self._recorded:
            return
        self._recorded = True
        self._scheduler.recorder.record(self.work, self.indices, outcomes)

    def _log_violation(self, violation: ContractViolation) -> None:
        self._scheduler.log.error(
            "deliver: {queue_id}: {violation}; its recipients in this transaction are "
            "deferred and the session is dropped",
            queue_id=self.work.queue_id,
            channel=violation.channel,
            problem=violation.problem,
            violation=str(violation),
            destination=str(self.destination),
        )


def _is_due(status: RecipientStatus, now: float) -> bool:
    if status.state is RecipientState.PENDING:
        return True
    return status.state is RecipientState.DEFERRED and (
        status.next_attempt is None or status.next_attempt <= now
    )


def _not_running(destination: Destination) -> Reply:
    return Reply(
        ReplyCode.AGN,
        f"channel {destination.channel!r} is not running on this relay",
        enhanced="4.3.5",
    )

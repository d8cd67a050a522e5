"""Channel sessions per destination: reuse, slow start, limits, idle close, resting.

Theory of operation
-------------------
The pool is given *jobs* (one transaction each: a message and up to
``recipients_per_transaction`` of its recipients, all for one destination) and runs
them on sessions.  It knows nothing of the queue; a job knows how to run itself on a
session and how to record what happened (:class:`PoolJob`).

* **Workers.**  A worker owns at most one session.  It opens the session for its first
  job (``open_session``), then keeps taking the next job queued for the same
  destination, so consecutive messages for one destination travel over one session
  (MMDF's ``xx_init`` … message, message … ``xx_end``).  With nothing left it waits
  ``idle_timeout`` for more work, then ends the session.
* **Limits.**  Workers (opening, busy or idle) count against three limits: per
  destination, per channel (optional), and in total.  When the total is reached and
  another destination has work, an idle session is closed to make room.
* **Slow start.**  A destination starts with ``initial_per_destination`` sessions at
  most; each transaction that delivered something raises that window by one, up to
  ``per_destination``; each session-level failure (a session that could not open, broke,
  or broke the contract) halves it, down to 1.  So a destination that answers well soon
  gets all the sessions it may have, and one in trouble is not hammered by twenty.
* **Resting.**  The jobs mark a destination dead in the shared
  :class:`~relay.policy.retry.DeadHosts` after a connection-level failure; the pool then
  hands every job still queued for it back (:meth:`PoolJob.park`, no attempt made),
  closes its idle sessions, and lets the busy ones finish their transaction but take
  nothing new.
* **Cleaning up.**  A session that is dropped gets ``abort_message`` then ``end_session``,
  each given ``cleanup_timeout`` and with errors ignored, in the background: a broken
  channel can never hold a worker slot.
* **Stopping.**  :meth:`SessionPool.stop` abandons queued jobs, ends idle sessions, gives
  busy ones ``grace`` seconds, then cancels what is still in progress (the jobs record
  the replies already final and leave the rest queued).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from relay.deliver.sequencer import Verdict, broken_session_reply
from relay.envelope import Destination
from relay.errors import ContractViolation, SessionFailed
from relay.interfaces import IChannel, IChannelSession
from relay.policy.retry import DeadHosts
from relay.reply import Reply

__all__ = ["JobResult", "PoolJob", "PoolLimits", "SessionPool"]

_log = Logger()

_KEEP_IDLE_STATES = 1000  # destinations remembered (with their windows) while they have no work


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a job's transaction went, as far as the session and slow start care."""

    verdict: Verdict
    delivered: bool = False


class PoolJob(Protocol):
    """One transaction for the pool to run; implemented by the scheduler's jobs."""

    @property
    def destination(self) -> Destination:
        """Where the job goes."""
        ...

    def run(self, session: IChannelSession) -> Deferred[JobResult]:
        """Run the transaction on ``session`` and record it; never fails."""
        ...

    def fail_open(self, reply: Reply, violation: ContractViolation | None) -> Deferred[JobResult]:
        """The session could not be opened: record ``reply`` for every recipient."""
        ...

    def park(self, until: float) -> None:
        """The destination rests until ``until``: hold the job back, no attempt counted."""
        ...

    def abandon(self) -> None:
        """The pool is stopping before the job ran: record nothing."""
        ...

    def cancel(self) -> None:
        """The pool is stopping while the job runs: end it now (its run() then fires)."""
        ...


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """The pool's limits: ``[deliver]``'s concurrency keys (no defaults here: they are the
    configuration's, :class:`relay.config.DeliverSection`), how long an idle session
    stays open, and the caps of some channels."""

    initial_per_destination: int
    per_destination: int
    total: int
    idle_timeout: float
    per_channel: Mapping[str, int] = field(default_factory=dict)
    cleanup_timeout: float = 60.0

    def __post_init__(self) -> None:
        if min(self.initial_per_destination, self.per_destination, self.total) < 1:
            raise ValueError("session limits must be at least 1")
        if any(limit < 1 for limit in self.per_channel.values()):
            raise ValueError("per-channel session limits must be at least 1")


@dataclass(eq=False)
class _Destination:
    destination: Destination
    channel: IChannel
    window: int
    jobs: deque[PoolJob] = field(default_factory=deque)
    workers: set[_Worker] = field(default_factory=set)
    idle: deque[_Worker] = field(default_factory=deque)


@dataclass(eq=False)
class _Worker:
    state: _Destination
    session: IChannelSession | None = None
    job: PoolJob | None = None
    opening: Deferred[Any] | None = None
    waiting: Deferred[PoolJob | None] | None = None
    idle_timer: IDelayedCall | None = None
    done: Deferred[None] | None = None


class SessionPool:
    """Runs jobs on channel sessions within the limits; see the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        channels: Mapping[str, IChannel],
        dead_hosts: DeadHosts,
        limits: PoolLimits,
        *,
        log: Logger | None = None,
    ) -> None:
        self._clock = clock
        self._channels = channels
        self._dead = dead_hosts
        self._limits = limits
        self._log = log if log is not None else _log
        self._states: dict[Destination, _Destination] = {}
        self._backlog: dict[Destination, _Destination] = {}  # states with queued jobs
        self._workers: set[_Worker] = set()
        self._per_channel: dict[str, int] = {}
        self._cleanups: set[Deferred[None]] = set()
        self._dispatching = False
        self._again = False
        self._held = 0
        self._stopping = False
        self.sessions_opened = 0  # open_session calls made, for tests and the benchmark

    # --- what the scheduler and the tests see ---------------------------------------------

    def submit(self, job: PoolJob) -> None:
        """Queue ``job`` behind the others for its destination and start it when allowed."""
        if self._stopping:
            job.abandon()
            return
        destination = job.destination
        until = self._resting_until(destination)
        if until is not None:
            job.park(until)
            return
        state = self._states.get(destination)
        if state is None:
            channel = self._channels[destination.channel]
            window = min(self._limits.initial_per_destination, self._limits.per_destination)
            state = self._states[destination] = _Destination(destination, channel, window)
        state.jobs.append(job)
        self._backlog[destination] = state
        self._dispatch()

    @property
    def total_sessions(self) -> int:
        """Workers holding (or opening) a session now, over every destination."""
        return len(self._workers)

    def sessions(self, destination: Destination) -> int:
        """Workers holding (or opening) a session to ``destination`` now."""
        state = self._states.get(destination)
        return 0 if state is None else len(state.workers)

    def window(self, destination: Destination) -> int | None:
        """The slow-start window of ``destination`` (None if the pool has no work for it)."""
        state = self._states.get(destination)
        return None if state is None else state.window

    def queued(self, destination: Destination) -> int:
        """Jobs waiting for a session to ``destination``."""
        state = self._states.get(destination)
        return 0 if state is None else len(state.jobs)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Queue several jobs, then start them: a scan's jobs are dispatched together."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                self._dispatch()

    def start(self) -> None:
        """Take jobs again after :meth:`stop` (a service started again)."""
        self._stopping = False

    def kick(self) -> None:
        """Look for work that can start now (after a destination revived, say)."""
        self._dispatch()

    def stop(self, grace: float) -> Deferred[None]:
        """Abandon queued jobs, end idle sessions, cancel busy ones after ``grace`` seconds."""
        return ensureDeferred(self._stop(grace))

    async def _stop(self, grace: float) -> None:
        self._stopping = True
        self._backlog.clear()
        for state in list(self._states.values()):
            jobs = list(state.jobs)
            state.jobs.clear()
            for job in jobs:
                job.abandon()
            for worker in list(state.idle):
                self._wake(worker, None)
        running = [w.done for w in self._workers if w.done is not None]
        timer = self._clock.callLater(max(grace, 0.0), self._cancel_all)
        if running:
            await DeferredList(running, consumeErrors=True)
        if timer.active():
            timer.cancel()
        if self._cleanups:
            await DeferredList(list(self._cleanups), consumeErrors=True)

    def _cancel_all(self) -> None:
        for worker in list(self._workers):
            if worker.opening is not None:
                worker.opening.cancel()
            if worker.job is not None:
                worker.job.cancel()

    # --- dispatching ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start or resume workers for queued jobs; never re-entered (loops instead)."""
        if self._held:
            return
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for destination, state in list(self._backlog.items()):
                    self._fill(state)
                    if not state.jobs:
                        self._backlog.pop(destination, None)
                self._forget_empty()
        finally:
            self._dispatching = False

    def _fill(self, state: _Destination) -> None:
        while state.jobs and not self._stopping:
            if state.idle:
                self._wake(state.idle[0], state.jobs.popleft())
            elif self._may_start(state):
                self._start(state, state.jobs.popleft())
            elif len(self._workers) >= self._limits.total and self._close_idle(state):
                continue
            else:
                return

    def _may_start(self, state: _Destination) -> bool:
        limits = self._limits
        name = state.destination.channel
        channel_limit = limits.per_channel.get(name)
        return (
            len(state.workers) < state.window
            and len(self._workers) < limits.total
            and (channel_limit is None or self._per_channel.get(name, 0) < channel_limit)
        )

    def _close_idle(self, wanting: _Destination) -> bool:
        """End one idle session of another destination to make room; True if one was."""
        for worker in self._workers:
            if worker.waiting is not None and worker.state is not wanting:
                self._wake(worker, None)
                return True
        return False

    def _forget_empty(self) -> None:
        """Forget destinations with nothing to do, once there are many (keeping recent ones'
        slow-start windows across short gaps between messages)."""
        if len(self._states) <= _KEEP_IDLE_STATES:
            return
        for destination in [d for d, s in self._states.items() if not s.jobs and not s.workers]:
            del self._states[destination]

    def _start(self, state: _Destination, job: PoolJob) -> None:
        worker = _Worker(state)
        state.workers.add(worker)
        self._workers.add(worker)
        name = state.destination.channel
        self._per_channel[name] = self._per_channel.get(name, 0) + 1
        worker.done = ensureDeferred(self._work(worker, job))

    # --- a worker ---------------------------------------------------------------------------

    async def _work(self, worker: _Worker, first: PoolJob) -> None:
        state = worker.state
        job: PoolJob | None = first
        try:
            while job is not None:
                worker.job = job
                result = await self._run_one(worker, job)
                worker.job = None
                self._account(state, result)
                if result.verdict is not Verdict.KEEP:
                    self._drop_session(worker, abort=True)
                    if result.verdict is Verdict.DEAD:
                        self._rest(state)
                    break
                job = self._next_job(worker)
                if job is None and not self._stopping:  # a stopping pool keeps none idle
                    job = await self._idle(worker)
        except Exception:
            self._log.failure(
                "deliver: session worker for {destination} failed",
                destination=str(state.destination),
            )
        finally:
            worker.job = None
            self._drop_session(worker, abort=False)
            self._retire(worker)
            self._dispatch()

    async def _run_one(self, worker: _Worker, job: PoolJob) -> JobResult:
        if worker.session is None:
            session = await self._open(worker, job)
            if isinstance(session, JobResult):
                return session
            worker.session = session
            if self._stopping:
                job.abandon()
                return JobResult(Verdict.DROP)
        return await job.run(worker.session)

    async def _open(self, worker: _Worker, job: PoolJob) -> IChannelSession | JobResult:
        state = worker.state
        name = state.channel.name
        self.sessions_opened += 1
        try:
            opening = state.channel.open_session(state.destination)
            if not isinstance(opening, Deferred):
                problem = f"open_session returned {type(opening).__name__}, not a Deferred"
                violation = ContractViolation(name, problem)
                reply = broken_session_reply("open_session", violation)
                return await job.fail_open(reply, violation)
            worker.opening = opening
            session: IChannelSession = await opening
            return session
        except SessionFailed as e:
            reply = e.reply
            if isinstance(reply, Reply) and (reply.code.is_temporary or reply.code.is_permanent):
                return await job.fail_open(reply, None)
            violation = ContractViolation(
                name, f"open_session failed with SessionFailed({reply!r})"
            )
            return await job.fail_open(broken_session_reply("open_session", e), violation)
        except CancelledError as e:
            if self._stopping:
                job.abandon()
                return JobResult(Verdict.DROP)
            return await job.fail_open(broken_session_reply("open_session", e), None)
        except Exception as e:
            violation = ContractViolation(name, f"open_session failed without SessionFailed: {e!r}")
            return await job.fail_open(broken_session_reply("open_session", e), violation)
        finally:
            worker.opening = None

    def _account(self, state: _Destination, result: JobResult) -> None:
        """Slow start: grow by one per delivering transaction, halve on a session failure."""
        if result.verdict is Verdict.KEEP:
            if result.delivered and state.window < self._limits.per_destination:
                state.window += 1
                self._dispatch()
        else:
            state.window = max(1, state.window // 2)

    def _next_job(self, worker: _Worker) -> PoolJob | None:
        state = worker.state
        if self._stopping:
            return None
        if self._resting_until(state.destination) is not None:
            self._rest(state)
            return None
        return state.jobs.popleft() if state.jobs else None

    def _idle(self, worker: _Worker) -> Deferred[PoolJob | None]:
        waiting: Deferred[PoolJob | None] = Deferred()
        worker.waiting = waiting
        worker.state.idle.append(worker)
        worker.idle_timer = self._clock.callLater(
            self._limits.idle_timeout, self._wake, worker, None
        )
        return waiting

    def _wake(self, worker: _Worker, job: PoolJob | None) -> None:
        """Give an idle worker its next job, or None to end its session."""
        waiting, worker.waiting = worker.waiting, None
        if waiting is None:
            return
        timer, worker.idle_timer = worker.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if worker in worker.state.idle:
            worker.state.idle.remove(worker)
        waiting.callback(job)

    def _rest(self, state: _Destination) -> None:
        """The destination is dead: hand back its queued jobs and end its idle sessions."""
        until = self._resting_until(state.destination)
        if until is None:
            return
        jobs = list(state.jobs)
        state.jobs.clear()
        self._backlog.pop(state.destination, None)
        for job in jobs:
            job.park(until)
        for worker in list(state.idle):
            self._wake(worker, None)

    def _resting_until(self, destination: Destination) -> float | None:
        if not self._dead.is_dead(destination, self._clock.seconds()):
            return None
        return self._dead.dead_until(destination)

    def _retire(self, worker: _Worker) -> None:
        state = worker.state
        state.workers.discard(worker)
        self._workers.discard(worker)
        name = state.destination.channel
        self._per_channel[name] -= 1
        if not self._per_channel[name]:
            del self._per_channel[name]

    # --- ending sessions ----------------------------------------------------------------------

    def _drop_session(self, worker: _Worker, *, abort: bool) -> None:
        session, worker.session = worker.session, None
        if session is None:
            return
        cleanup = ensureDeferred(self._close(session, abort))
        if not cleanup.called:
            self._cleanups.add(cleanup)
            cleanup.addBoth(lambda _: self._cleanups.discard(cleanup))

    async def _close(self, session: IChannelSession, abort: bool) -> None:
        if abort:
            await self._quietly(session.abort_message)
        await self._quietly(session.end_session)

    async def _quietly(self, call: Callable[[], object]) -> None:
        """Make a clean-up call, ignoring its errors and giving it ``cleanup_timeout``."""
        try:
            result = call()
        except Exception:
            return
        if not isinstance(result, Deferred):
            return
        timer = self._clock.callLater(self._limits.cleanup_timeout, result.cancel)
        try:
            await result
        except Exception:
            pass
        finally:
            if timer.active():
                timer.cancel()

"""Gateway worker processes: more SMTP sessions than one reactor thread can carry.

Why: a Python SMTP session costs a few hundred microseconds of CPU per message (Twisted's
per-event dispatch, the engine, the policy, the syscalls), all in the one reactor thread,
so one process tops out at one core while the machine has more.  Postfix answers the same
problem with many ``smtpd`` processes; so does this.

How: the spool's process binds every listener itself (so a port it cannot bind stops the
relay at start, and a privileged port needs no privileges in the workers), then starts
``[smtp] workers`` copies of :mod:`relay.gateway.worker`, each handed the listening
sockets (plain TCP/UNIX; implicit-TLS ones too, the worker doing the TLS) and one end of
a UNIX socket pair.  All the processes accept on the same sockets: the kernel gives each
connection to whichever process asks first, so a busy process takes fewer.  A worker
runs the same gateway as the spool's process, built from the same configuration text
(sent in the link's HELLO), but stores each message through the link
(:mod:`relay.handoff`): the spool's process writes it, fsyncs, and only then does the
worker answer 250.

**Who accepts.**  The spool's process accepts on the sockets too, except while its
deliverer is busy and at least one worker says it is READY: then it stops reading its
listening sockets (checked every :data:`BALANCE_INTERVAL` seconds, and whenever a
worker changes its READY) and the workers take every connection.  Why: a process that
is delivering answers SMTP slowly, and its slow sessions hold the clients' connection
slots.  ``bench/relay_e2e.py --main-accepts always|never|auto`` compares the choices
(the figures are in the README).  With no worker ready, or nothing to deliver, it accepts as before
(``bench/smtp_in.py``: both processes take mail).

A worker withdraws its READY and stops accepting when it holds its share of
``max_sessions`` (both come back with the first free slot), when it stops, and when its
link drops; and the spool's process stops accepting too while it holds its own share
and a worker has room.  So a client is refused only when every process is full.

Limits: ``max_sessions`` and ``max_text_in_memory`` are divided among the processes, so
their totals hold; ``max_sessions_per_client`` is kept by each process for its own
sessions.  The failed-AUTH count is the spool's process's, which every worker asks over
its link (:mod:`relay.handoff.remote_auth`), so ``auth_max_failures`` holds relay-wide.

A worker that exits, or cannot be started, is tried again (after 1 s, doubling to 60 s
while it keeps dying young); its output is logged here line by line.  A worker whose
link closes (the spool's process went away) exits.  At stop, workers get SIGTERM,
finish what is storing, and are killed if they are still there after
:data:`STOP_GRACE` seconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import relay
from relay.config import Config
from relay.gateway.limits import AuthThrottle, LocalAuthThrottle
from relay.gateway.service import Gateway
from relay.handoff.codec import Hello
from relay.handoff.spool_side import StoreServer, frame_limit
from relay.interfaces import IHandoffStore, QueueSource

__all__ = ["BALANCE_INTERVAL", "STOP_GRACE", "GatewayWorkers"]

_log = Logger()

STOP_GRACE = 30.0  # seconds a stopping worker has before SIGKILL
BALANCE_INTERVAL = 0.1  # seconds between checks of who should accept
_FIRST_DELAY = 1.0
_MAX_DELAY = 60.0
_YOUNG = 10.0  # a worker that dies younger than this doubles the restart delay
_MAX_LINE = 64 * 1024


class Busy(Protocol):
    """What the workers ask of the spool's process's deliverer: is it delivering now?"""

    @property
    def busy(self) -> bool:
        """Whether deliveries are in flight."""
        ...


class GatewayWorkers(Service):
    """Starts, watches and stops the gateway worker processes."""

    def __init__(
        self,
        config: Config,
        count: int,
        gateway: Gateway,
        queue: QueueSource,
        channels: frozenset[str],
        reactor: Any,
        main_busy: Busy | None = None,
        *,
        auth: AuthThrottle,
    ) -> None:
        """``gateway`` is this process's own: the workers get its listening sockets once
        it listens, and follow its session count; workers start once ``queue`` (the
        spool) has opened.  ``main_busy`` says whether this process has deliveries in
        flight (its deliverer); ``auth`` is the failed-AUTH count this process's own
        gateway uses, which the workers ask too."""
        self._config = config
        self._auth = auth
        self._count = count
        self._gateway = gateway
        self._queue_source = queue
        self._queue: IHandoffStore | None = None
        self._channels = channels
        self._reactor = reactor
        self.workers: dict[int, _Worker] = {}
        # Sessions refused by workers that have exited: the metric never goes back.
        self.retired_refused: Counter[str] = Counter()
        self._restarts: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self.main_busy = main_busy  # replaceable: bench/relay_e2e.py --main-accepts
        self._main_full = False
        self.main_accepting = True
        self._balancer = LoopingCall(self._balance)
        self._balancer.clock = reactor
        gateway.limiter.add_listener(self.main_sessions)

    def startService(self) -> None:
        """Start every worker once the spool is open."""
        super().startService()  # type: ignore[no-untyped-call]
        # A spool that does not open leaves no worker to start (the gateway and the
        # relay say why).
        self._queue_source.when_ready().addCallbacks(self._start_all, lambda _: None)
        self._balancer.start(BALANCE_INTERVAL, now=False)

    def _start_all(self, queue: IHandoffStore) -> None:
        self._queue = queue
        if self.running:
            for index in range(1, self._count + 1):
                self._start_one(index)

    def _start_one(self, index: int) -> None:
        """Start worker ``index``; if that fails (no fds, no memory), try again later."""
        self._restarts.pop(index, None)
        try:
            self._spawn(index)
        except Exception:
            _log.failure("smtp worker {index} could not be started", index=index)
            self._retry(index, lived=0.0)

    def stopService(self) -> Deferred[list[None]]:
        """SIGTERM every worker; fire when all have exited (SIGKILL after the grace)."""
        super().stopService()  # type: ignore[no-untyped-call]
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._balancer.running:
            self._balancer.stop()
        self._set_main_accepting(True)
        waiting = [worker.stop(self._reactor) for worker in self.workers.values()]
        return defer.gatherResults(waiting, consumeErrors=True)

    # --- one worker ---------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        config = self._config
        hello = Hello(
            config_text=config.text,
            base_dir=str(config.base_dir),
            channels=tuple(sorted(self._channels)),
            index=index,
            processes=self._count + 1,
        )
        # The link (a stream: STORE out, HELLO and refusals back) and the early answers
        # (datagrams the spool's writer thread sends: see relay.handoff).
        acks, their_acks = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        acks.setblocking(False)
        limit = frame_limit(config.smtp.max_message_size)
        server = StoreServer(
            hello,
            self._queue,
            limit,
            acks=acks,
            auth=LocalAuthThrottle(self._auth),
            on_ready_change=self._rebalance,
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _OneProtocol(server))
            args = [sys.executable, "-m", "relay.gateway.worker", "--link", "3", "--acks", "4"]
            child_fds: dict[int, int | str] = {
                0: "w",
                1: "r",
                2: "r",
                3: theirs.fileno(),
                4: their_acks.fileno(),
            }
            for fd, shared in enumerate(self._gateway.shared_listeners(), start=5):
                child_fds[fd] = shared.fd
                kind = "tls" if shared.tls else "plain"
                args += ["--listen", f"{fd}:{int(shared.family)}:{kind}"]
            worker = _Worker(self, index, server, self._reactor.seconds())
            worker.process = self._reactor.spawnProcess(
                worker, sys.executable, args, env=_environment(), childFDs=child_fds
            )
        except BaseException:
            acks.close()
            raise
        finally:
            ours.close()
            theirs.close()
            their_acks.close()
        self.workers[index] = worker
        _log.info("smtp worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _balance(self) -> None:
        """Leave the sockets to the workers while this process is busy delivering."""
        ready = any(
            worker.server.ready and not worker.server.lost and not worker.gone
            for worker in self.workers.values()
        )
        busy = self.main_busy is not None and self.main_busy.busy
        self._set_main_accepting(not (ready and (busy or self._main_full)))

    def main_sessions(self, total: int, limit: int) -> None:
        """The spool's process's own gateway opened or closed a session (its limiter)."""
        full = total >= limit
        if full != self._main_full:
            self._main_full = full
            self._rebalance()

    def _rebalance(self) -> None:
        """A worker said it is (no longer) taking connections: act on it now."""
        if self.running:
            self._balance()

    def _set_main_accepting(self, accept: bool) -> None:
        if accept == self.main_accepting:
            return
        self.main_accepting = accept
        for shared in self._gateway.shared_listeners():
            if shared.port is not None:
                if accept:
                    shared.port.startReading()
                else:
                    shared.port.stopReading()

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.retired_refused.update(worker.server.sessions.refused)
        if self.running:
            self._balance()  # no ready worker left: accept here at once
        if not self.running:
            return
        delay = self._retry(worker.index, lived=self._reactor.seconds() - worker.started)
        _log.warn(
            "smtp worker {index} (pid {pid}) exited: {why}; starting another in {delay:.0f}s",
            index=worker.index,
            pid=worker.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )

    def _retry(self, index: int, lived: float) -> float:
        """Start worker ``index`` again later: 1 s, doubling to 60 s while it dies young."""
        previous = self._delays.get(index)
        young = lived < _YOUNG
        delay = _FIRST_DELAY if previous is None or not young else min(previous * 2, _MAX_DELAY)
        self._delays[index] = delay
        self._restarts[index] = self._reactor.callLater(delay, self._start_one, index)
        return delay


def _environment() -> dict[str, str]:
    """The worker's environment: ours, with this ``relay`` package first on its path."""
    env = dict(os.environ)
    package_root = str(Path(relay.__file__).resolve().parent.parent)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_root if not path else f"{package_root}{os.pathsep}{path}"
    return env


class _OneProtocol(Factory):
    """Hands the one prepared protocol to an adopted connection."""

    def __init__(self, protocol: StoreServer) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> StoreServer:
        self._protocol.factory = self
        return self._protocol


class _Worker(ProcessProtocol):
    """One worker process: its output to our log, its end to the service."""

    def __init__(
        self, service: GatewayWorkers, index: int, server: StoreServer, started: float
    ) -> None:
        self.service = service
        self.index = index
        self.server = server
        self.started = started
        self.process: Any = None
        self._partial = {1: b"", 2: b""}
        self._exited: Deferred[None] = Deferred()
        self._gone = False

    @property
    def gone(self) -> bool:
        """Whether the process has exited."""
        return self._gone

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Log the worker's output, a line at a time (a long line is cut, never kept)."""
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > _MAX_LINE:
            lines.append(rest[:_MAX_LINE])
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._log_line(line)

    def _log_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            return
        level, _, text = line.partition(" ")
        emit = {
            "warn": _log.warn,
            "error": _log.error,
            "critical": _log.critical,
        }.get(level, _log.info)
        shown = text if level in ("debug", "info", "warn", "error", "critical") else line
        emit("smtp worker {index}: {line}", index=self.index, line=shown)

    def processEnded(self, reason: Failure) -> None:
        """Flush what is left of its output; tell the service."""
        for fd, rest in self._partial.items():
            if rest:
                self._log_line(rest)
            self._partial[fd] = b""
        self._gone = True
        self.server.close_acks()
        self.service._ended(self, reason)
        self._exited.callback(None)

    def stop(self, reactor: Any) -> Deferred[None]:
        """SIGTERM now, SIGKILL after the grace; fire when it has exited."""
        if self._gone:
            return defer.succeed(None)
        with contextlib.suppress(ProcessExitedAlready):  # it is exiting already
            self.process.signalProcess("TERM")
        kill = reactor.callLater(STOP_GRACE, self._kill)

        def exited(result: None) -> None:
            if kill.active():
                kill.cancel()

        return self._exited.addCallback(exited)

    def _kill(self) -> None:
        if not self._gone:
            _log.warn("smtp worker {index} did not stop; killing it", index=self.index)
            with contextlib.suppress(ProcessExitedAlready):
                self.process.signalProcess("KILL")

"""A gateway worker process: ``python -m relay.gateway.worker`` (started by the relay).

It is started by :class:`relay.gateway.workers.GatewayWorkers`, never by hand: it gets
one end of a UNIX socket pair as ``--link FD`` and the listening sockets as
``--listen FD:FAMILY:plain|tls``, waits for the spool's process to say HELLO (the
configuration text, the running channels, its share of the limits), builds the same
gateway as the spool's process runs on the adopted sockets, and stores every message it
accepts through the link.  Its log goes to stderr, one ``LEVEL text`` line per event,
which the spool's process puts in the relay's log.  It runs on
:class:`relay.runtime.leanreactor.LeanEPollReactor`, which drops the per-event log context that
only such a system field would use.

It ends when the link closes (the spool's process is gone: no spool, no mail) or on
SIGTERM, after the stores still in flight have been answered (at most
:data:`DRAIN_LIMIT` seconds).  Exit codes follow sysexits: 64 for bad arguments, 78 for
a configuration the spool's process sent that does not load here.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import (
    FileLogObserver,
    LogEvent,
    Logger,
    LogLevel,
    eventAsText,
    globalLogBeginner,
)

from relay.channels.local.users import build_local_recipients
from relay.config import ConfigError, parse_config
from relay.gateway.service import AdoptedListener, Gateway, SharedListener, build_gateway
from relay.handoff.codec import Hello
from relay.handoff.worker_side import AckReader, StoreClient
from relay.policy.routing import Router
from relay.queue.ready import QueueReady
from relay.runtime.leanreactor import install as install_lean_reactor

__all__ = ["DRAIN_LIMIT", "SESSIONS_REPORT_INTERVAL", "main"]

_log = Logger()

DRAIN_LIMIT = 20.0  # seconds a stopping worker waits for answers to stores in flight
SESSIONS_REPORT_INTERVAL = 1.0  # seconds between reports of session counts, at most
EX_USAGE = 64
EX_CONFIG = 78


def _listener(text: str) -> SharedListener:
    """``FD:FAMILY:plain|tls`` from the command line."""
    try:
        fd, family, kind = text.split(":")
        if kind not in ("plain", "tls"):
            raise ValueError(kind)
        return SharedListener(int(fd), int(family), kind == "tls")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not FD:FAMILY:plain|tls: {text!r}") from None


def _line_observer(out: IO[str]) -> FileLogObserver:
    """``LEVEL text`` lines (tracebacks included): the spool's process adds the rest."""

    def line(event: LogEvent) -> str:
        level = event.get("log_level", LogLevel.info)
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        return "".join(f"{level.name} {part}\n" for part in text.splitlines() or [""])

    return FileLogObserver(out, line)


class _Worker:
    """The worker's state: the link, then (after HELLO) the gateway."""

    def __init__(self, reactor: Any, listeners: list[SharedListener]) -> None:
        self.reactor = reactor
        self.listeners = listeners
        self.client = StoreClient(self.hello, self.lost)
        self.gateway: Gateway | None = None
        self.exit_code = 0
        self._stopping = False
        self._accepting = False  # what we last told the spool's process
        self._sessions_report: Any = None  # the delayed call that reports session counts

    def hello(self, hello: Hello) -> None:
        """Build and start the gateway the spool's process described."""
        try:
            config = parse_config(hello.config_text, Path(hello.base_dir))
        except ConfigError as e:
            for problem in e.problems:
                print(f"critical configuration: {problem}", file=sys.stderr, flush=True)
            self.exit_code = EX_CONFIG
            self.request_stop()
            return
        recipients = build_local_recipients(config)
        router = Router(config, channels=frozenset(hello.channels))
        gateway = build_gateway(
            config,
            QueueReady.of(self.client),  # the link is the store, open from the start
            recipients,
            self.reactor,
            router=router,
            processes=hello.processes,
            adopted=self.listeners,
            auth_throttle=self.client.auth,  # the relay's count, in the spool's process
        )
        gateway.limiter.add_listener(self.sessions_changed)  # before any session opens
        gateway.startService()  # type: ignore[no-untyped-call]
        for shared in self.listeners:  # adopted (duplicated) by now
            os.close(shared.fd)
        self.gateway = gateway
        self._report(True)
        _log.info(
            "accepting on {count} socket(s), {share} of the session limits",
            count=len(self.listeners),
            share=f"1/{hello.processes}",
        )

    def sessions_changed(self, total: int, limit: int) -> None:
        """Full (our share of max_sessions): stop accepting and say so; with room, resume.

        The counts themselves go to the spool's process for its metrics, at most once
        every :data:`SESSIONS_REPORT_INTERVAL` seconds (not once per session).
        """
        if self._sessions_report is None:
            self._sessions_report = self.reactor.callLater(
                SESSIONS_REPORT_INTERVAL, self._report_sessions
            )
        if self._stopping:
            return
        if self._accepting and total >= limit:
            self._report(False)
        elif not self._accepting and total < limit and self.gateway is not None:
            self._report(True)

    def _report_sessions(self) -> None:
        self._sessions_report = None
        gateway = self.gateway
        if gateway is not None:
            limiter = gateway.limiter
            self.client.sessions(limiter.total, dict(limiter.refused))

    def _report(self, accepting: bool) -> None:
        """Stop (or resume) accepting, and say so: the spool's process takes over."""
        self._accepting = accepting
        for port in self._ports():
            if accepting:
                port.startReading()
            else:
                port.stopReading()
        self.client.ready(accepting)

    def _ports(self) -> list[Any]:
        """The listening ports this worker adopted (empty before HELLO)."""
        gateway = self.gateway
        if gateway is None:
            return []
        return [
            child.port
            for child in gateway
            if isinstance(child, AdoptedListener) and child.port is not None
        ]

    def lost(self, why: str) -> None:
        """No link, no spool: stop accepting and exit."""
        self.request_stop()

    def request_stop(self) -> None:
        """Stop the reactor, once (SIGTERM may come from the relay and a supervisor)."""
        if not self._stopping and self.reactor.running:
            self._stopping = True
            self.reactor.stop()

    def on_signal(self, signum: int, frame: object) -> None:
        """SIGTERM/SIGINT: stop at the reactor's next turn."""
        self.reactor.callFromThread(self.request_stop)

    def stop(self) -> Deferred[None] | None:
        """Stop listening and end idle sessions; wait for stores in flight."""
        gateway = self.gateway
        if gateway is None:
            return None
        self._stopping = True
        self.client.ready(False)  # before it stops listening: the spool's process takes over
        # The gateway stops its listeners, then its sessions (one child after another):
        # only then is no store left to begin.
        stopped: Deferred[None] = maybeDeferred(gateway.stopService)
        stopped.addErrback(lambda f: _log.failure("stopping the gateway failed", f))
        stopped.addCallback(lambda _: self.client.drained())
        stopped.addTimeout(DRAIN_LIMIT, self.reactor)
        stopped.addErrback(lambda _: None)
        return stopped


def main(argv: list[str] | None = None) -> int:
    """Run one worker until its link closes or it is told to stop."""
    parser = argparse.ArgumentParser(prog="relay.gateway.worker", description=__doc__)
    parser.add_argument("--link", type=int, required=True, metavar="FD")
    parser.add_argument("--acks", type=int, metavar="FD", help="datagrams of early answers")
    parser.add_argument("--listen", type=_listener, action="append", default=[])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EX_USAGE if e.code else 0
    reactor = install_lean_reactor()  # its log lines carry no system field (see there)
    globalLogBeginner.beginLoggingTo([_line_observer(sys.stderr)], redirectStandardIO=False)
    worker = _Worker(reactor, args.listen)
    reactor.adoptStreamConnection(
        args.link, socket.AF_UNIX, Factory.forProtocol(lambda: worker.client)
    )
    os.close(args.link)
    if args.acks is not None:
        acks = socket.socket(fileno=args.acks)
        reactor.addReader(AckReader(acks, worker.client))
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, worker.on_signal)
    reactor.run(installSignalHandlers=False)
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())

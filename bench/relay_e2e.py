"""End-to-end relaying: smtp-source → relay → smtp-sink, against Postfix doing the same.

Prints ONE JSON line.  Both relays get the same load from Postfix's ``smtp-source`` (N
messages of 4 KiB to ``to@sink.test``, one message per connection, 20 concurrent
sessions) and pass it on to the same kind of sink: Postfix's ``smtp-sink``, started
fresh for each run, which appends every message to a dump file (``-D``) and prints a
running message counter (``-c``) that this script reads as it goes.  A run is timed
from smtp-source's start (its first connection) until the sink's counter reaches N.
Then the run must be clean: the sender's queue drains to empty (nothing deferred for a
retry), and the sink holds exactly N messages whose ``Message-Id``s (smtp-source makes
each one unique) are all different: every message arrived, and arrived once.

* relay: the whole relay as ``twistd relay`` builds it (``relay.tap.build_service``: the
  spool with fsync before the 250, the deliverer, the SMTP channel) in a child process,
  with a ``[[route]]`` for ``sink.test`` to the sink (``tls = "none"``), its log written
  to a file.  Everything else is the default, notably the deliverer's
  concurrency (5 connections per destination at first, growing to 20).  The gateway's
  session limits are raised (500) so that smtp-source's reconnects never hit them.
* Postfix: a throw-away instance (``postfix_harness``: own directories, loopback, a
  high port) with ``relayhost = [127.0.0.1]:SINK``, ``mydestination`` empty,
  ``mynetworks = 127.0.0.0/8``, ``smtp_tls_security_level = none``; no reverse DNS
  lookups of clients (``smtpd_peername_lookup = no``; the relay does none either);
  empty ``alias_maps`` (no local delivery here, no ``/etc/aliases``).  Everything else
  is Postfix's default: queue manager, ``in_flow_delay``, process limit (100),
  destination concurrency (initial 5, limit 20: the relay's defaults copy these),
  connection caching.  Its cleanup fsyncs each queue file before smtpd says 250.

Usage: ``python bench/relay_e2e.py [--messages N] [--rounds R] [--sessions S] [--size B]``.
The two are measured alternately R times (default 3) and the medians compared, so
background load on a shared machine hits both alike; the default N (8 000) keeps the
whole script near two minutes here.  ``relay_cpu_us_per_msg`` is the relay process's
CPU (user + system, all threads: reactor, spool writer and readers) from start to
empty queue, per message; ``relay_reactor_cpu_us_per_msg`` the reactor thread alone
(the relay's bottleneck: one core); ``relay_fsyncs_per_msg`` the spool's fdatasync
batches per message (its store and its removal each need one durable record).
``--commit-delay SECONDS`` sets the spool writer's commit delay (``0``: none), so that
``relay/queue/writer.py``'s figures can be measured again.  ``--profile FILE`` writes
cProfile stats of the relay's reactor thread (the last round's) to FILE;
``--relay-only`` skips Postfix.  ``--serve ...`` is internal: it runs the relay side.

Every process is started by this script and stopped by it, on failure too (SIGTERM to
the script unwinds the same way); a run that stalls fails after bounded waits
(``CATCH_UP_LIMIT``, ``DRAIN_LIMIT``) instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from postfix_harness import Postfix, drive, free_port, process_cpu_seconds, wait_listening

ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = "/usr/sbin/smtp-sink"
RECIPIENT = "to@sink.test"
SENDER = "from@x.test"
CATCH_UP_LIMIT = 60.0  # seconds the sink may lag behind smtp-source's end
DRAIN_LIMIT = 60.0  # seconds a queue may take to empty after the sink has everything
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


# --------------------------------------------------------------------------- the sink


class Sink:
    """smtp-sink on 127.0.0.1: dumps every message and counts them as they arrive."""

    _COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-relay-sink-"))
        self.dir.chmod(0o777)  # smtp-sink drops to nobody as root and writes here
        self.dump = self.dir / "dump"
        self.port = free_port()
        self._count = 0
        self._changed = threading.Condition()
        self._reached: dict[int, float] = {}
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [SMTP_SINK, *user, "-c", "-D", str(self.dump), f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_listening(self.port)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        """Follow the ``-c`` counter lines (``sess=.. quit=.. mesg=N``, ended by CR)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.perf_counter()
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            counts = [int(m.group(1)) for r in records if (m := self._COUNTER.search(r))]
            if counts:
                with self._changed:
                    self._count = max(self._count, *counts)
                    self._reached.setdefault(self._count, now)
                    self._changed.notify_all()

    @property
    def count(self) -> int:
        """Messages received so far."""
        with self._changed:
            return self._count

    def wait_for(self, messages: int, limit: float) -> float | None:
        """The ``perf_counter`` time the count reached ``messages``; None after ``limit`` s."""
        with self._changed:
            self._changed.wait_for(lambda: self._count >= messages, limit)
            return min((t for n, t in self._reached.items() if n >= messages), default=None)

    def message_ids(self) -> list[str]:
        """The Message-Id of every message dumped (the header is in each dump's first block)."""
        text = self.dump.read_bytes() if self.dump.exists() else b""
        return re.findall(r"^Message-Id:\s*(\S+)", text.decode("latin-1"), re.M | re.I)

    def stop(self) -> None:
        """Stop smtp-sink and remove its dump."""
        try:
            self.process.terminate()
            self.process.wait(timeout=10)
        finally:
            self._reader.join(timeout=5)
            if self.process.stdout is not None:
                self.process.stdout.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Sample:
    """One measured run."""

    seconds: float  # smtp-source start → the sink has all N
    inbound_seconds: float  # smtp-source start → smtp-source done (all accepted)
    cpu: float = 0.0  # relay only: process CPU seconds, start → queue empty
    reactor_cpu: float = 0.0  # relay only: the reactor thread's share
    fsyncs: int = 0  # relay only: the spool's fdatasync batches


def _timed_load(sink: Sink, port: int, messages: int, sessions: int, size: int) -> Sample:
    """Drive smtp-source at ``port`` and wait until ``sink`` has every message."""
    start = time.perf_counter()
    inbound = drive(port, messages, sessions, size, sender=SENDER, recipient=RECIPIENT)
    reached = sink.wait_for(messages, CATCH_UP_LIMIT)
    if reached is None:
        raise RuntimeError(f"the sink received {sink.count} of {messages} messages")
    return Sample(seconds=reached - start, inbound_seconds=inbound)


def _check_sink(sink: Sink, messages: int, who: str) -> None:
    """Exactly ``messages`` messages, each once (no loss, no duplicate delivery)."""
    ids = sink.message_ids()
    if sink.count != messages or len(ids) != messages or len(set(ids)) != messages:
        raise RuntimeError(
            f"{who}: sink counted {sink.count}, dumped {len(ids)} messages, "
            f"{len(set(ids))} distinct, of {messages}"
        )


# --------------------------------------------------------------------------- the relay side


# Who accepts SMTP connections while the relay delivers (relay.gateway.workers):
# "auto" is the relay's own rule; "always" and "never" force the spool's process to
# keep accepting or to leave every connection to the workers (for comparing them).
MAIN_ACCEPTS = "auto"
# --commit-delay: the spool writer's commit delay in seconds (None: relay's default).
COMMIT_DELAY: float | None = None


def serve(port: int, sink_port: int, work: Path, profile: str | None, workers: int) -> None:
    """Run the whole relay; answer ``status`` lines on stdin; stop at EOF or SIGTERM."""
    sys.path.insert(0, str(ROOT))
    import resource

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    from relay.config import parse_config
    from relay.queue import writer
    from relay.runtime.logfile import RelayLogObserver
    from relay.tap import build_service

    if COMMIT_DELAY is not None:
        writer.COMMIT_DELAY = COMMIT_DELAY

    log = (work / "relay.log").open("w")
    # The observer `make run` uses (twistd --logger relay.logfile.observer).
    globalLogBeginner.beginLoggingTo([RelayLogObserver(log, reactor)], redirectStandardIO=False)
    config = parse_config(
        f"""
[relay]
hostname = "bench.test"
local_domains = []
spool = "spool"

[smtp]
listen = ["tcp:{port}:interface=127.0.0.1:backlog=256"]
workers = {workers}

[[route]]
domain = "sink.test"
channel = "smtp"
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
""",
        work,
    )
    service = build_service(config, reactor)
    if MAIN_ACCEPTS != "auto" and workers:
        gateway_workers = service.getServiceNamed("smtp").getServiceNamed("workers")
        # The A/B's one knob: the deliverer's "busy" replaced by a constant answer.
        gateway_workers.main_busy = SimpleNamespace(busy=MAIN_ACCEPTS == "never")
    baseline: list[float] = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()

    def worker_processes() -> list[Any]:
        gateway = service.getServiceNamed("smtp")
        names = {child.name for child in gateway}
        return (
            list(gateway.getServiceNamed("workers").workers.values()) if "workers" in names else []
        )

    def cpu() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        pids = [w.pid for w in worker_processes() if w.pid]
        return usage.ru_utime + usage.ru_stime + process_cpu_seconds(pids), time.thread_time()

    def accepted() -> int:
        gateway = service.getServiceNamed("smtp")
        here = sum(getattr(getattr(child, "factory", None), "accepted", 0) for child in gateway)
        return here + sum(w.server.stored for w in worker_processes())

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"status":
                queue = service.getServiceNamed("spool").queue
                entries = len(queue.entries()) if queue is not None else -1
                fsyncs = queue.writer.batches - baseline[2] if queue is not None else -1
                total, reactor_thread = cpu()
                self.sendLine(
                    f"status {accepted()} {entries} {total - baseline[0]:.4f} "
                    f"{reactor_thread - baseline[1]:.4f} {fsyncs}".encode()
                )

        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:
                reactor.stop()

    def start() -> None:
        service.startService()

        def ready(queue: Any) -> None:
            # The gateway workers start once the spool is open: give them time to import.
            reactor.callLater(2.0 if workers else 0.0, measure, queue)

        def measure(queue: Any) -> None:
            baseline.extend((*cpu(), queue.writer.batches))
            if profiler is not None:
                profiler.enable()
            control = Control()
            stdio.StandardIO(control)  # connects at once
            control.sendLine(b"ready")

        service.getServiceNamed("spool").when_ready().addCallback(ready)

    def stop() -> object:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        return service.stopService()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run()


class RelayChild:
    """The relay in a child process, with a line-based control channel on its stdio."""

    def __init__(
        self, port: int, sink_port: int, work: Path, profile: str | None, workers: int
    ) -> None:
        command = [sys.executable, __file__, "--serve", str(port), str(sink_port), str(work)]
        command += ["--workers", str(workers), "--main-accepts", MAIN_ACCEPTS]
        if COMMIT_DELAY is not None:
            command += ["--commit-delay", str(COMMIT_DELAY)]
        if profile:
            command += ["--profile", profile]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self._line(60.0)
            if line != "ready":
                raise RuntimeError(f"relay did not start: {line!r}")
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # EOF

    def _line(self, limit: float) -> str:
        try:
            return self._lines.get(timeout=limit)
        except queue.Empty:
            raise RuntimeError("the relay child did not answer") from None

    def status(self) -> tuple[int, int, float, float, int]:
        """(messages accepted, messages in the spool, CPU s, reactor-thread CPU s, fsyncs)."""
        assert self.process.stdin is not None
        self.process.stdin.write("status\n")
        self.process.stdin.flush()
        words = self._line(30.0).split()
        if len(words) != 6 or words[0] != "status":
            raise RuntimeError(f"relay child: unexpected answer {words!r}")
        return int(words[1]), int(words[2]), float(words[3]), float(words[4]), int(words[5])

    def stop(self) -> None:
        """Close its stdin (it stops the relay cleanly); SIGKILL if it hangs."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def bench_relay(
    messages: int, sessions: int, size: int, profile: str | None, workers: int
) -> Sample:
    """One relay run; see the module docstring."""
    work = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    sink: Sink | None = None
    child: RelayChild | None = None
    try:
        sink = Sink()
        port = free_port()
        child = RelayChild(port, sink.port, work, profile, workers)
        sample = _timed_load(sink, port, messages, sessions, size)
        deadline = time.monotonic() + DRAIN_LIMIT
        while True:
            accepted, entries, cpu, reactor_cpu, fsyncs = child.status()
            if entries == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if accepted != messages or entries != 0:
            raise RuntimeError(f"relay: accepted {accepted} of {messages}, {entries} left")
        _check_sink(sink, messages, "relay")
        sample.cpu, sample.reactor_cpu, sample.fsyncs = cpu, reactor_cpu, fsyncs
        return sample
    finally:
        if child is not None:
            child.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- Postfix


def bench_postfix(messages: int, sessions: int, size: int) -> Sample:
    """One Postfix run; see the module docstring for what is set and why."""
    sink = Sink()
    try:
        port = free_port()
        settings = {
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "smtp_tls_security_level": "none",
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
        }
        with Postfix(port, settings) as postfix:
            sample = _timed_load(sink, port, messages, sessions, size)
            deadline = time.monotonic() + DRAIN_LIMIT
            while (left := postfix.queue_files(*POSTFIX_QUEUES)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if left:
                raise RuntimeError(f"postfix: {left} messages left in its queue")
        _check_sink(sink, messages, "postfix")
        return sample
    finally:
        sink.stop()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs; medians")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="[smtp] workers (default 1)")
    parser.add_argument(
        "--main-accepts",
        choices=("auto", "always", "never"),
        default="auto",
        help="while delivering, the relay's own process accepts: by its rule, always, never",
    )
    parser.add_argument(
        "--commit-delay",
        type=float,
        metavar="SECONDS",
        help="the spool writer's commit delay (default: relay.queue.writer.COMMIT_DELAY)",
    )
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "SINK_PORT", "WORK"))
    args = parser.parse_args()
    global MAIN_ACCEPTS, COMMIT_DELAY
    MAIN_ACCEPTS = args.main_accepts
    COMMIT_DELAY = args.commit_delay
    if args.serve:
        serve(
            int(args.serve[0]), int(args.serve[1]), Path(args.serve[2]), args.profile, args.workers
        )
        return
    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    relay: list[Sample] = []
    postfix: list[Sample] = []
    for _ in range(args.rounds):  # alternate, so both see the same background load
        relay.append(
            bench_relay(args.messages, args.sessions, args.size, args.profile, args.workers)
        )
        if not args.relay_only:
            postfix.append(bench_postfix(args.messages, args.sessions, args.size))
    n = args.messages

    def rate(samples: list[Sample]) -> float:
        return statistics.median(n / s.seconds for s in samples)

    result: dict[str, object] = {
        "bench": "relay",
        "messages": n,
        "sessions": args.sessions,
        "size": args.size,
        "rounds": args.rounds,
        "workers": args.workers,
        "main_accepts": args.main_accepts,
        "commit_delay": args.commit_delay,
        "relay_msgs_per_s": round(rate(relay), 1),
        "relay_samples": [round(n / s.seconds) for s in relay],
        "relay_inbound_msgs_per_s": round(statistics.median(n / s.inbound_seconds for s in relay)),
        "relay_cpu_us_per_msg": round(statistics.median(s.cpu for s in relay) / n * 1e6),
        "relay_reactor_cpu_us_per_msg": round(
            statistics.median(s.reactor_cpu for s in relay) / n * 1e6
        ),
        "relay_fsyncs_per_msg": round(statistics.median(s.fsyncs for s in relay) / n, 3),
    }
    if postfix:
        ratio = rate(relay) / rate(postfix)
        result.update(
            postfix_msgs_per_s=round(rate(postfix), 1),
            postfix_samples=[round(n / s.seconds) for s in postfix],
            postfix_inbound_msgs_per_s=round(
                statistics.median(n / s.inbound_seconds for s in postfix)
            ),
            ratio=round(ratio, 2),
            target=2.0,
            meets_target=ratio >= 2.0,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Inbound SMTP throughput: the relay's gateway against this machine's Postfix smtpd.

Prints ONE JSON line.  Both servers are driven by Postfix's ``smtp-source`` with the same
load (N messages of 4 KiB, one message per connection, 20 concurrent sessions), both
answer 250 only after the message is fsynced:

* relay: the gateway with the real spool (group-commit fsync) in a child process;
* Postfix: a throw-away instance (own config and queue directories under a temp dir,
  loopback only, a high port) whose smtpd puts every message on hold
  (``check_client_access static:HOLD``): accepted, fsynced by cleanup, never delivered,
  which is what our spool does with a message until a deliverer runs.

Usage: ``python bench/smtp_in.py [--messages N] [--rounds R] [--sessions S] [--size B]``.
The two servers are measured alternately R times (default 3) and the medians compared,
so background load on a shared machine hits both alike.  ``relay_cpu_us_per_msg`` is
the relay process's CPU (user + system, all threads) per message: less noisy than rates.
``--serve PORT SPOOL`` (internal) runs the relay side; ``--profile FILE`` with it writes
cProfile stats there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from postfix_harness import Postfix, drive, free_port, process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the relay side


def serve(port: int, spool: Path, profile: str | None, workers: int) -> None:
    """Run the relay's SMTP side (and its workers) on a real spool until SIGTERM; print
    the count.

    Built by the builder ``relay.tap`` uses (``relay.gateway.build.build_smtp``) over
    the spool's service, without the deliverer (the messages stay queued, as Postfix's
    stay on hold): the gateway with its share of the limits, and ``workers`` gateway
    worker processes handing their messages to this one.
    """
    sys.path.insert(0, str(ROOT))
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from relay.channels.local.users import build_local_recipients
    from relay.config import parse_config
    from relay.gateway.build import build_smtp
    from relay.policy.routing import Router
    from relay.queue.ready import QueueReady
    from relay.queue.service import SpoolService
    from relay.queue.store import SpoolQueue
    from relay.runtime.logfile import RelayLogObserver
    from relay.runtime.services import attach, named_multiservice

    log = (spool.parent / "relay.log").open("w")
    # The observer `make run` uses (twistd --logger relay.logfile.observer).
    globalLogBeginner.beginLoggingTo([RelayLogObserver(log, reactor)], redirectStandardIO=False)

    config = parse_config(
        '[relay]\nhostname = "bench.test"\nlocal_domains = ["y.test"]\n'
        f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1:backlog=256"]\n'
        f"workers = {workers}\n"
        '[local]\nusers = ["to"]\n',
        spool.parent,
    )
    ready: QueueReady[SpoolQueue] = QueueReady()
    router = Router(config, channels=frozenset({"local"}))
    smtp = build_smtp(config, ready, build_local_recipients(config), reactor, router=router)
    top = named_multiservice("relay")
    attach(SpoolService(spool, reactor, ready=ready), top, "spool")
    attach(smtp, top, "smtp")
    started: list[float] = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()

    def pids() -> list[int]:
        children = smtp.getServiceNamed("workers").workers if workers else {}
        return [os.getpid(), *(w.pid for w in children.values() if w.pid)]

    def start() -> None:
        top.startService()
        ready.when_ready().addCallback(lambda _: reactor.callLater(2.0 if workers else 0.0, go))

    def go() -> None:  # once the workers have done their imports
        if profiler is not None:
            profiler.enable()
        started.append(process_cpu_seconds(pids()))
        print("ready", flush=True)

    def stop() -> object:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        cpu = process_cpu_seconds(pids()) - started[0]

        def report(stored: list[str]) -> object:
            print(f"cpu {cpu:.3f} accepted {len(stored)}", flush=True)
            return top.stopService()

        assert ready.queue is not None
        return ready.queue.list_messages().addCallback(report)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run()


def bench_relay(
    work: Path, messages: int, sessions: int, size: int, profile: str | None, workers: int
) -> dict[str, float]:
    port = free_port()
    spool = work / "relay" / "spool"
    spool.parent.mkdir(parents=True)
    command = [sys.executable, __file__, "--serve", str(port), str(spool)]
    command += ["--workers", str(workers)]
    if profile:
        command += ["--profile", profile]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"relay did not start: {line!r}")
        seconds = drive(port, messages, sessions, size)
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    words = out.split()
    cpu, accepted = float(words[-3]), int(words[-1])
    if accepted != messages:
        raise RuntimeError(f"relay stored {accepted} of {messages}")
    return {"seconds": seconds, "per_second": messages / seconds, "cpu_per_msg": cpu / messages}


# --------------------------------------------------------------------------- Postfix


def bench_postfix(messages: int, sessions: int, size: int) -> dict[str, float]:
    """A throw-away Postfix (see postfix_harness): loopback, high port, every message held."""
    port = free_port()
    settings = {
        "mydestination": "y.test",
        "local_recipient_maps": "",
        "mynetworks": "127.0.0.0/8",
        "smtpd_peername_lookup": "no",
        "smtpd_client_restrictions": "check_client_access static:HOLD",
        "smtpd_recipient_restrictions": "permit_mynetworks,reject",
        "default_process_limit": "200",
    }
    with Postfix(port, settings) as postfix:
        seconds = drive(port, messages, sessions, size)
        held = _count_held(postfix, messages)
    if held != messages:
        raise RuntimeError(f"postfix held {held} of {messages}")
    return {"seconds": seconds, "per_second": messages / seconds}


def _count_held(postfix: Postfix, expected: int) -> int:
    """Held messages (cleanup may still be finishing the last ones for a moment)."""
    deadline = time.monotonic() + 10
    while True:
        count = postfix.queue_files("hold")
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "SPOOL"))
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="[smtp] workers (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs; medians")
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]), args.profile, args.workers)
        return
    rates: dict[str, list[float]] = {"relay": [], "postfix": []}
    cpu: list[float] = []
    for _ in range(args.rounds):  # alternate, so both see the same background load
        work = Path(tempfile.mkdtemp(prefix="bench-smtp-in-"))
        try:
            relay = bench_relay(
                work, args.messages, args.sessions, args.size, args.profile, args.workers
            )
            rates["relay"].append(relay["per_second"])
            cpu.append(relay["cpu_per_msg"])
            if not args.relay_only:
                postfix = bench_postfix(args.messages, args.sessions, args.size)
                rates["postfix"].append(postfix["per_second"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result: dict[str, object] = {
        "bench": "smtp_in",
        "messages": args.messages,
        "sessions": args.sessions,
        "size": args.size,
        "fsync": True,
        "workers": args.workers,
        "rounds": args.rounds,
        "relay_msgs_per_s": round(statistics.median(rates["relay"]), 1),
        "relay_cpu_us_per_msg": round(statistics.median(cpu) * 1e6),
        "relay_samples": [round(r) for r in rates["relay"]],
    }
    if rates["postfix"]:
        relay_median = statistics.median(rates["relay"])
        postfix_median = statistics.median(rates["postfix"])
        result["postfix_msgs_per_s"] = round(postfix_median, 1)
        result["postfix_samples"] = [round(r) for r in rates["postfix"]]
        result["ratio"] = round(relay_median / postfix_median, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

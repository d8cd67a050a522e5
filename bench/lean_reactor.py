"""The SMTP gateway's CPU per session on Twisted's epoll reactor and on the lean one.

Prints ONE JSON line.  ``relay/runtime/leanreactor.py`` (the gateway workers' reactor) drops
the legacy log context Twisted's ``EPollReactor`` sets up around every I/O event; this
measures what that is worth on real sockets.  A child process runs the real gateway
(``build_gateway``, the relay's log observer) on 127.0.0.1 over a store that answers at
once, so the spool's fsync and the hand-over to it are left out and what remains is
the gateway plus the reactor; Postfix's ``smtp-source`` drives it (N messages of 4 KiB,
one per connection, 20 concurrent sessions).  The two reactors run alternately R times
(default 9) and the medians of the child's CPU (user + system, all threads) per session
are compared: CPU, not rate, since smtp-source shares this machine's cores.

Usage: ``python bench/lean_reactor.py [--messages N] [--rounds R]``.
``--serve PORT REACTOR`` (internal) runs the child.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from postfix_harness import drive, free_port, process_cpu_seconds, wait_listening

ROOT = Path(__file__).resolve().parent.parent
REACTORS = ("twisted", "lean")


def serve(port: int, which: str, work: Path) -> None:
    """Run the gateway on ``which`` reactor until SIGTERM."""
    sys.path.insert(0, str(ROOT))
    if which == "lean":
        from relay.runtime.leanreactor import install

        reactor = install()
    else:
        from twisted.internet import epollreactor

        epollreactor.install()  # type: ignore[no-untyped-call]
        from twisted.internet import reactor  # type: ignore[no-redef]
    from twisted.internet import defer
    from twisted.logger import globalLogBeginner
    from zope.interface import implementer

    from relay.channels.local.users import build_local_recipients
    from relay.config import parse_config
    from relay.gateway.service import build_gateway
    from relay.interfaces import IStore
    from relay.queue.ready import QueueReady
    from relay.runtime.logfile import RelayLogObserver

    @implementer(IStore)
    class AtOnce:
        def store(self, envelope: object, text: bytes) -> Any:
            return defer.succeed("0660CB0F36073B")

    log = (work / "relay.log").open("w")
    globalLogBeginner.beginLoggingTo([RelayLogObserver(log, reactor)], redirectStandardIO=False)
    config = parse_config(
        '[relay]\nhostname = "bench.test"\nlocal_domains = ["y.test"]\n'
        f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1:backlog=256"]\n'
        '[local]\nusers = ["to"]\n',
        work,
    )
    gateway = build_gateway(
        config, QueueReady.of(AtOnce()), build_local_recipients(config), reactor
    )
    reactor.callWhenRunning(gateway.startService)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run()


def one_round(which: str, messages: int, sessions: int, size: int) -> float:
    """Microseconds of the child's CPU per session for one run on ``which`` reactor."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as work:
        command = [sys.executable, __file__, "--serve", str(port), which, work]
        child = subprocess.Popen(command)
        try:
            wait_listening(port)
            before = process_cpu_seconds([child.pid])
            drive(port, messages, sessions, size)
            cpu = process_cpu_seconds([child.pid]) - before
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
        log = (Path(work) / "relay.log").read_text()
    stored = log.count(" stored ")
    if stored < messages:  # every session must have gone through: else the CPU means little
        raise RuntimeError(f"{which}: {stored} of {messages} messages stored")
    return cpu / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=9, help="alternating runs; medians")
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "REACTOR", "WORK"))
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], Path(args.serve[2]))
        return
    samples: dict[str, list[float]] = {which: [] for which in REACTORS}
    for index in range(args.rounds):
        order = REACTORS if index % 2 == 0 else REACTORS[::-1]
        for which in order:
            samples[which].append(one_round(which, args.messages, args.sessions, args.size))
    twisted = statistics.median(samples["twisted"])
    lean = statistics.median(samples["lean"])
    pairs = zip(samples["lean"], samples["twisted"], strict=True)
    print(
        json.dumps(
            {
                "bench": "lean_reactor",
                "messages": args.messages,
                "sessions": args.sessions,
                "size": args.size,
                "rounds": args.rounds,
                "twisted_cpu_us_per_session": round(twisted),
                "lean_cpu_us_per_session": round(lean),
                "saving_percent": round((twisted - lean) / twisted * 100, 1),
                "lean_lower_in_rounds": sum(
                    lean_cpu < twisted_cpu for lean_cpu, twisted_cpu in pairs
                ),
                "twisted_samples": [round(s) for s in samples["twisted"]],
                "lean_samples": [round(s) for s in samples["lean"]],
            }
        )
    )


if __name__ == "__main__":
    main()

"""The SMTP gateway's own CPU per session, without sockets or a reactor.

Prints ONE JSON line: microseconds of CPU for one whole session as smtp-source runs it
(greeting, EHLO, MAIL, RCPT, DATA with 4 KiB of text, QUIT), driven through the real
gateway protocol and engine with Twisted's in-memory transport and a store that answers
at once.  What it leaves out is what a real session adds: the kernel's socket work and
Twisted's per-event dispatch.  Compare it with ``relay_cpu_us_per_msg`` of
``bench/smtp_in.py`` to see how the gateway's CPU splits.

Usage: ``python bench/gateway_session.py [--sessions N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

BODY = (b"From: a\r\nSubject: x\r\n\r\n" + b"x" * 76 + b"\r\n") * 52 + b".\r\n"
COMMANDS = [
    b"EHLO client.test\r\n",
    b"MAIL FROM:<from@x.test>\r\n",
    b"RCPT TO:<to@y.test>\r\n",
    b"DATA\r\n",
    BODY,
    b"QUIT\r\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=5000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from twisted.internet import defer, task
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
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

    clock = task.Clock()
    with tempfile.TemporaryDirectory(prefix="bench-session-") as work:
        log = (Path(work) / "relay.log").open("w")
        globalLogBeginner.beginLoggingTo([RelayLogObserver(log, clock)], redirectStandardIO=False)
        config = parse_config(
            '[relay]\nhostname = "bench.test"\nlocal_domains = ["y.test"]\n'
            '[smtp]\nlisten = ["tcp:0"]\n[local]\nusers = ["to"]\n',
            Path(work),
        )
        gateway = build_gateway(
            config, QueueReady.of(AtOnce()), build_local_recipients(config), clock
        )
        factory = next(c.factory for c in gateway if c.name.startswith("listen:"))  # type: ignore[attr-defined]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)

        def session() -> bytes:
            protocol = factory.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            protocol.makeConnection(transport)
            for data in COMMANDS:
                protocol.dataReceived(data)
            protocol.connectionLost(None)
            return transport.value()

        last = session()
        if b"250 2.0.0 Ok: queued as" not in last or not last.endswith(b"closing connection\r\n"):
            raise RuntimeError(f"unexpected session: {last[-200:]!r}")
        start = time.process_time()
        for _ in range(args.sessions):
            session()
        per_session = (time.process_time() - start) / args.sessions * 1e6
        log.close()
    print(
        json.dumps(
            {"bench": "gateway_session", "sessions": args.sessions, "cpu_us": round(per_session, 1)}
        )
    )


if __name__ == "__main__":
    main()

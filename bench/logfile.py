"""Log observer cost: Twisted's text observer against relay.runtime.logfile, per event.

Prints ONE JSON line: microseconds of CPU per event for each observer, writing the
relay's usual "stored" event to a real file (which each flushes as it does in use:
Twisted's after every line, the relay's on its one-second timer, here at the end).
The relay logs about three such events per relayed message (stored, delivered,
removed), so three times the difference is what the observer saves per message.

Usage: ``python bench/logfile.py [--events N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _per_event(observer: object, events: int) -> float:
    from twisted.logger import Logger, LogPublisher

    log = Logger(namespace="relay.gateway.protocol", observer=LogPublisher(observer))
    start = time.process_time()
    for n in range(events):
        log.info(
            "{summary}",
            summary=f"smtp: 0660CB0F36{n:04X} stored from=<a@x.test> nrcpt=1 size=4268 "
            "client=127.0.0.1 helo=client.test proto=ESMTP",
            queue_id=f"0660CB0F36{n:04X}",
            sender="a@x.test",
            client="127.0.0.1",
            helo="client.test",
            proto="ESMTP",
            size=4268,
        )
    return (time.process_time() - start) / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from twisted.internet.task import Clock
    from twisted.logger import textFileLogObserver

    from relay.runtime.logfile import RelayLogObserver

    with tempfile.TemporaryDirectory(prefix="bench-logfile-") as work:
        with (Path(work) / "twisted.log").open("w") as out:
            twisted_us = _per_event(textFileLogObserver(out), args.events)
        with (Path(work) / "relay.log").open("w") as out:
            ours = RelayLogObserver(out, Clock())
            relay_us = _per_event(ours, args.events)
            ours.flush()
    print(
        json.dumps(
            {
                "bench": "logfile",
                "events": args.events,
                "twisted_us_per_event": round(twisted_us, 1),
                "relay_us_per_event": round(relay_us, 1),
                "saved_us_per_relayed_message": round(3 * (twisted_us - relay_us)),
            }
        )
    )


if __name__ == "__main__":
    main()

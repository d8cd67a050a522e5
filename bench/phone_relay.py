"""One phone call between two relays, end to end, over the line emulator: one JSON line.

Two ``twistd relay`` processes (a hub answering on one end of an emulated serial line,
a site calling on the other, as in ``tests/test_phone_e2e.py``); N messages of SIZE
bytes are submitted by SMTP on each side for the other, then the site runs ``relay call
hub-a`` and the script waits until every message is in its Maildir.  It prints the
site's call record (``relay call --json``: seconds from the line's hand-over to the
hang-up, messages and bytes each way, whole-call efficiency over both directions,
frames resent) and whether every message arrived once and byte-identical.

Usage: ``.venv/bin/python bench/phone_relay.py [--messages N] [--size BYTES] [--ber X]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.lineemu import LineEmulator
from support.phone_relays import PhonePair, relay_command, send_mail
from support.relay_process import mailbox_texts, wait_for

RATE = 115200


def message(subject: str, size: int, rng: random.Random) -> bytes:
    """A message of about ``size`` bytes of varied printable lines."""
    lines, total = [], 0
    while total < size:
        lines.append(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(70))
        )
        total += 72
    return (f"Subject: {subject}\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode()


def body(delivered: bytes) -> bytes:
    """The submitted text of a Maildir file (after our trace headers, CRLF again)."""
    return delivered[delivered.index(b"Subject: ") :].replace(b"\n", b"\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ber", type=float, default=0.0)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        (root / "line").mkdir()
        with LineEmulator(root / "line", rate=RATE, ber=args.ber, seed=1) as line:
            pair = PhonePair.make(
                root,
                f"serial:{line.link_a}:baudrate={RATE}",
                f"serial:{line.link_b}:baudrate={RATE}",
            )
            try:
                pair.start_hub()
                pair.start_site()
                to_site = [message(f"to-site-{i}", args.size, rng) for i in range(args.messages)]
                to_hub = [message(f"to-hub-{i}", args.size, rng) for i in range(args.messages)]
                for text in to_site:
                    send_mail(pair.hub_port, "alice@example.test", "bob@site-b.test", text)
                for text in to_hub:
                    send_mail(pair.site_port, "bob@site-b.test", "alice@example.test", text)

                def queued() -> int:
                    return len(json.loads(relay_command(pair.hub_config, "queue", "--json").stdout))

                wait_for(lambda: queued() == args.messages, what="mail queued on the hub")
                line.connect()
                started = time.monotonic()
                call = pair.call()
                wall = time.monotonic() - started
                record = json.loads(call.stdout)
                site_box, hub_box = root / "site", root / "hub"
                wait_for(lambda: len(mailbox_texts(site_box, "bob")) >= args.messages)
                wait_for(lambda: len(mailbox_texts(hub_box)) >= args.messages)
                intact = sorted(body(t) for t in mailbox_texts(site_box, "bob")) == sorted(
                    to_site
                ) and sorted(body(t) for t in mailbox_texts(hub_box)) == sorted(to_hub)
                line.hang_up()
            finally:
                pair.stop()
    print(
        json.dumps(
            {
                "messages_each_way": args.messages,
                "size": args.size,
                "ber": args.ber,
                "rate": RATE,
                "relay_call_exit": call.returncode,
                "relay_call_wall_seconds": round(wall, 2),
                "call": record,
                "all_intact_once": intact,
            }
        )
    )


if __name__ == "__main__":
    main()

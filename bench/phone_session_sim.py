"""Whole phone calls in simulation: the session engine over the link, in virtual time.

Prints ONE JSON line per condition.  Two :class:`relay.sansio.phone.session.PhoneSession`
ends (caller and answerer, each over a real :class:`relay.sansio.phone.link.Link` and an
in-memory store) talk over ``tests/support/phone/link_harness.py``'s line (115 200 bit/s =
11 520 bytes/s each way, latency, seeded bit flips), driven as the Twisted driver drives
them: each end writes only when its line's transmit buffer has room.  Every call runs
from the first hello to the agreed hang-up; ``seconds`` is the longer of the two ends'.

``efficiency`` = payload bytes / (11 520 x seconds), payload counted one way (for the
both-ways condition, each way, and the line's two directions count once each).  The
drop condition cuts the line at 60 % of the bytes the call needs, then calls again:
``bytes_resent_after_drop`` is what the second call sent of what the first had already
sent (the receiver names the offset it holds, so at most what was in flight).

This is the engines' figure without ptys, SerialPort or the emulator's process; the
whole-system figures come from ``bench/phone.py``.

Usage: ``python bench/phone_session_sim.py [--condition NAME ...] [--seed N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import email
import json
import math
import pathlib
import random
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/support

from relay.sansio.phone.records import Role  # noqa: E402
from relay.sansio.phone.session import SessionOptions  # noqa: E402

from support.phone.link_harness import LINE_RATE, Conditions  # noqa: E402
from support.phone.memstore import MemoryPhoneStore  # noqa: E402
from support.phone.session_harness import (  # noqa: E402
    HUB,
    SITE,
    End,
    LossyLine,
    envelope,
    make_end,
    real_link,
    run_call,
)


def _call(
    hub: MemoryPhoneStore, site: MemoryPhoneStore, line: LossyLine, compression: bool
) -> tuple[End, End]:
    options = SessionOptions(compression=compression, line_rate=int(LINE_RATE * 10))
    caller = make_end(Role.CALLER, hub, link_factory=real_link, options=options)
    answerer = make_end(Role.ANSWERER, site, link_factory=real_link, options=options)
    run_call(caller, answerer, line)
    return caller, answerer


def _corpus(count: int, rng: random.Random) -> list[bytes]:
    """Mail made of the licence texts a Debian machine has and Python's docstrings, with
    typical headers, a few with a base64 attachment."""
    licences = sorted(Path("/usr/share/common-licenses").glob("*"))
    texts = [p.read_text(errors="replace") for p in licences if p.is_file()]
    for module in (asyncio, collections, email, json, pathlib, zlib, argparse, random):
        texts += [
            d
            for obj in vars(module).values()
            if isinstance(d := getattr(obj, "__doc__", None), str)
        ]
    body = "\n\n".join(t for t in texts if t)
    out = []
    for i in range(count):
        start = rng.randrange(max(1, len(body) - 20000))
        part = body[start : start + rng.randrange(1500, 12000)]
        lines = [
            f"Received: from site-b.example by hub-a.example with phone id {i:08x}",
            f"Message-ID: <{rng.getrandbits(64):016x}@site-b.example>",
            f"Date: Mon, 7 Dec 2026 09:{i % 60:02d}:00 +0000",
            "From: Alice Example <alice@site-b.example>",
            "To: Bob Example <bob@hub-a.example>",
            f"Subject: notes {i}",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "",
            *textwrap.wrap(part, 72),
        ]
        if i % 10 == 9:
            blob = rng.randbytes(6000)
            lines += [
                "",
                "--attachment follows (base64)--",
                *textwrap.wrap(base64.b64encode(blob).decode(), 76),
            ]
        out.append("\r\n".join(lines).encode() + b"\r\n")
    return out


def condition(name: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    cond = {
        "ber0": Conditions(),
        "ber1e-5": Conditions(ber=1e-5),
        "ber1e-4": Conditions(ber=1e-4),
        "latency300ms": Conditions(latency=0.3),
        "both_ways": Conditions(),
        "drop_5x1MiB_ber1e-5": Conditions(ber=1e-5),
        "text_compressed": Conditions(),
    }[name]
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    if name.startswith("drop"):
        load = [rng.randbytes(1 << 20) for _ in range(5)]
    elif name == "text_compressed":
        load = _corpus(50, rng)
    else:
        load = [rng.randbytes(4096) for _ in range(50)]
    for i, text in enumerate(load):
        hub.put(SITE, f"h{i}", envelope(), text)
        if name == "both_ways":
            site.put(HUB, f"s{i}", envelope("<alice@hub.example>"), text)
    payload = sum(map(len, load))
    compression = name == "text_compressed"
    result: dict[str, Any] = {"condition": name, "seed": seed, "payload_bytes": payload}
    cut = 0.6 * payload * 1.05 if name.startswith("drop") else math.inf
    caller, answerer = _call(hub, site, LossyLine(cond, seed, cut_after=cut), compression)
    first = caller.summary
    assert first is not None and answerer.summary is not None
    calls = [(first, answerer.summary)]
    if name.startswith("drop"):
        held = sum(len(t) for t in site.partial.values()) + sum(
            len(t) for _, t in site.inbox.get(HUB, {}).values()
        )
        caller, answerer = _call(hub, site, LossyLine(cond, seed + 1), compression)
        assert caller.summary is not None and answerer.summary is not None
        calls.append((caller.summary, answerer.summary))
        result["bytes_resent_after_drop"] = first.payload_bytes_sent - held
        result["first_call_outcome"] = first.outcome.value
    delivered = {m: t for m, (_, t) in site.inbox.get(HUB, {}).items()}
    result["intact"] = delivered == {f"h{i}": t for i, t in enumerate(load)} and len(
        site.commits
    ) == len(load)
    last_caller, last_answerer = calls[-1]
    seconds = max(last_caller.seconds, last_answerer.seconds)
    result.update(
        outcome=last_caller.outcome.value,
        seconds=round(seconds, 3),
        efficiency=round(last_caller.payload_bytes_sent / (LINE_RATE * seconds), 4)
        if not name.startswith("drop")
        else None,
        wire_bytes_caller_to_answerer=last_caller.wire_bytes_sent,
        wire_bytes_answerer_to_caller=last_answerer.wire_bytes_sent,
        frames_resent=last_caller.frames_resent + last_answerer.frames_resent,
        compression_ratio=last_caller.compression_ratio_sent
        and round(last_caller.compression_ratio_sent, 3),
        handshake_seconds=last_caller.handshake_seconds and round(last_caller.handshake_seconds, 3),
        rtt=last_caller.rtt and round(last_caller.rtt, 3),
    )
    if name == "both_ways":
        result["efficiency_back"] = round(
            last_caller.payload_bytes_received / (LINE_RATE * seconds), 4
        )
    if name == "text_compressed":
        result["payload_per_line_byte_rate"] = round(payload / (LINE_RATE * seconds), 3)
    return result


NAMES = [
    "ber0",
    "ber1e-5",
    "ber1e-4",
    "latency300ms",
    "both_ways",
    "drop_5x1MiB_ber1e-5",
    "text_compressed",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--condition", action="append", choices=NAMES)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    for name in options.condition or NAMES:
        print(json.dumps(condition(name, options.seed)), flush=True)


if __name__ == "__main__":
    main()

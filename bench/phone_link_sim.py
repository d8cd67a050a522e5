"""The phone link alone, in simulation: what efficiency its framing and resending allow.

Prints ONE JSON line per condition.  Two :class:`relay.sansio.phone.link.Link` ends talk
over ``tests/support/phone/link_harness.py``'s in-memory line (115 200 bit/s = 11 520 bytes/s
each way, a fake clock, bit flips from a seeded ``random.Random``), the way the drivers
will: each keeps at most ``tx_buffer`` bytes waiting for its line, either a few hundred
(a driver that writes only when the line is nearly idle) or 22 KiB (what the bench's
path holds: the line emulator's 4 KiB and a pty's 18 KiB, which a writer fills before
it is held back).  Each end first sends a 64-byte record and waits for the peer's, as
a session's handshake does.  The load is the issue's: 50 records of 4 KiB of random
(incompressible) bytes one way, or each way.

``efficiency`` is payload bytes / (bytes/s of the line x seconds), where seconds run
from the first byte (the opening record included) until every record was delivered
*and* acknowledged (the sender idle, as a call's hang-up needs); with data both ways the
line's capacity counts both directions.  Each condition runs ``--seeds`` times (the
errors land differently each time); the line holds the mean, the worst, and the
counters of the worst run.

There is no session here (no handshake, no proposals, no hang-up exchange): the figures
are the ceiling the link leaves to the whole call that ``bench/phone.py`` measures.

Usage: ``python bench/phone_link_sim.py [--seeds N] [--messages N] [--size B]
[--tx-buffer B ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/support

from support.phone.link_harness import LINE_RATE, Conditions, Outcome, simulate  # noqa: E402

CONDITIONS: list[tuple[str, Conditions, bool]] = [
    ("ber0", Conditions(), False),
    ("ber1e-5", Conditions(ber=1e-5), False),
    ("ber1e-4", Conditions(ber=1e-4), False),
    ("latency300ms", Conditions(latency=0.3), False),
    ("latency300ms_ber1e-5", Conditions(latency=0.3, ber=1e-5), False),
    ("both_ways_ber0", Conditions(), True),
    ("both_ways_ber1e-5", Conditions(ber=1e-5), True),
]


def run(conditions: Conditions, both: bool, messages: int, size: int, seed: int) -> Outcome:
    rng = random.Random(seed ^ 0x5EED)
    load = [rng.randbytes(size) for _ in range(messages)]
    hello = [rng.randbytes(64)]
    outcome = simulate(
        hello + load, hello + (load if both else []), conditions, seed=seed, hello=True
    )
    assert outcome.b.received == hello + load, "records lost or damaged"
    if both:
        assert outcome.a.received == hello + load, "records lost or damaged"
    return outcome


def measure(
    name: str, conditions: Conditions, both: bool, messages: int, size: int, seeds: int
) -> dict[str, Any]:
    payload = messages * size * (2 if both else 1)
    capacity = LINE_RATE * (2 if both else 1)
    runs = []
    for seed in range(seeds):
        outcome = run(conditions, both, messages, size, seed)
        runs.append((payload / (capacity * outcome.finished_at), outcome))
    worst_efficiency, worst = min(runs, key=lambda pair: pair[0])
    forward = worst.a.link.stats()
    backward = worst.b.link.stats()
    return {
        "condition": name,
        "tx_buffer": conditions.tx_buffer,
        "messages": messages,
        "size": size,
        "both_ways": both,
        "latency": conditions.latency,
        "ber": conditions.ber,
        "seeds": seeds,
        "efficiency": round(statistics.mean(pair[0] for pair in runs), 4),
        "efficiency_worst": round(worst_efficiency, 4),
        "worst_seconds": round(worst.finished_at, 3),
        "worst_payload_bytes": payload,
        "worst_wire_bytes_a_to_b": forward.wire_bytes_sent,
        "worst_wire_bytes_b_to_a": backward.wire_bytes_sent,
        "worst_frames_sent_a": forward.frames_sent,
        "worst_frames_resent_a": forward.frames_resent,
        "worst_bytes_resent_a": forward.bytes_resent,
        "worst_frames_damaged_at_b": backward.frames_damaged,
        "worst_final_frame_payload_a": forward.frame_payload,
        "worst_rtt_a": None if forward.rtt is None else round(forward.rtt, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tx-buffer", type=int, nargs="+", default=[256, 22 * 1024])
    args = parser.parse_args()
    for tx_buffer in args.tx_buffer:
        for name, conditions, both in CONDITIONS:
            conditions = dataclasses.replace(conditions, tx_buffer=tx_buffer)
            line = measure(name, conditions, both, args.messages, args.size, args.seeds)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

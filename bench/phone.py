"""Whole phone calls over an emulated 115 200 bit/s serial line: one JSON line per condition.

Each condition is one call (two for the dropped-line condition) from the moment the line
comes up to the hang-up.  Three processes take part, so that none disturbs another's
timing: the line emulator (``tests/support/lineemu.py``: bit rate, latency, seeded bit
errors, drops) and two relay phone endpoints, a caller on line A and an answerer on line
B.  Each endpoint runs the session engine under its Twisted driver
(``relay.phone.driver.PhoneProtocol``) on a ``SerialPort`` opened on the emulator's
pseudo-terminal, with its own durable file store (``relay.phone.filestore``).

The harness writes each side's messages to an outbox directory (an envelope and a text
file each); the endpoint queues them in its store before the first call.  After the last
call each endpoint lists what its store committed, and the harness checks that every
message arrived byte-identical, exactly once, and that no sender still holds one.

Fields: ``condition``; ``payload_bytes`` (text of the messages, both ways, also given per
direction as ``payload_a_to_b`` and ``payload_b_to_a``); ``wire_bytes_a_to_b`` and
``wire_bytes_b_to_a`` (bytes the emulator carried); ``seconds`` (line up to the last
hang-up, summed over the calls); ``efficiency`` = payload_bytes / (rate / 10 * seconds),
above 1 when both directions carry mail; ``frames_resent`` (both ends);
``compression_ratio`` (message text / text on the line, both ways);
``bytes_resent_after_drop`` (text the sender moved beyond the messages' size over both
calls, for the dropped line; else null); ``messages_intact`` (out of ``messages``);
``calls``, ``outcomes``, ``bits_flipped``, ``ber``, ``latency``.

Usage: ``python bench/phone.py [--condition NAME ...] [--seed N]``; ``--list`` names the
conditions; ``--quick`` runs one short call (3 small messages at BER 0, the CI check).
``--endpoint ...`` (internal) runs one end of a call.
"""

from __future__ import annotations

import argparse
import email.policy
import gzip
import hashlib
import inspect
import json
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.lineemu import DropPlan, LineEmulator  # noqa: E402

RATE = 115200
BYTES_PER_SECOND = RATE / 10
CALLER, ANSWERER = "outpost", "hub"  # site names: the caller is on line A
SECRET = "bench shared secret"
KIB, MIB = 1024, 1024 * 1024


# --- conditions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One benchmark condition: what each side sends, and the line it crosses."""

    name: str
    a_to_b: Callable[[int], list[bytes]]  # seed -> the caller's messages
    b_to_a: Callable[[int], list[bytes]] = lambda seed: []
    ber: float = 0.0
    latency: float = 0.0
    compression: bool = False
    drop_at: float | None = None  # fraction of the A->B text after which the line drops


def incompressible(count: int, size: int) -> Callable[[int], list[bytes]]:
    """``count`` messages of ``size`` random bytes (compression cannot shrink them)."""

    def make(seed: int) -> list[bytes]:
        generator = random.Random(f"incompressible/{seed}/{count}/{size}")
        return [generator.randbytes(size) for _ in range(count)]

    return make


def realistic(count: int) -> Callable[[int], list[bytes]]:
    """``count`` mail messages made from text this machine has (see ``text_corpus``)."""
    return lambda seed: text_corpus(count, seed)


CONDITIONS = {
    c.name: c
    for c in (
        Condition("ber0", incompressible(50, 4 * KIB)),
        Condition("ber1e-5", incompressible(50, 4 * KIB), ber=1e-5),
        Condition("ber1e-4", incompressible(50, 4 * KIB), ber=1e-4),
        Condition("latency300ms_ber0", incompressible(50, 4 * KIB), latency=0.3),
        Condition("latency300ms_ber1e-5", incompressible(50, 4 * KIB), ber=1e-5, latency=0.3),
        Condition("latency300ms_ber1e-4", incompressible(50, 4 * KIB), ber=1e-4, latency=0.3),
        Condition("both_ways", incompressible(50, 4 * KIB), b_to_a=incompressible(50, 4 * KIB)),
        Condition("drop_at_60pct", incompressible(5, MIB), ber=1e-5, drop_at=0.6),
        Condition("realistic_text", realistic(50), compression=True),
    )
}
QUICK = Condition("quick", incompressible(3, 512))


# --- the realistic corpus ----------------------------------------------------------------

LICENSES = Path("/usr/share/common-licenses")
DOC_MODULES = [
    "argparse",
    "collections",
    "email.message",
    "json",
    "logging",
    "pathlib",
    "subprocess",
    "textwrap",
    "threading",
    "urllib.parse",
    "zipfile",
]
PEOPLE = [
    ("Ada Murray", "ada@station.example"),
    ("Bram Olsen", "bram@hub.example"),
    ("Chidi Eze", "chidi@ship.example"),
    ("Dora Lind", "dora@lab.example"),
    ("Emil Kask", "emil@hub.example"),
]


def _paragraphs() -> list[str]:
    """Paragraphs of real prose: the licence texts and the standard library's docstrings."""
    found: list[str] = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_file():
            found.extend(p.strip() for p in path.read_text("utf-8", "replace").split("\n\n"))
    for name in DOC_MODULES:
        module = __import__(name, fromlist=["_"])
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if doc:
                found.extend(p.strip() for p in doc.split("\n\n"))
    paragraphs = [p for p in found if len(p) > 40]
    if len(paragraphs) < 200:
        raise RuntimeError(f"too little text for the corpus under {LICENSES} and the stdlib")
    return paragraphs


def text_corpus(count: int, seed: int) -> list[bytes]:
    """``count`` plausible mail messages: headers, prose bodies, a few base64 attachments."""
    generator = random.Random(f"corpus/{seed}")
    paragraphs = _paragraphs()
    messages = []
    when = 1_765_000_000.0
    for index in range(count):
        (from_name, from_addr), (to_name, to_addr) = generator.sample(PEOPLE, 2)
        start = generator.randrange(len(paragraphs))
        body_paragraphs = paragraphs[start : start + generator.randint(2, 25)]
        body = "\n\n".join(textwrap.fill(" ".join(p.split()), 72) for p in body_paragraphs)
        message = EmailMessage(policy=email.policy.SMTP)
        when += generator.uniform(30, 3600)
        stamp = format_datetime(datetime.fromtimestamp(when, UTC))
        message["Received"] = (
            f"from {from_addr.split('@')[1]} (localhost [127.0.0.1]) by mx.hub.example "
            f"with ESMTP id {generator.getrandbits(48):012X}; {stamp}"
        )
        message["From"] = f"{from_name} <{from_addr}>"
        message["To"] = f"{to_name} <{to_addr}>"
        message["Subject"] = " ".join(body_paragraphs[0].split()[:8])
        message["Date"] = stamp
        domain = from_addr.split("@")[1]
        message["Message-ID"] = f"<{generator.getrandbits(64):016x}.{index}@{domain}>"
        message["User-Agent"] = "Mutt/2.2.12 (2023-09-09)"
        message.set_content(body + f"\n\n-- \n{from_name}\n")
        if index % 10 == 3:  # a few carry an attachment: compressed data, as most do
            blob = gzip.compress("\n\n".join(generator.sample(paragraphs, 40)).encode(), mtime=0)
            message.add_attachment(
                blob, maintype="application", subtype="gzip", filename=f"notes-{index}.txt.gz"
            )
            message.set_boundary(f"=_{generator.getrandbits(64):016x}")
        messages.append(message.as_bytes())
    return messages


# --- the harness -------------------------------------------------------------------------


@dataclass
class Sent:
    """What one side sent, as the check needs it."""

    message_id: str
    size: int
    sha256: str


@dataclass
class CallRecord:
    """One call as the harness saw it."""

    connected_at: float
    line: dict[str, Any]
    ends: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> endpoint result

    @property
    def seconds(self) -> float:
        """From the line coming up to the later of the two hang-ups."""
        return float(max(end["closed_at"] for end in self.ends.values())) - self.connected_at


def write_outbox(directory: Path, messages: Sequence[bytes], prefix: str) -> list[Sent]:
    """Each message as ``ID.text`` and ``ID.json`` (its envelope) for an endpoint to queue."""
    directory.mkdir(parents=True)
    sent = []
    for index, text in enumerate(messages):
        message_id = f"{prefix}{index:04d}"
        (directory / f"{message_id}.text").write_bytes(text)
        envelope = {
            "from": f"<user{index}@{prefix}.example>",
            "to": [f"<mail{index}@dest.example>"],
        }
        (directory / f"{message_id}.json").write_text(json.dumps(envelope))
        sent.append(Sent(message_id, len(text), hashlib.sha256(text).hexdigest()))
    return sent


def intact(sent: Sequence[Sent], received: Sequence[dict[str, Any]]) -> int:
    """How many of the messages sent the receiver holds once, byte-identical."""
    held: dict[str, list[tuple[int, str]]] = {}
    for item in received:
        held.setdefault(item["id"], []).append((item["size"], item["sha256"]))
    return sum(held.get(s.message_id) == [(s.size, s.sha256)] for s in sent)


def check_delivery(sent: Sequence[Sent], received: Sequence[dict[str, Any]]) -> list[str]:
    """What is wrong with ``received`` (the receiver's committed messages) given ``sent``."""
    problems = []
    expected = {s.message_id: s for s in sent}
    seen: dict[str, int] = {}
    for item in received:
        seen[item["id"]] = seen.get(item["id"], 0) + 1
        want = expected.get(item["id"])
        if want is None:
            problems.append(f"{item['id']}: never sent")
        elif (item["size"], item["sha256"]) != (want.size, want.sha256):
            problems.append(f"{item['id']}: {item['size']} bytes differ from the {want.size} sent")
    problems.extend(f"{mid}: stored {n} times" for mid, n in seen.items() if n > 1)
    problems.extend(f"{mid}: missing" for mid in expected if mid not in seen)
    return problems


class Endpoint:
    """One endpoint process of one call."""

    def __init__(self, role: str, device: Path, work: Path, call: int, condition: Condition):
        self.role = role
        log = (work / f"{role}-{call}.log").open("w")
        command = [
            sys.executable,
            __file__,
            "--endpoint",
            role,
            "--device",
            str(device),
            "--work",
            str(work),
            "--call",
            str(call),
        ]
        if condition.compression:
            command.append("--compression")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()

    def wait_for(self, kind: str) -> dict[str, Any]:
        """The endpoint's next event of ``kind`` (it blocks)."""
        assert self.process.stdout is not None
        for text in self.process.stdout:
            event: dict[str, Any] = json.loads(text)
            if event["event"] == kind:
                return event
        raise RuntimeError(f"{self.role} endpoint exited with {self.process.wait()}")

    def kill(self) -> None:
        """Stop the process if it is still running (after a failure)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def run_call(
    emulator: LineEmulator, work: Path, call: int, condition: Condition, limit: float
) -> CallRecord:
    """One call: answerer and caller open their ports, the line comes up, both hang up."""
    answerer = Endpoint(ANSWERER, emulator.link_b, work, call, condition)
    caller: Endpoint | None = None
    try:
        answerer.wait_for("open")
        caller = Endpoint(CALLER, emulator.link_a, work, call, condition)
        caller.wait_for("open")
        connected_at = emulator.connect()
        deadline = time.monotonic() + limit
        ends = {}
        for end in (caller, answerer):
            end.process.wait(timeout=max(1.0, deadline - time.monotonic()))
            ends[end.role] = end.wait_for("result")
    finally:
        for started in (caller, answerer):
            if started is not None:
                started.kill()
    emulator.new_line()
    line = emulator.lines[-1]
    return CallRecord(connected_at, line, ends)


def run_condition(condition: Condition, seed: int, keep: Path | None = None) -> dict[str, Any]:
    """Every call of one condition, checked, as the JSON line's fields.

    The stores, outboxes and endpoint logs go to a temporary directory, or under ``keep``
    with the emulator's trace of the line's use (``line.trace``).
    """
    a_messages, b_messages = condition.a_to_b(seed), condition.b_to_a(seed)
    with tempfile.TemporaryDirectory(prefix="bench-phone-") as name:
        work = Path(name) if keep is None else keep / condition.name
        sent_a = write_outbox(work / CALLER / "outbox", a_messages, "a")
        sent_b = write_outbox(work / ANSWERER / "outbox", b_messages, "b")
        total_a = sum(s.size for s in sent_a)
        drop = None
        if condition.drop_at is not None:
            drop = DropPlan(after_bytes=int(total_a * condition.drop_at), direction="a2b")
        expected = (total_a + sum(s.size for s in sent_b)) / BYTES_PER_SECOND
        limit = 60 + 4 * expected / (1 - min(0.5, 100 * condition.ber)) + 20 * condition.latency
        emulator = LineEmulator(
            work,
            rate=RATE,
            latency=condition.latency,
            ber=condition.ber,
            seed=seed,
            drop=drop,
            trace=None if keep is None else work / "line.trace",
        )
        calls = []
        with emulator:
            calls.append(run_call(emulator, work, 1, condition, limit))
            if condition.drop_at is not None:
                calls.append(run_call(emulator, work, 2, condition, limit))
        return summarise(condition, calls, sent_a, sent_b)


def summarise(
    condition: Condition, calls: list[CallRecord], sent_a: list[Sent], sent_b: list[Sent]
) -> dict[str, Any]:
    """The JSON line of a condition from its calls; raises if a message was lost or mangled."""
    last = calls[-1].ends
    problems = [
        f"{CALLER}->{ANSWERER} {p}" for p in check_delivery(sent_a, last[ANSWERER]["received"])
    ] + [f"{ANSWERER}->{CALLER} {p}" for p in check_delivery(sent_b, last[CALLER]["received"])]
    for role, end in last.items():
        if end["pending"]:
            problems.append(f"{role} still holds {len(end['pending'])} messages")
    received = sum(end["summary"]["messages_received"] for c in calls for end in c.ends.values())
    if received != len(sent_a) + len(sent_b):
        problems.append(f"{received} messages received over the calls")
    whole = intact(sent_a, last[ANSWERER]["received"]) + intact(sent_b, last[CALLER]["received"])
    payload = sum(s.size for s in sent_a + sent_b)
    seconds = sum(c.seconds for c in calls)
    summaries = [end["summary"] for c in calls for end in c.ends.values()]
    text_on_line = sum(s["text_wire_bytes_sent"] for s in summaries)
    moved = sum(s["payload_bytes_sent"] for s in summaries)
    resent = None
    if condition.drop_at is not None:
        resent = sum(c.ends[CALLER]["summary"]["payload_bytes_sent"] for c in calls) - sum(
            s.size for s in sent_a
        )
    result = {
        "condition": condition.name,
        "payload_bytes": payload,
        "payload_a_to_b": sum(s.size for s in sent_a),
        "payload_b_to_a": sum(s.size for s in sent_b),
        "wire_bytes_a_to_b": sum(c.line["a_to_b"] for c in calls),
        "wire_bytes_b_to_a": sum(c.line["b_to_a"] for c in calls),
        "seconds": round(seconds, 3),
        "efficiency": round(payload / (BYTES_PER_SECOND * seconds), 4),
        "frames_resent": sum(s["frames_resent"] for s in summaries),
        "compression_ratio": round(moved / text_on_line, 3) if text_on_line else None,
        "bytes_resent_after_drop": resent,
        "messages_intact": whole,
        "messages": len(sent_a) + len(sent_b),
        "calls": len(calls),
        "outcomes": [c.ends[CALLER]["summary"]["outcome"] for c in calls],
        "bits_flipped": sum(c.line["flipped_a_to_b"] + c.line["flipped_b_to_a"] for c in calls),
        "ber": condition.ber,
        "latency": condition.latency,
    }
    if problems:
        result["problems"] = problems[:20]
    return result


# --- one endpoint (its own process) --------------------------------------------------------


def run_endpoint(role: str, device: Path, work: Path, call: int, compression: bool) -> None:
    """Run one end of a call on ``device`` until it hangs up; print its result as JSON.

    Events on standard output: ``open`` once the port is open (the harness then brings the
    line up), ``result`` at the end (the engine's call summary, the port's close time, and
    after the call what the store committed and what it still holds for the peer).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.protocol import connectionDone
    from twisted.internet.serialport import SerialPort
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.failure import Failure

    from relay.address import parse_forward_path, parse_reverse_path
    from relay.envelope import Envelope, Recipient, Submitter
    from relay.phone.driver import PhoneProtocol, session_factory
    from relay.phone.filestore import FilePhoneStore
    from relay.sansio.phone.link import Link, LinkParams
    from relay.sansio.phone.records import Role
    from relay.sansio.phone.session import SessionOptions

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    peer = ANSWERER if role == CALLER else CALLER
    store = FilePhoneStore(work / role / "store", reactor)
    outbox = work / role / "outbox"

    async def queue_outbox() -> None:
        for env_path in sorted(outbox.glob("*.json")):
            message_id = env_path.stem
            envelope = json.loads(env_path.read_text())
            await store.put_outgoing(
                peer,
                message_id,
                Envelope(
                    parse_reverse_path(envelope["from"]),
                    tuple(Recipient(parse_forward_path(r)) for r in envelope["to"]),
                    time.time(),
                    Submitter("ESMTP"),
                ),
                (outbox / f"{message_id}.text").read_bytes(),
            )

    closed: Deferred[float] = Deferred()

    class TimedPhoneProtocol(PhoneProtocol):
        """The driver, noting when the port closed (the end of the call at this end)."""

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            super().connectionLost(reason)
            if not closed.called:
                closed.callback(time.monotonic())

    def new_link(now: float) -> tuple[Link, LinkParams]:
        params = LinkParams()
        return Link(params, now), params

    async def call_once() -> dict[str, Any]:
        if call == 1:
            await queue_outbox()
        protocol = TimedPhoneProtocol(
            session_factory(
                role=Role.CALLER if role == CALLER else Role.ANSWERER,
                local_name=role,
                secrets={peer: SECRET.encode()},
                new_link=new_link,
                peer_name=peer if role == CALLER else None,
                options=SessionOptions(compression=compression, line_rate=RATE),
            ),
            store,
            reactor,
        )
        SerialPort(protocol, str(device), reactor, baudrate=RATE)
        print(json.dumps({"event": "open", "at": time.monotonic()}), flush=True)
        summary = await protocol.ended
        closed_at = await closed
        received = [
            {"id": mid, "size": len(text), "sha256": hashlib.sha256(text).hexdigest()}
            for mid, (_, text) in sorted(store.received(peer).items())
        ]
        return {
            "event": "result",
            "role": role,
            "summary": summary.to_dict(),
            "closed_at": closed_at,
            "received": received,
            "pending": store.pending(peer),
        }

    outcome: list[dict[str, Any]] = []

    def done(result: dict[str, Any] | Failure) -> None:
        if isinstance(result, Failure):
            result.printTraceback(file=sys.stderr)
        else:
            outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(call_once()).addBoth(done))
    reactor.run()
    if not outcome:
        raise SystemExit(1)
    print(json.dumps(outcome[0]), flush=True)


# --- command line ----------------------------------------------------------------------


def main() -> None:
    """Run the conditions asked for (all by default) and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--condition", action="append", choices=sorted(CONDITIONS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="name the conditions and exit")
    parser.add_argument("--quick", action="store_true", help="one short call (for CI)")
    parser.add_argument("--keep", type=Path, help="keep stores and logs under this directory")
    parser.add_argument("--endpoint", choices=(CALLER, ANSWERER), help=argparse.SUPPRESS)
    parser.add_argument("--device", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--call", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--compression", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.endpoint:
        sys.path.insert(0, str(ROOT))
        run_endpoint(
            options.endpoint, options.device, options.work, options.call, options.compression
        )
        return
    if options.list:
        print("\n".join(CONDITIONS))
        return
    chosen = [QUICK] if options.quick else [CONDITIONS[n] for n in options.condition or CONDITIONS]
    failed = False
    for condition in chosen:
        result = run_condition(condition, options.seed, options.keep)
        failed = failed or "problems" in result
        print(json.dumps(result), flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

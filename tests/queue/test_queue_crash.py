"""kill -9 under load, twenty times: nothing acknowledged is lost, no state is torn.

A child process (``support/crash_child.py``) stores messages and updates recipients as fast as
it can, printing each change only after its Deferred fired.  The test kills it with
SIGKILL at a random moment (sometimes during its own recovery), checks the spool
without repairing it, and starts the next child on the same spool.  After every kill:

* every message the child reported stored is there, text and envelope byte-identical,
  unless the child had been told its removal was durable;
* every message there was at least announced (no invented or half-written message);
* every recipient state is the one of the last acknowledged update of its message or
  of an update announced after it (never older, never a mixture of two);
* nothing was quarantined: a kill leaves at most a torn tail, never damage.

At the end, after a repairing recovery, every segment is sound to its last octet and no
temporary file is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.queue.layout import SpoolLayout
from relay.queue.recovery import recover
from relay.queue.state import MessageEntry

from support.queue_helpers import scan_segment

CHILD = Path(__file__).resolve().parents[1] / "support" / "crash_child.py"
ROUNDS = 20
SEED = 20240611


@dataclass
class _Message:
    """What the children said about one message."""

    text_digest: str
    env_digest: str
    intents: list[tuple[str, str]] = field(default_factory=list)  # (token, statuses|DONE)
    acked: set[str] = field(default_factory=set)

    def allowed(self) -> list[str]:
        """The states recovery may show: from the last acknowledged update on."""
        last = max((i for i, (t, _) in enumerate(self.intents) if t in self.acked), default=-1)
        states = [state for _, state in self.intents[max(last, 0) :]]
        return ["INITIAL", *states] if last == -1 else states


@dataclass
class _History:
    announced: set[tuple[str, str]] = field(default_factory=set)
    messages: dict[str, _Message] = field(default_factory=dict)
    verified: set[tuple[str, int, int]] = field(default_factory=set)  # texts never change

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "P":
                text_digest, env_digest = rest.split()
                self.announced.add((text_digest, env_digest))
            elif kind == "S":
                qid, text_digest, env_digest = rest.split()
                self.messages[qid] = _Message(text_digest, env_digest)
            elif kind == "I":
                qid, token, state = rest.split(" ", 2)
                self.messages[qid].intents.append((token, state))
            elif kind == "A":
                qid, token = rest.split()
                self.messages[qid].acked.add(token)
            elif kind == "E":
                pytest.fail(f"the child failed unexpectedly: {rest}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _text(layout: SpoolLayout, entry: MessageEntry) -> bytes:
    with open(layout.segment_path(entry.segment), "rb") as f:
        f.seek(entry.text_offset)
        return f.read(entry.size)


def _check(layout: SpoolLayout, history: _History, *, repair: bool) -> int:
    """Recover the spool and compare it with what the children reported; live messages."""
    found = recover(layout, repair=repair)
    assert found.quarantined == [], found.quarantined
    live = found.state.messages
    for qid, entry in live.items():
        message = history.messages.get(qid)
        where = (qid, entry.segment, entry.text_offset)
        if message is not None and where in history.verified:
            text_digest, env_digest = message.text_digest, message.env_digest
        else:
            env_digest = _digest(json.dumps(entry.envelope.to_dict(), sort_keys=True).encode())
            text_digest = _digest(_text(layout, entry))
            history.verified.add(where)
        if message is None:  # durable though never acknowledged: adopt it from now on
            assert (text_digest, env_digest) in history.announced, f"{qid} was never announced"
            history.messages[qid] = _Message(text_digest, env_digest)
            continue
        assert (text_digest, env_digest) == (message.text_digest, message.env_digest), qid
        statuses = [s.to_dict() for s in entry.statuses]
        state = (
            "INITIAL"
            if all(s == {"state": "pending", "attempts": 0} for s in statuses)
            else (json.dumps(statuses))
        )
        allowed = message.allowed()
        assert state in allowed or (
            state == "INITIAL" and any(json.loads(a) == statuses for a in allowed if a != "DONE")
        ), f"{qid}: recovered {state}, allowed {allowed}"
    for qid, message in history.messages.items():
        if qid not in live:
            assert "DONE" in message.allowed(), f"{qid} was acknowledged and is missing"
    return len(live)


def _run_child(spool: Path, seed: int, rng: random.Random, log: Path) -> list[str]:
    """Start a child, kill it at a random moment, return every line it printed."""
    with open(log, "ab") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(spool), str(seed)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=CHILD.parent,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    collected: list[str] = []

    def read() -> None:
        assert child.stdout is not None
        for raw in child.stdout:
            lines.put(raw.decode().rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.05, 0.6))  # may land in start-up or recovery
        else:
            while True:
                line = lines.get(timeout=30)
                assert line is not None, f"the child exited early; see {log}"
                collected.append(line)
                if line == "R":
                    break
            time.sleep(rng.uniform(0.02, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join(timeout=30)
    while (line := lines.get()) is not None:
        collected.append(line)
    return collected


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Twenty SIGKILLs at random moments under load never lose or tear acknowledged state."""
    spool = tmp_path / "spool"
    layout = SpoolLayout(spool)
    rng = random.Random(SEED)
    history = _History()
    stored = acked_updates = 0
    for round_ in range(ROUNDS):
        lines = _run_child(spool, SEED + round_, rng, tmp_path / "child-stderr.log")
        history.feed(lines)
        stored += sum(1 for line in lines if line.startswith("S "))
        acked_updates += sum(1 for line in lines if line.startswith("A "))
        if layout.log_dir.exists():
            _check(layout, history, repair=False)
    assert stored > 200 and acked_updates > 100, (stored, acked_updates)
    _check(layout, history, repair=True)
    for number in layout.segment_numbers():
        result = scan_segment(spool, number)
        assert result.stop is None and not result.damaged, (number, result.stop)
    assert layout.temp_files() == []
    assert not any(layout.quarantine_dir.iterdir())
    assert os.path.exists(layout.lock_path)

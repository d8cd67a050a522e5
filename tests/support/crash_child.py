"""The crash test's victim: a spool under load, reporting each change once it is durable.

Run as ``python crash_child.py SPOOL SEED``.  It opens (and so recovers) the spool, says
``R``, then stores messages of random sizes and contents from ``SEED``, 32 at a time, and
sends random chains of status updates to them and to messages left by earlier runs,
until it is killed.  Every line is one ``os.write`` of less than PIPE_BUF, so a kill can
cut the output only between lines:

    R                              ready: recovery is over
    P <text-digest> <env-digest>   about to store a message with these digests
    S <id> <text-digest> <env-digest>   that store's Deferred fired: it is durable
    I <id> <token> <json|DONE>     about to write these full statuses (or the removal)
    A <id> <token>                 that update's Deferred fired
    E <text>                       something unexpected failed (the test fails)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support/

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure

from relay.envelope import Envelope, RecipientState, RecipientStatus
from relay.queue.store import SpoolQueue
from relay.reply import Reply, ReplyCode

from support.queue_helpers import LOCAL_DEST, SMTP_DEST, make_envelope

SEGMENT_LIMIT = 64 * 1024
CONCURRENCY = 32


def out(line: str) -> None:
    os.write(1, (line + "\n").encode())


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def envelope_digest(envelope: Envelope) -> str:
    return digest(json.dumps(envelope.to_dict(), sort_keys=True).encode())


class Load:
    def __init__(self, queue: SpoolQueue, rng: random.Random) -> None:
        self.queue = queue
        self.rng = rng
        self.statuses: dict[str, list[RecipientStatus]] = {}
        self.busy: set[str] = set()
        self.token = 0

    async def store_one(self) -> None:
        rng = self.rng
        size = rng.choice([0, rng.randint(1, 300), rng.randint(300, 6000), rng.randint(1, 30000)])
        text = rng.randbytes(size)
        envelope = make_envelope(
            rng.randint(1, 3),
            destinations=(SMTP_DEST, LOCAL_DEST, None),
            arrival=rng.uniform(0, 2e9),
            sender=rng.choice(["alice@example.test", None, "bob@example.test"]),
        )
        text_digest, env_digest = digest(text), envelope_digest(envelope)
        out(f"P {text_digest} {env_digest}")
        qid = await self.queue.store(envelope, text)
        out(f"S {qid} {text_digest} {env_digest}")
        self.statuses[qid] = [RecipientStatus()] * len(envelope.recipients)
        if rng.random() < 0.8:
            await self.update_chain(qid)

    async def update_chain(self, qid: str) -> None:
        if qid in self.busy:
            return
        self.busy.add(qid)
        try:
            for _ in range(self.rng.randint(1, 3)):
                if not await self.update_once(qid):
                    return
        finally:
            self.busy.discard(qid)

    async def update_once(self, qid: str) -> bool:
        """One update; False when the message is gone."""
        rng = self.rng
        current = self.statuses[qid]
        self.token += 1
        token = f"{os.getpid()}-{self.token}"
        if rng.random() < 0.05:
            out(f"I {qid} {token} DONE")
            await self.queue.remove(qid)
            out(f"A {qid} {token}")
            del self.statuses[qid]
            return False
        new = list(current)
        for index in rng.sample(range(len(new)), rng.randint(1, len(new))):
            new[index] = self.random_status(new[index])
        changes = {i: s for i, s in enumerate(new) if s != current[i]}
        final = all(s.state.is_final for s in new)
        out(f"I {qid} {token} " + ("DONE" if final else json.dumps([s.to_dict() for s in new])))
        await self.queue.update(qid, changes)
        out(f"A {qid} {token}")
        if final:
            del self.statuses[qid]
            return False
        self.statuses[qid] = new
        return True

    def random_status(self, old: RecipientStatus) -> RecipientStatus:
        rng = self.rng
        kind = rng.choice(["delivered", "delivered", "failed", "deferred", "held", "pending"])
        attempts = old.attempts + 1
        if kind == "delivered":
            return RecipientStatus(RecipientState.DELIVERED, attempts, None, Reply(ReplyCode.MOK))
        if kind == "failed":
            return RecipientStatus(
                RecipientState.FAILED, attempts, None, Reply(ReplyCode.USER, "no such user")
            )
        if kind == "deferred":
            reply = Reply(ReplyCode.DHST, "connection refused", 421, "4.4.1")
            return RecipientStatus(
                RecipientState.DEFERRED, attempts, rng.uniform(2e9, 3e9), reply, rng.random() < 0.3
            )
        if kind == "held":
            return replace(old, state=RecipientState.HELD)
        return RecipientStatus(RecipientState.PENDING, old.attempts, None, old.last_reply)


def report(failure: Failure) -> None:
    out("E " + failure.getErrorMessage().replace("\n", " "))
    sys.stderr.write(failure.getTraceback())


async def main(spool: str, seed: int) -> None:
    queue = await SpoolQueue.open(Path(spool), reactor, segment_limit=SEGMENT_LIMIT)  # type: ignore[arg-type]
    out("R")
    load = Load(queue, random.Random(seed))
    for qid in await queue.list_messages():
        _, statuses = await queue.load(qid)
        load.statuses[qid] = list(statuses)
        if load.rng.random() < 0.9:
            defer.ensureDeferred(load.update_chain(qid)).addErrback(report)
    semaphore = defer.DeferredSemaphore(CONCURRENCY)
    while True:
        await semaphore.acquire()
        d = defer.ensureDeferred(load.store_one())
        d.addErrback(report)
        d.addBoth(lambda _: semaphore.release())


if __name__ == "__main__":
    task.react(lambda _: defer.ensureDeferred(main(sys.argv[1], int(sys.argv[2]))))

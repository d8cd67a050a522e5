"""The deliverer on the real spool: a crash mid-delivery re-delivers exactly what was unrecorded.

Two ways of dying are tested, each in both sequencing modes:

* ``kill -9``: a child process runs the deliverer over a spool with a channel that
  hangs forever on the second message, journaling (with fsync) every copy it delivers.
  Once the other messages are recorded and the second one hangs, the test kills it
  with SIGKILL, reopens the spool from disk, and runs a new deliverer.
* a stop: the same in this process, the service stopped while the channel hangs (its
  transaction cancelled after the stop grace) and the spool closed and reopened.

After either, the new deliverer must deliver exactly the recipients whose delivery the
spool had not recorded, and between the two runs every recipient must have been
delivered: a duplicate is allowed (a copy delivered but not recorded), a loss never.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from relay.deliver import build_deliverer
from relay.envelope import RecipientState
from relay.interfaces import SequencingMode
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue
from relay.reply import Reply, ReplyCode

from support.deliver_fakes import LIST, PER_ADDRESS, TEXT, ScriptedChannel, envelope, make_config
from support.reactor_helpers import until

MESSAGES = 3
RECIPIENTS = 3
HANGS_ON = 1  # the second message (by arrival)

CHILD = r"""
import os, sys
from pathlib import Path
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from zope.interface import implementer
from relay.config import parse_config
from relay.deliver import build_deliverer
from relay.interfaces import IChannel, IChannelSession, SequencingMode
from relay.queue.store import SpoolQueue
from relay.reply import Reply, ReplyCode
from relay.queue.ready import QueueReady

spool, journal_path, marker, mode_name, config_text, hang_id = sys.argv[1:7]
mode = SequencingMode(mode_name)
journal = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
state = {"queue": None, "hanging": False}


def note(queue_id, address):
    os.write(journal, f"{queue_id} {address}\n".encode())
    os.fsync(journal)


def hang():
    state["hanging"] = True
    return defer.Deferred()


@implementer(IChannelSession)
class Session:
    pipelines_addresses = False

    def begin_message(self, mode_, return_path, message):
        self.message = message
        self.accepted = []
        return defer.succeed(None)

    def add_recipient(self, recipient):
        address = str(recipient.address)
        if mode is SequencingMode.ADDRESS_THEN_TEXT:
            self.accepted.append(address)
            return defer.succeed(Reply(ReplyCode.AOK))
        if self.message.queue_id == hang_id and self.accepted:
            return hang()
        self.accepted.append(address)
        note(self.message.queue_id, address)
        return defer.succeed(Reply(ReplyCode.MOK))

    def end_recipients(self):
        return defer.succeed(None)

    def begin_text(self):
        return defer.succeed(None)

    def write_text(self, chunk):
        return defer.succeed(None)

    def end_text(self):
        if self.message.queue_id == hang_id:
            return hang()
        for address in self.accepted:
            note(self.message.queue_id, address)
        return defer.succeed(Reply(ReplyCode.OK))

    def abort_message(self):
        return defer.succeed(None)

    def end_session(self):
        return defer.succeed(None)


@implementer(IChannel)
class Channel:
    name = "fake"

    def __init__(self):
        self.mode = mode

    def open_session(self, destination):
        return defer.succeed(Session())


def watch():
    queue = state["queue"]
    if state["hanging"] and [e.queue_id for e in queue.entries()] == [hang_id]:
        Path(marker).write_text("hanging")


async def main():
    queue = await SpoolQueue.open(Path(spool), reactor)
    state["queue"] = queue
    config = parse_config(config_text, Path(spool))
    quiet = Logger(observer=lambda e: None)
    service = build_deliverer(config, QueueReady.of(queue), {"fake": Channel()}, reactor, log=quiet)
    service.startService()
    task.LoopingCall(watch).start(0.01)


defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), os._exit(3)))
reactor.run()
"""

CONFIG_TEXT = """
[relay]
hostname = "relay.here.test"
local_domains = ["here.test"]
postmaster = "postmaster@here.test"

[deliver]
initial_destination_concurrency = 1
"""


async def _store(spool: Path) -> list[str]:
    """Queue the test's messages and close the spool; their ids, oldest first."""
    queue = await SpoolQueue.open(spool, reactor)
    ids = []
    for m in range(MESSAGES):
        addresses = [f"m{m}r{r}@dest.test" for r in range(RECIPIENTS)]
        ids.append(await queue.store(envelope(*addresses, arrival=time.time()), TEXT))
    await queue.close()
    return ids


async def _unrecorded(spool: Path, ids: list[str]) -> tuple[SpoolQueue, set[tuple[str, str]]]:
    """Reopen the spool from disk; the recipients it has not recorded as delivered."""
    queue = await SpoolQueue.open(spool, reactor)
    left: set[tuple[str, str]] = set()
    for entry in queue.entries():
        for recipient, status in zip(entry.envelope.recipients, entry.statuses, strict=True):
            assert status.state is not RecipientState.FAILED
            if status.state is not RecipientState.DELIVERED:
                assert status.attempts == 0  # an attempt is recorded only with its reply
                left.add((entry.queue_id, str(recipient.address)))
    assert {e.queue_id for e in queue.entries()} <= set(ids)
    return queue, left


async def _second_run(queue: SpoolQueue, mode: SequencingMode) -> set[tuple[str, str]]:
    """A fresh deliverer on the reopened spool; what it delivered, once the spool is empty."""
    channel = ScriptedChannel(mode)
    config = make_config()
    service = build_deliverer(config, QueueReady.of(queue), {"fake": channel}, reactor)
    service.startService()
    try:
        await until(lambda: not queue.entries(), 30)
    finally:
        await service.stopService()
        await queue.close()
    assert len(channel.delivered) == len(set(channel.delivered))
    return set(channel.delivered)


def _everyone(ids: list[str]) -> set[tuple[str, str]]:
    return {(q, f"m{m}r{r}@dest.test") for m, q in enumerate(ids) for r in range(RECIPIENTS)}


@pytest.mark.parametrize("mode", [LIST, PER_ADDRESS])
@pytest_twisted.ensureDeferred
async def test_kill_9_mid_delivery_redelivers_exactly_the_unrecorded(
    tmp_path: Path, mode: SequencingMode
) -> None:
    """SIGKILL while a channel hangs: a restart delivers exactly the unrecorded recipients."""
    spool = tmp_path / "spool"
    ids = await _store(spool)
    journal = tmp_path / "journal"
    marker = tmp_path / "hanging"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(spool),
            str(journal),
            str(marker),
            mode.value,
            CONFIG_TEXT,
            ids[HANGS_ON],
        ],
        cwd=Path(__file__).parent.parent,
        stderr=subprocess.PIPE,
    )
    try:
        await until(lambda: marker.exists() or child.poll() is not None, 60)
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stderr:
            child.stderr.close()
    first = {tuple(line.split()) for line in journal.read_text().splitlines()}
    queue, left = await _unrecorded(spool, ids)
    assert {q for q, _ in left} == {ids[HANGS_ON]}
    second = await _second_run(queue, mode)
    assert second == left  # exactly the unrecorded ones
    assert first | second == _everyone(ids)  # nobody lost
    duplicates = first & second
    if mode is PER_ADDRESS:
        # the hung message's first copy was delivered but not recorded: sent again
        assert duplicates == {(ids[HANGS_ON], "m1r0@dest.test")}
    else:
        assert duplicates == set()


@pytest.mark.parametrize("mode", [LIST, PER_ADDRESS])
@pytest_twisted.ensureDeferred
async def test_stop_mid_delivery_then_restart_redelivers_exactly_the_unrecorded(
    tmp_path: Path, mode: SequencingMode
) -> None:
    """Stopped while a channel hangs: the spool reopened, exactly the unrecorded go again."""
    spool = tmp_path / "spool"
    ids = await _store(spool)
    queue = await SpoolQueue.open(spool, reactor)
    hang: Deferred[Reply] = Deferred()

    def hang_on_second() -> object:
        assert channel.current is not None and channel.current.message is not None
        if channel.current.message.queue_id == ids[HANGS_ON]:
            return hang
        return Reply(ReplyCode.OK)

    channel = ScriptedChannel(mode)
    if mode is LIST:
        channel.answers["end_text"] = hang_on_second
    else:

        def per_address(recipient: Any) -> object:
            if str(recipient.address) == "m1r1@dest.test":
                return hang
            return Reply(ReplyCode.MOK)

        channel.answers["add_recipient"] = per_address
    config = make_config(initial_destination_concurrency=1)
    service = build_deliverer(
        config, QueueReady.of(queue), {"fake": channel}, reactor, stop_grace=0.05
    )
    service.startService()
    await until(lambda: [e.queue_id for e in queue.entries()] == [ids[HANGS_ON]], 30)
    await service.stopService()
    assert hang.called  # cancelled by the stop
    await queue.close()
    first = set(channel.delivered)
    queue, left = await _unrecorded(spool, ids)
    second = await _second_run(queue, mode)
    assert second == left
    assert first | second == _everyone(ids)
    # a stop records the replies that were final: nothing is delivered twice
    assert first & second == set()

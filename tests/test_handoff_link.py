"""A worker's store over a real UNIX socket pair to a spool: answers, failures, a lost link."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.address import Address
from relay.envelope import Envelope, Recipient, Submitter
from relay.errors import SpoolError
from relay.gateway.limits import AuthThrottle, LocalAuthThrottle
from relay.handoff.codec import (
    MAX_ACK_DATAGRAM,
    HandoffError,
    Hello,
    Stored,
    StoreRequest,
    decode,
    encode,
    framed,
    unframed,
)
from relay.handoff.spool_side import StoreServer, frame_limit
from relay.handoff.worker_side import AckReader, StoreClient
from relay.interfaces import AuthVerdict, IStore
from relay.queue.payload import encode_envelope
from relay.runtime.fastwrite import is_idle_plain_tcp

from support.memqueue import MemoryQueue
from support.reactor_helpers import until

HELLO = Hello("[relay]\nhostname = 'x.test'\n", "/tmp", ("local", "smtp"), 1, 2)


def _envelope(n: int = 1) -> Envelope:
    return Envelope(
        return_path=Address("sender", "x.test"),
        recipients=tuple(Recipient(Address(f"rcpt{i}", "y.test")) for i in range(n)),
        arrival=1_700_000_000.0,
        submitter=Submitter("ESMTP", client_address="192.0.2.7", helo="client.test"),
    )


@dataclass
class Link:
    server: StoreServer
    client: StoreClient
    queue: MemoryQueue
    hellos: list[Hello] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    acks: AckReader | None = None


class _One(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        self.protocol_instance.factory = self
        return self.protocol_instance


async def _link(queue: MemoryQueue | None = None, *, early: bool = False) -> Link:
    """A worker's link over a real socket pair; with ``early``, the datagram socket too."""
    memory = MemoryQueue(reactor) if queue is None else queue
    acks, their_acks = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    acks.setblocking(False)
    limit = frame_limit(1024 * 1024)
    auth = AuthThrottle(reactor, max_failures=2)
    server = StoreServer(
        HELLO, memory, limit, acks=acks if early else None, auth=LocalAuthThrottle(auth)
    )
    hellos: list[Hello] = []
    lost: list[str] = []
    client = StoreClient(hellos.append, lost.append)
    reader = AckReader(their_acks, client)
    if early:
        reactor.addReader(reader)
    else:
        acks.close()
        their_acks.close()
    ours, theirs = socket.socketpair()
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _One(server))
        reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, _One(client))
    finally:
        ours.close()
        theirs.close()
    link = Link(server, client, memory, hellos, lost, reader if early else None)
    await until(lambda: hellos)
    return link


def _close(link: Link) -> None:
    for end in (link.server, link.client):
        if end.transport is not None:
            end.transport.loseConnection()
    if link.acks is not None:
        reactor.removeReader(link.acks)
        link.server.close_acks()
        link.acks.connectionLost(Failure(ConnectionDone()))


def test_the_worker_end_provides_istore() -> None:
    """The worker's end of the link verifies against IStore."""
    assert verifyObject(IStore, StoreClient(lambda hello: None, lambda why: None))


@pytest_twisted.ensureDeferred
async def test_a_store_is_answered_with_the_spools_queue_id(events: list[LogEvent]) -> None:
    """A store over the link fires with the spool's queue id; the text is kept byte for
    byte and logged as stored."""
    link = await _link()
    try:
        assert link.hellos == [HELLO]
        envelope = _envelope(3)
        text = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 40
        queue_id = await link.client.store(envelope, text)
        assert link.queue.texts[queue_id] == text
        assert link.queue.journal[0] == ("store", queue_id, envelope)
        assert link.server.stored == 1 and link.client.in_flight == 0
        # both ends are UNIX sockets that fastwrite writes to directly
        assert is_idle_plain_tcp(link.server.transport)
        assert is_idle_plain_tcp(link.client.transport)
        stored = [e for e in events if e.get("queue_id") == queue_id]
        assert stored and "stored from=<sender@x.test> nrcpt=3" in stored[0]["summary"]
        assert stored[0]["client"] == "192.0.2.7"
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_many_stores_in_flight_each_get_their_own_answer() -> None:
    """Fifty stores in flight at once each fire with the id of their own text."""
    link = await _link()
    try:
        texts = [f"Subject: {i}\r\n\r\n{i}\r\n".encode() * (i + 1) for i in range(50)]
        ids = await defer.gatherResults([link.client.store(_envelope(), t) for t in texts])
        assert [link.queue.texts[queue_id] for queue_id in ids] == texts
        assert len(set(ids)) == 50
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_comes_back_as_enospc_and_other_failures_as_handoff_errors() -> None:
    """A full disk in the spool fails the worker's store with ENOSPC, any other failure
    with HandoffError."""
    queue = MemoryQueue(reactor)
    link = await _link(queue)
    try:
        queue.fail_stores = 1
        queue.store_error = SpoolError("no space")
        queue.store_error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
        with pytest.raises(OSError) as full:
            await link.client.store(_envelope(), b"x\r\n")
        assert full.value.errno == errno.ENOSPC
        queue.fail_stores = 1
        queue.store_error = SpoolError("disk on fire")
        with pytest.raises(HandoffError, match="disk on fire"):
            await link.client.store(_envelope(), b"x\r\n")
        assert queue.texts == {}
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_a_spool_not_open_yet_refuses_the_store() -> None:
    """While the spool is not open the store fails with HandoffError."""
    link = await _link()
    try:
        link.server.queue = None
        with pytest.raises(HandoffError, match="not open yet"):
            await link.client.store(_envelope(), b"x\r\n")
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_a_lost_link_fails_what_waits_and_tells_the_worker() -> None:
    """A lost link fails the stores waiting on it, drains, tells the worker, and refuses
    later stores."""
    queue = MemoryQueue(reactor, latency=60.0)  # never answers within the test
    link = await _link(queue)
    waiting = link.client.store(_envelope(), b"x\r\n")
    drained = link.client.drained()
    assert link.client.in_flight == 1 and not drained.called
    assert link.server.transport is not None
    link.server.transport.loseConnection()
    with pytest.raises(HandoffError, match="went away"):
        await waiting
    await drained
    await until(lambda: link.lost)
    with pytest.raises(HandoffError, match="no link"):
        await link.client.store(_envelope(), b"x\r\n")


@pytest_twisted.ensureDeferred
async def test_a_malformed_frame_from_a_worker_is_counted_and_drops_the_link(
    events: list[LogEvent],
) -> None:
    """A malformed STORE frame is logged, counted in rejected, and drops the link."""
    link = await _link()
    transport = link.client.transport
    assert transport is not None
    bad = StoreRequest(7, b'{"not": "an envelope"}', b"text")
    transport.write(framed(encode(bad)))
    await until(lambda: link.lost)
    assert link.server.rejected == 1 and link.server.stored == 0
    assert any("malformed frame" in str(e.get("log_format")) for e in events)


@pytest_twisted.ensureDeferred
async def test_a_frame_over_the_limit_drops_the_link() -> None:
    """A frame longer than the spool side's limit is counted in rejected and drops the link."""
    link = await _link()
    link.server.MAX_LENGTH = 1000
    envelope = encode_envelope(_envelope())
    assert link.client.transport is not None
    link.client.transport.write(framed(encode(StoreRequest(1, envelope, b"x" * 2000))))
    await until(lambda: link.lost)
    assert link.server.rejected == 1


@pytest_twisted.ensureDeferred
async def test_an_answer_nobody_asked_for_ends_the_worker() -> None:
    """A STORED answer for a request the worker never made ends the link."""
    link = await _link()
    assert link.server.transport is not None
    link.server.transport.write(framed(b"K\x00\x00\x00\x09" + b"0123456789ABCD"))
    await until(lambda: link.lost)


def test_the_frame_limit_leaves_room_for_the_largest_message() -> None:
    """frame_limit leaves room for the largest message plus its envelope and header."""
    assert frame_limit(10 * 1024 * 1024) > 10 * 1024 * 1024 + 64 * 1024


@pytest_twisted.ensureDeferred
async def test_an_early_answer_comes_as_a_datagram_and_only_once() -> None:
    """With the datagram socket, STORED comes from the durable hook, not over the link."""
    link = await _link(early=True)
    try:
        ids = [await link.client.store(_envelope(), b"x\r\n") for _ in range(5)]
        assert link.server.early == 5 and link.server.stored == 5
        assert all(link.queue.texts[queue_id] == b"x\r\n" for queue_id in ids)
        assert link.client.in_flight == 0
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_when_the_datagram_cannot_go_the_link_answers() -> None:
    """A closed or full datagram socket costs nothing but the early answer."""
    link = await _link(early=True)
    try:
        assert link.acks is not None
        reactor.removeReader(link.acks)
        link.acks.connectionLost(Failure(ConnectionDone()))  # the worker's end is gone
        queue_id = await link.client.store(_envelope(), b"x\r\n")
        assert link.server.early == 0 and link.queue.texts[queue_id] == b"x\r\n"
        link.acks = None
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_ready_tells_the_spool_side_that_the_worker_accepts() -> None:
    """READY frames tell the spool side, in order, whether the worker accepts connections."""
    link = await _link()
    try:
        changes: list[bool] = []
        link.server.on_ready_change = lambda: changes.append(link.server.ready)
        assert not link.server.ready
        link.client.ready()
        await until(lambda: link.server.ready)
        link.client.ready(False)  # full, or stopping
        await until(lambda: not link.server.ready)
        assert changes == [True, False]
        assert not link.lost and link.server.rejected == 0
    finally:
        _close(link)


class _AnsweredThenFailed(MemoryQueue):
    """A spool whose batch fails after the message was synced and announced (a defect)."""

    def store(self, envelope: Envelope, text: bytes, *, on_durable: Any = None, **_: Any) -> Any:
        if on_durable is not None:
            finish = on_durable("0660CB0F36073B")
            if callable(finish):
                finish()
        return defer.fail(SpoolError("the writer failed the batch afterwards"))


@pytest_twisted.ensureDeferred
async def test_a_failure_after_an_early_answer_is_logged_not_sent(
    events: list[LogEvent],
) -> None:
    """The worker said 250 already: a FAILED now would break the link for nothing."""
    link = await _link(_AnsweredThenFailed(reactor), early=True)
    try:
        assert await link.client.store(_envelope(), b"x\r\n") == "0660CB0F36073B"
        await task.deferLater(reactor, 0.05, lambda: None)
        assert not link.lost and link.server.rejected == 0 and link.client.in_flight == 0
        assert any("already answered failed" in str(e.get("log_format")) for e in events)
    finally:
        _close(link)


def _answers_of_one_sync(count: int) -> tuple[StoreServer, list[bytes]]:
    """``count`` answers noted by the spool's hooks, then its finishers run: the datagrams."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    server = StoreServer(
        HELLO,
        None,
        frame_limit(1024),
        acks=ours,
        auth=LocalAuthThrottle(AuthThrottle(task.Clock())),
    )
    finishers = []
    for n in range(count):
        finish = server._ack_early(n, f"0660CB0F36{n:04X}")
        if finish not in finishers:
            finishers.append(finish)
    for finish in finishers:
        finish()
    datagrams = []
    while True:
        try:
            datagrams.append(theirs.recv(MAX_ACK_DATAGRAM * 2))
        except BlockingIOError:
            break
    server.close_acks()
    theirs.close()
    return server, datagrams


def test_the_answers_of_one_sync_leave_in_one_datagram() -> None:
    """Three messages synced together: one finisher, one datagram, three STOREDs in order."""
    server, datagrams = _answers_of_one_sync(3)
    assert len(datagrams) == 1
    frames = [decode(payload) for payload in unframed(datagrams[0])]
    assert frames == [Stored(n, f"0660CB0F36{n:04X}") for n in range(3)]
    assert server._acked == {0, 1, 2}  # the reactor will not answer them again


def test_many_answers_are_cut_into_datagrams_that_fit() -> None:
    """More answers than one datagram holds: several, each within the limit, none lost."""
    server, datagrams = _answers_of_one_sync(2000)
    assert len(datagrams) > 1 and all(len(d) <= MAX_ACK_DATAGRAM for d in datagrams)
    frames = [decode(p) for d in datagrams for p in unframed(d)]
    assert frames == [Stored(n, f"0660CB0F36{n:04X}") for n in range(2000)]
    assert len(server._acked) == 2000


class _Silent(MemoryQueue):
    """A spool that never answers on the link: only datagrams answer the worker."""

    def store(self, envelope: Envelope, text: bytes, **_: Any) -> Any:
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_a_datagram_of_several_answers_fires_each_store() -> None:
    """The worker takes every STORED of a datagram; a cut datagram ends the link."""
    link = await _link(_Silent(reactor))
    try:
        first = link.client.store(_envelope(), b"x\r\n")
        second = link.client.store(_envelope(), b"y\r\n")
        both = framed(encode(Stored(0, "0660CB0F360000")))
        both += framed(encode(Stored(1, "0660CB0F360001")))
        link.client.datagramReceived(both)
        assert await first == "0660CB0F360000" and await second == "0660CB0F360001"
        assert link.client.in_flight == 0 and not link.lost
        third = link.client.store(_envelope(), b"z\r\n")
        link.client.datagramReceived(framed(encode(Stored(2, "0660CB0F360002")))[:-3])
        await until(lambda: link.lost)
        with pytest.raises(HandoffError):
            await third  # the link is gone: the store fails, the client gets 451
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_a_bad_frame_in_a_datagram_stops_the_rest_of_it(events: list[LogEvent]) -> None:
    """The first bad answer ends the link; the answers after it are not read (nor logged)."""
    link = await _link(_Silent(reactor))
    try:
        unknown = [framed(encode(Stored(n, f"0660CB0F36{n:04X}"))) for n in (7, 8, 9)]
        link.client.datagramReceived(b"".join(unknown))  # none of them is waiting
        await until(lambda: link.lost)
        malformed = [e for e in events if "malformed frame" in str(e.get("log_format"))]
        assert len(malformed) == 1
    finally:
        _close(link)


@pytest_twisted.ensureDeferred
async def test_auth_questions_over_the_link_and_a_link_that_drops() -> None:
    """Over a real socket pair a verdict comes back; when the link drops, the question
    still waiting fails (454, nothing checked) and the allowed attempt counts as failed."""
    link = await _link()
    try:
        assert await link.client.auth.begin("192.0.2.9") == AuthVerdict(True, 0, 1, 900.0)
        waiting = link.client.auth.begin("192.0.2.9")
        assert link.server.transport is not None
        link.server.transport.loseConnection()  # before it reads the second question
        with pytest.raises(HandoffError):
            await waiting
        await until(lambda: link.server.lost and link.lost)
        throttle = link.server.auth.throttle  # the LocalAuthThrottle's count
        assert (throttle.failures("192.0.2.9"), throttle.pending("192.0.2.9")) == (1, 0)
    finally:
        _close(link)

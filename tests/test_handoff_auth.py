"""Failed AUTH counted relay-wide: a worker asks the spool's process over its link.

Each end is driven alone against a fake of the other: the worker's
:class:`RemoteAuthThrottle` against a list of sent frames, the spool's
:class:`StoreServer` and the worker's :class:`StoreClient` against a ``StringTransport``.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.gateway.limits import AuthThrottle, AuthVerdict, LocalAuthThrottle
from relay.handoff.codec import (
    AuthAnswer,
    AuthBegin,
    AuthEnd,
    Frame,
    HandoffError,
    Hello,
    decode,
    encode,
)
from relay.handoff.remote_auth import RemoteAuthThrottle
from relay.handoff.spool_side import StoreServer, frame_limit
from relay.handoff.worker_side import StoreClient
from relay.interfaces import IAuthThrottle

from reactor_helpers import logged_events

HELLO = Hello("", "/tmp", ("local",), 1, 2)
CLIENT = "192.0.2.9"
ALLOWED = AuthVerdict(True, 0, 1, 900.0)


class FakeLink:
    """The worker's link as the remote throttle sees it: frames sent, while it is up."""

    def __init__(self) -> None:
        self.sent: list[Frame] = []
        self.up = True

    def send(self, frame: Frame) -> bool:
        if self.up:
            self.sent.append(frame)
        return self.up


def _verdicts(d: Deferred[AuthVerdict]) -> list[object]:
    """What ``d`` fired with so far: a verdict or a Failure (empty while it waits)."""
    seen: list[object] = []
    d.addBoth(seen.append)
    return seen


def test_both_throttles_provide_the_interface() -> None:
    """The sessions see one interface, whichever process keeps the count."""
    assert verifyObject(IAuthThrottle, RemoteAuthThrottle(FakeLink().send))
    assert verifyObject(IAuthThrottle, LocalAuthThrottle(AuthThrottle(Clock())))


def test_the_local_throttle_answers_at_once_and_counts() -> None:
    """Local: the verdict carries the counts; an ended failure counts in the window."""
    local = LocalAuthThrottle(AuthThrottle(Clock(), max_failures=1, window=60))
    assert _verdicts(local.begin(CLIENT)) == [AuthVerdict(True, 0, 1, 60)]
    assert _verdicts(local.begin(CLIENT)) == [AuthVerdict(False, 0, 1, 60)]
    local.end(CLIENT, failed=True)
    assert _verdicts(local.begin(CLIENT)) == [AuthVerdict(False, 1, 0, 60)]


def test_a_question_is_sent_and_its_verdict_fires_it() -> None:
    """begin() sends AUTH with a fresh request number; the VERDICT for it fires its Deferred."""
    link = FakeLink()
    remote = RemoteAuthThrottle(link.send)
    first, second = _verdicts(remote.begin(CLIENT)), _verdicts(remote.begin("::1"))
    assert link.sent == [AuthBegin(0, CLIENT), AuthBegin(1, "::1")]
    assert first == second == [] and remote.waiting == 2
    refused = AuthVerdict(False, 5, 0, 900.0)
    remote.answered(AuthAnswer(1, refused))
    remote.answered(AuthAnswer(0, ALLOWED))
    assert first == [ALLOWED] and second == [refused] and remote.waiting == 0
    remote.end(CLIENT, failed=True)
    assert link.sent[-1] == AuthEnd(CLIENT, True)


def test_a_verdict_nobody_waits_for_is_a_handoff_error() -> None:
    """An answer to a question not asked (or answered twice) is a broken peer."""
    remote = RemoteAuthThrottle(FakeLink().send)
    remote.begin(CLIENT)
    remote.answered(AuthAnswer(0, ALLOWED))
    with pytest.raises(HandoffError, match="not waiting"):
        remote.answered(AuthAnswer(0, ALLOWED))


def test_a_lost_link_fails_the_questions_waiting_and_every_later_one() -> None:
    """No verdict, no check: what waits fails (454), later questions fail at once, and
    the outcome of an attempt already allowed is no longer sent (the spool counts it)."""
    link = FakeLink()
    remote = RemoteAuthThrottle(link.send)
    allowed = _verdicts(remote.begin(CLIENT))
    remote.answered(AuthAnswer(0, ALLOWED))
    waiting = _verdicts(remote.begin(CLIENT))
    link.up = False
    remote.link_lost()
    assert allowed == [ALLOWED]
    assert isinstance(waiting[0], Failure) and waiting[0].check(HandoffError)
    later = _verdicts(remote.begin(CLIENT))
    assert isinstance(later[0], Failure) and later[0].check(HandoffError)
    sent = len(link.sent)
    remote.end(CLIENT, failed=False)
    assert len(link.sent) == sent and remote.waiting == 0


def test_a_question_that_cannot_be_sent_fails_at_once() -> None:
    """Before the link is up (or once it is down) begin() fails instead of waiting forever."""
    link = FakeLink()
    link.up = False
    remote = RemoteAuthThrottle(link.send)
    failed = _verdicts(remote.begin(CLIENT))
    assert isinstance(failed[0], Failure) and failed[0].check(HandoffError)
    assert remote.waiting == 0


# --------------------------------------------------------------------------- the spool's end


def _server(throttle: AuthThrottle) -> tuple[StoreServer, StringTransport]:
    server = StoreServer(HELLO, None, frame_limit(1024), auth=throttle)
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()  # the HELLO
    return server, transport


def _sent(transport: StringTransport) -> list[Frame]:
    """The frames written to ``transport`` since the last call."""
    data, frames = transport.value(), []
    transport.clear()
    while data:
        length = int.from_bytes(data[:4], "big")
        frames.append(decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def _from_worker(server: StoreServer, frame: Frame) -> None:
    server.stringReceived(encode(frame))


def test_the_spool_answers_from_the_one_count_every_process_shares() -> None:
    """Two workers and the spool's own sessions ask one AuthThrottle: 3 allowed in all."""
    throttle = AuthThrottle(Clock(), max_failures=3, window=60)
    (one, to_one), (two, to_two) = _server(throttle), _server(throttle)
    _from_worker(one, AuthBegin(7, CLIENT))
    _from_worker(two, AuthBegin(0, CLIENT))
    assert _sent(to_one) == [AuthAnswer(7, AuthVerdict(True, 0, 1, 60))]
    assert _sent(to_two) == [AuthAnswer(0, AuthVerdict(True, 0, 2, 60))]
    assert _verdicts(LocalAuthThrottle(throttle).begin(CLIENT))[0] == AuthVerdict(True, 0, 3, 60)
    _from_worker(two, AuthBegin(1, CLIENT))
    assert _sent(to_two) == [AuthAnswer(1, AuthVerdict(False, 0, 3, 60))]
    _from_worker(one, AuthEnd(CLIENT, failed=True))
    _from_worker(two, AuthEnd(CLIENT, failed=False))
    assert (throttle.failures(CLIENT), throttle.pending(CLIENT)) == (1, 1)
    assert one.auth_in_progress == two.auth_in_progress == {}
    assert one.rejected == two.rejected == 0 and to_one.connected


def test_attempts_in_progress_on_a_lost_link_count_as_failed() -> None:
    """The worker went while its sessions' passwords were being checked: each counts failed."""
    throttle = AuthThrottle(Clock(), max_failures=5, window=60)
    server, _ = _server(throttle)
    for request in range(3):
        _from_worker(server, AuthBegin(request, CLIENT))
    _from_worker(server, AuthBegin(3, "192.0.2.10"))
    _from_worker(server, AuthEnd(CLIENT, failed=False))
    with logged_events() as events:
        server.connectionLost(None)
    assert (throttle.failures(CLIENT), throttle.pending(CLIENT)) == (2, 0)
    assert (throttle.failures("192.0.2.10"), throttle.pending("192.0.2.10")) == (1, 0)
    lines = [formatEvent(e) for e in events]
    assert "smtp worker 1: link lost with 2 AUTH check(s) of 192.0.2.9 in progress" in lines[0]


@pytest.mark.parametrize(
    "frame",
    [AuthEnd(CLIENT, failed=True), AuthAnswer(0, ALLOWED)],
    ids=["ENDED without an attempt", "a VERDICT from the worker"],
)
def test_an_auth_frame_out_of_turn_drops_the_link(frame: Frame) -> None:
    """ENDED for nothing allowed, or a worker answering, is a bug: logged, counted, dropped."""
    throttle = AuthThrottle(Clock(), max_failures=1, window=60)
    server, transport = _server(throttle)
    with logged_events():
        _from_worker(server, frame)
    assert server.rejected == 1 and transport.disconnecting
    assert server.auth_in_progress == {} and throttle.failures(CLIENT) == 0


# --------------------------------------------------------------------------- the worker's end


def test_the_worker_link_carries_questions_and_fails_them_when_it_drops() -> None:
    """StoreClient.auth sends AUTH on the link, takes the VERDICT, and fails on loss."""
    lost: list[str] = []
    client = StoreClient(lambda hello: None, lost.append)
    transport = StringTransport()
    client.makeConnection(transport)
    answered = _verdicts(client.auth.begin(CLIENT))
    assert _sent(transport) == [AuthBegin(0, CLIENT)]
    client.stringReceived(encode(AuthAnswer(0, ALLOWED)))
    assert answered == [ALLOWED]
    client.auth.end(CLIENT, failed=True)
    assert _sent(transport) == [AuthEnd(CLIENT, True)]
    waiting = _verdicts(client.auth.begin(CLIENT))
    client.connectionLost(None)
    assert isinstance(waiting[0], Failure) and waiting[0].check(HandoffError)
    assert lost == ["closed"]


def test_the_worker_drops_a_link_that_sends_a_worker_frame() -> None:
    """An AUTH question from the spool's side is a bug: the worker drops the link."""
    client = StoreClient(lambda hello: None, lambda why: None)
    transport = StringTransport()
    client.makeConnection(transport)
    with logged_events():
        client.stringReceived(encode(AuthBegin(0, CLIENT)))
    assert transport.disconnecting

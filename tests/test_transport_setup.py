"""LineSetup on a StringTransport and a Clock: modem, login, hand-over, NO CARRIER, hang-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error as internet_error
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.reply import Action, ReplyCode
from relay.transport import dial_plan
from relay.transport.lock import DeviceLocked
from relay.transport.setup import CallFailed, LinePlan, LineSetup, place_call


class Recorder(Protocol):
    """A call protocol that keeps what it got and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.made = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = reason


class LineTransport(StringTransport):
    """A StringTransport that records DTR changes and closes like a port."""

    def __init__(self) -> None:
        super().__init__()
        self.dtr: list[bool] = []

    def set_dtr(self, on: bool) -> bool:
        self.dtr.append(on)
        return True


def _setup(plan: LinePlan) -> tuple[LineSetup, Recorder, LineTransport, Clock, list[Any]]:
    clock = Clock()
    call = Recorder()
    setup = LineSetup(plan, call, clock)
    outcome: list[Any] = []
    setup.handed_over.addBoth(outcome.append)
    transport = LineTransport()
    setup.makeConnection(transport)
    return setup, call, transport, clock, outcome


def _take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def test_a_direct_line_hands_over_at_once() -> None:
    """With no modem and no login, the call protocol has the line as soon as it opens."""
    setup, call, _transport, _, outcome = _setup(LinePlan())
    assert call.made == 1 and outcome == [setup]
    setup.dataReceived(b"frame")
    assert call.data == b"frame"


def test_dial_then_login_then_the_call_gets_every_byte_after_the_last_match() -> None:
    """ATZ, ATDT, CONNECT, login chat; the bytes after Password's answer reach the call."""
    plan = dial_plan(
        modem_init=["ATZ"],
        dial="5551234",
        chat=r"ogin: nuucp ssword: \P",
        substitutions={"P": b"pw"},
    )
    setup, call, transport, _clock, outcome = _setup(plan)
    assert _take(transport) == b"ATZ\r"
    setup.dataReceived(b"ATZ\r\r\nOK\r\n")
    assert _take(transport) == b"ATDT5551234\r"
    setup.dataReceived(b"\r\nCONNECT 57600\r\n\r\nlogin: ")
    assert _take(transport) == b"nuucp\r"
    assert call.made == 0 and setup.phase == "login"
    setup.dataReceived(b"Password: ")
    assert _take(transport) == b"pw\r"
    assert outcome == [setup] and setup.rate == 57600 and call.made == 1
    setup.dataReceived(b"\x7e\x01hello")
    assert call.data == b" \x7e\x01hello"  # the space after "ssword:" was not matched


def test_bytes_in_the_same_read_as_connect_are_not_lost() -> None:
    """CONNECT and the far end's first frame in one read: the frame reaches the call."""
    setup, call, _transport, _, outcome = _setup(dial_plan(modem_init=[], dial="1"))
    setup.dataReceived(b"\r\nCONNECT 115200\r\n\x7e\x00first frame")
    assert outcome == [setup] and call.data == b"\x7e\x00first frame"


@pytest.mark.parametrize(
    ("said", "code"),
    [(b"BUSY", ReplyCode.AGN), (b"NO ANSWER", ReplyCode.DHST), (b"NO DIALTONE", ReplyCode.NIO)],
)
def test_a_failed_dial_fails_the_call_with_its_reply_and_closes(
    said: bytes, code: ReplyCode
) -> None:
    """A result code other than CONNECT fails handed_over with CallFailed and closes the line."""
    setup, call, transport, _, outcome = _setup(dial_plan(modem_init=[], dial="1"))
    setup.dataReceived(b"\r\n" + said + b"\r\n")
    assert isinstance(outcome[0], Failure) and outcome[0].check(CallFailed)
    assert outcome[0].value.reply.code is code
    assert transport.disconnecting and call.made == 0


def test_a_login_that_never_comes_times_out() -> None:
    """No login prompt within the chat's time: TIME, the line closed, no call."""
    _, call, transport, clock, outcome = _setup(LinePlan(login=dial_plan(chat="ogin: x").login))
    clock.advance(9.9)
    assert outcome == []
    clock.advance(0.2)
    assert outcome[0].value.reply.code is ReplyCode.TIME
    assert outcome[0].value.reply.code.action is Action.HOST_DEAD
    assert transport.disconnecting and call.made == 0


def test_the_line_closing_during_the_dial_fails_the_call() -> None:
    """The port closing before CONNECT fails the call; closed fires."""
    setup, call, _transport, _, outcome = _setup(dial_plan(modem_init=["ATZ"], dial="1"))
    closed: list[object] = []
    setup.closed.addCallback(closed.append)
    setup.connectionLost(Failure(internet_error.ConnectionLost()))
    assert outcome[0].value.reply.code is ReplyCode.DHST
    assert closed == [None] and call.lost is None


def test_no_carrier_mid_call_ends_the_call() -> None:
    """A modem's NO CARRIER in the data, even split across reads, drops the line."""
    setup, call, transport, _, _ = _setup(dial_plan(modem_init=[], dial="1"))
    setup.dataReceived(b"CONNECT\r\n")
    setup.dataReceived(b"data\r\nNO CAR")
    assert not transport.disconnecting
    setup.dataReceived(b"RIER\r\n")
    assert transport.disconnecting
    setup.connectionLost(Failure(internet_error.ConnectionLost()))
    assert call.lost is not None


def test_no_carrier_is_not_watched_on_a_direct_line() -> None:
    """On a direct line the words NO CARRIER are just data."""
    setup, call, transport, _, _ = _setup(LinePlan())
    setup.dataReceived(b"NO CARRIER")
    assert not transport.disconnecting and call.data == b"NO CARRIER"


def test_closing_the_call_hangs_the_modem_up_first() -> None:
    """The call's loseConnection: DTR dropped, +++ after the guard, OK, ATH0, OK, then closed."""
    setup, call, transport, clock, _ = _setup(dial_plan(modem_init=[], dial="1"))
    setup.dataReceived(b"CONNECT\r\n")
    _take(transport)
    call.transport.loseConnection()  # type: ignore[union-attr]
    assert transport.dtr == [False] and not transport.disconnecting
    clock.advance(0.5)
    assert transport.dtr == [False, True]
    clock.advance(1.0)
    assert _take(transport) == b"+++"
    setup.dataReceived(b"\r\nOK\r\n")
    assert _take(transport) == b"ATH0\r"
    setup.dataReceived(b"\r\nOK\r\n")
    assert transport.disconnecting and setup.phase == "hanging-up"
    setup.connectionLost(Failure(internet_error.ConnectionDone()))
    assert setup.phase == "closed" and call.lost is not None


def test_a_direct_line_closes_at_once() -> None:
    """Without a modem the call's loseConnection closes the line directly."""
    _, call, transport, _, _ = _setup(LinePlan())
    call.transport.loseConnection()  # type: ignore[union-attr]
    assert transport.disconnecting


class _Endpoint:
    def __init__(self, result: Any) -> None:
        self.result = result

    def connect(self, factory: Any) -> Any:
        if isinstance(self.result, Exception):
            return fail(self.result)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return succeed(protocol)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            DeviceLocked("/dev/ttyS0", Path("/var/lock/LCK..ttyS0"), 42),
            ReplyCode.LOCK,
        ),
        (FileNotFoundError(2, "No such file or directory"), ReplyCode.LIO),
        (internet_error.ConnectionRefusedError(), ReplyCode.DHST),
        (internet_error.TimeoutError(), ReplyCode.TIME),
    ],
)
def test_place_call_turns_open_failures_into_replies(error: Exception, code: ReplyCode) -> None:
    """A port in use is LOCK (retry soon), a refused or silent TCP peer marks the site down."""
    outcome: list[Any] = []
    place_call(_Endpoint(error), LinePlan(), Recorder(), Clock()).addBoth(outcome.append)
    assert outcome[0].check(CallFailed) and outcome[0].value.reply.code is code


def test_place_call_fires_with_the_setup_once_the_call_has_the_line() -> None:
    """On a direct line place_call fires at once with the setup, the call connected."""
    call = Recorder()
    outcome: list[Any] = []
    place_call(_Endpoint(None), LinePlan(), call, Clock()).addBoth(outcome.append)
    assert isinstance(outcome[0], LineSetup) and call.made == 1


def test_the_dial_number_fills_d_and_t_in_the_login_chat() -> None:
    """\\D and \\T in the chat are the number of the dial setting, whatever its prefix."""
    for dial in ("ATDT5551234", "atd5551234", "5551234"):
        plan = dial_plan(dial=dial, chat=r'"" \D\c')
        assert plan.login is not None and plan.login.steps[0].send is not None
        assert plan.login.steps[0].send.pieces == (b"5551234",)


def test_no_carrier_during_the_hang_up_closes_at_once() -> None:
    """The far end hung up first: NO CARRIER while hanging up ends it without +++ or ATH0."""
    setup, call, transport, clock, _ = _setup(dial_plan(modem_init=[], dial="1"))
    setup.dataReceived(b"CONNECT\r\n")
    _take(transport)
    call.transport.loseConnection()  # type: ignore[union-attr]
    setup.dataReceived(b"\r\nNO CARR")
    assert not transport.disconnecting
    setup.dataReceived(b"IER\r\n")
    assert transport.disconnecting
    clock.advance(10)
    assert _take(transport) == b""

"""Dialling and answering through the fake Hayes modems on pseudo-terminals via SerialPort."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from relay.reply import ReplyCode
from relay.transport import (
    CallFailed,
    LineSetup,
    SerialAnswerer,
    SerialEndpoint,
    dial_plan,
    parse_serial,
    place_call,
)
from relay.transport.lock import lock_name

from support.fakemodem import FakeModem

CALLER_SAYS = bytes(range(256)) * 8  # every byte value, 2 KiB
ANSWERER_SAYS = b"answered: " + bytes(range(255, -1, -1)) * 4


class Talker(Protocol):
    """A call protocol that says its piece when the line is its own and keeps what it hears."""

    def __init__(self, says: bytes) -> None:
        self.says = says
        self.heard = b""
        self.lost: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.says)

    def dataReceived(self, data: bytes) -> None:
        self.heard += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason
        if not self.ended.called:
            self.ended.callback(None)


@pytest.fixture
def modems(tmp_path: Path) -> Iterator[FakeModem]:
    """The fake modems' process (no login)."""
    with FakeModem(tmp_path / "line") as fake:
        yield fake


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    """The lock directory of the test's ports."""
    path = tmp_path / "locks"
    path.mkdir()
    return path


def _endpoint(device: Path, lock_dir: Path) -> SerialEndpoint:
    return SerialEndpoint(reactor, parse_serial(f"serial:{device}:baudrate=115200"), lock_dir)


@contextlib.asynccontextmanager
async def _answering(
    device: Path, lock_dir: Path
) -> AsyncIterator[tuple[SerialAnswerer, list[Talker]]]:
    """An answerer (modem init ATZ) on ``device``, open and waiting; its calls in a list."""
    calls: list[Talker] = []

    def new_call() -> Talker:
        calls.append(Talker(ANSWERER_SAYS))
        return calls[-1]

    settings = parse_serial(f"serial:{device}:baudrate=115200")
    answerer = SerialAnswerer(
        reactor, settings, new_call, modem_init=["ATZ"], lock_dir=lock_dir, reopen_delay=0.2
    )
    answerer.startService()
    try:
        await _until(lambda: answerer.opened == 1, "the answerer to open its device")
        yield answerer, calls
    finally:
        await answerer.stopService()


async def _until(condition: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait (on the reactor) until ``condition`` holds."""
    waited = 0.0
    while not condition():
        if waited >= limit:
            raise AssertionError(f"gave up waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


async def _event(fake: FakeModem, kind: str) -> dict[str, Any]:
    return await deferToThread(fake.wait_for, kind)


async def _call(fake: FakeModem, lock_dir: Path, caller: Talker, **plan: Any) -> LineSetup:
    endpoint = _endpoint(fake.dte_a, lock_dir)
    return await place_call(endpoint, dial_plan(**plan), caller, reactor)


@pytest_twisted.ensureDeferred
async def test_a_dialled_call_carries_bytes_both_ways_and_hangs_up(
    modems: FakeModem, locks: Path
) -> None:
    """ATZ, ATDT, CONNECT: every byte crosses both ways; the hang-up escapes and sends ATH0."""
    async with _answering(modems.dte_b, locks) as (answerer, answered):
        caller = Talker(CALLER_SAYS)
        setup = await _call(modems, locks, caller, modem_init=["ATZ"], dial="5551234")
        assert setup.rate == 115200
        assert (locks / lock_name(str(modems.dte_a))).exists()
        await _until(
            lambda: (
                bool(answered)
                and len(answered[0].heard) >= len(CALLER_SAYS)
                and len(caller.heard) >= len(ANSWERER_SAYS)
            ),
            "both sides to hear each other",
        )
        assert answered[0].heard == CALLER_SAYS and caller.heard == ANSWERER_SAYS
        assert caller.transport is not None
        caller.transport.loseConnection()
        await setup.closed
        assert (await _event(modems, "escape"))["side"] == "a"
        assert (await _event(modems, "hangup"))["why"] == "ath"
        assert not (locks / lock_name(str(modems.dte_a))).exists()
        await answered[0].ended  # NO CARRIER reached the answerer
        await _until(lambda: answerer.opened == 2, "the answerer to re-open its device")


@pytest.mark.parametrize(
    ("mode", "code"),
    [("busy", ReplyCode.AGN), ("noanswer", ReplyCode.DHST), ("nodialtone", ReplyCode.NIO)],
)
@pytest_twisted.ensureDeferred
async def test_each_failing_result_code_fails_the_call_with_its_reply(
    modems: FakeModem, locks: Path, mode: str, code: ReplyCode
) -> None:
    """BUSY, NO ANSWER, NO DIALTONE from the modem: CallFailed with the mapped reply, port freed."""
    await deferToThread(modems.set_mode, mode)
    caller = Talker(b"never sent")
    with pytest.raises(CallFailed) as caught:
        await _call(modems, locks, caller, modem_init=["ATZ"], dial="5551234")
    assert caught.value.reply.code is code
    await _until(
        lambda: not (locks / lock_name(str(modems.dte_a))).exists(), "the lock to be released"
    )
    assert caller.heard == b"" and caller.transport is None


@pytest_twisted.ensureDeferred
async def test_a_modem_that_never_answers_the_dial_times_out(
    modems: FakeModem, locks: Path
) -> None:
    """No result code at all after ATDT: TIME after the dial timeout."""
    await deferToThread(modems.set_mode, "silent")
    with pytest.raises(CallFailed) as caught:
        await _call(modems, locks, Talker(b""), modem_init=[], dial="1", dial_timeout=1.0)
    assert caught.value.reply.code is ReplyCode.TIME


@pytest_twisted.ensureDeferred
async def test_an_init_command_the_modem_refuses_is_a_local_error(
    modems: FakeModem, locks: Path
) -> None:
    """ERROR to a bad init command: LIO, and no dial command reaches the modem."""
    with pytest.raises(CallFailed) as caught:
        await _call(modems, locks, Talker(b""), modem_init=["ATZ", "AT&Q9"], dial="1")
    assert caught.value.reply.code is ReplyCode.LIO
    await deferToThread(modems.set_mode, "normal")
    commands = [e["text"] for e in modems.events if e["event"] == "command"]
    assert commands == ["ATZ", "AT&Q9"]


@pytest_twisted.ensureDeferred
async def test_carrier_lost_mid_call_ends_the_call_on_both_sides(
    modems: FakeModem, locks: Path
) -> None:
    """The carrier drops mid-call: NO CARRIER ends both calls; the answerer waits again."""
    async with _answering(modems.dte_b, locks) as (answerer, answered):
        caller = Talker(b"x")
        setup = await _call(modems, locks, caller, modem_init=["ATZ"], dial="1")
        await _until(lambda: bool(answered) and answered[0].heard == b"x", "the first byte")
        modems.drop()
        await caller.ended
        await answered[0].ended
        await setup.closed
        assert caller.lost is not None and answered[0].lost is not None
        await _until(lambda: answerer.opened == 2, "the answerer to re-open its device")
        assert answerer.calls == 1


@pytest_twisted.ensureDeferred
async def test_the_answerer_answers_call_after_call(modems: FakeModem, locks: Path) -> None:
    """Three calls in a row on the same device names, each answered by a fresh call protocol."""
    async with _answering(modems.dte_b, locks) as (answerer, answered):
        for number in range(1, 4):
            await _until(lambda n=number: answerer.opened == n, f"open number {number}")
            caller = Talker(b"call %d" % number)
            setup = await _call(modems, locks, caller, modem_init=["ATZ"], dial="1")
            await _until(
                lambda n=number: len(answered) == n and answered[-1].heard == b"call %d" % n,
                f"call {number} to arrive",
            )
            assert caller.transport is not None
            caller.transport.loseConnection()
            await setup.closed
            await answered[-1].ended
        assert answerer.calls == 3


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_by_a_live_process_fails_the_call_as_locked(
    modems: FakeModem, locks: Path
) -> None:
    """A second call on a port another caller holds: LOCK, a retry; the first is untouched."""
    await deferToThread(modems.set_mode, "silent")
    first = place_call(
        _endpoint(modems.dte_a, locks), dial_plan(dial="1", dial_timeout=3.0), Talker(b""), reactor
    )
    with pytest.raises(CallFailed) as caught:
        await _call(modems, locks, Talker(b""), dial="1")
    assert caught.value.reply.code is ReplyCode.LOCK
    with pytest.raises(CallFailed):
        await first

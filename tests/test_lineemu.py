"""The line emulator's fidelity through Twisted's SerialPort: every phone figure rests on it.

The emulator runs in its own process; the two ends are ``SerialPort`` transports (pyserial)
opened on its device names, in this test's reactor.  These tests assert on durations: the
emulator's pacing is the property under test, and the emulator's process is not slowed
by this one's work.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import error, protocol, reactor, task
from twisted.internet.serialport import SerialPort
from twisted.python.failure import Failure

from support.lineemu import DropPlan, LineEmulator
from support.reactor_helpers import until

RATE = 115200
BYTES_PER_SECOND = RATE / 10


class Recorder(protocol.Protocol):
    """Keeps what arrives, when the first and the last bytes came, and how the port closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


def _open(path: Path, proto: protocol.Protocol) -> SerialPort:
    return SerialPort(proto, str(path), reactor, baudrate=RATE)


@pytest.fixture
def ports() -> Iterator[list[SerialPort]]:
    """Ports a test opened, closed after it whatever happened."""
    opened: list[SerialPort] = []
    yield opened
    for port in opened:
        if port.connected:
            port.loseConnection()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_100_kb_take_the_nominal_time_and_flip_bits_at_the_rate(
    tmp_path: Path, ports: list[SerialPort]
) -> None:
    """100 kB cross in size / (rate / 10) + latency within 1 %, with flips as the BER says."""
    latency, ber, size = 0.3, 1e-3, 100_000
    payload = random.Random(7).randbytes(size)
    with LineEmulator(tmp_path, rate=RATE, latency=latency, ber=ber, seed=5) as line:
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        started = time.monotonic()
        ports[1].write(payload)
        await until(lambda: len(reader.received) >= size, limit=size / BYTES_PER_SECOND + 10)
        counts = line.hang_up()
    assert reader.first_at is not None and reader.last_at is not None
    nominal = size / BYTES_PER_SECOND + latency
    assert reader.last_at - started == pytest.approx(nominal, rel=0.01)
    assert reader.first_at - started >= latency + 1 / BYTES_PER_SECOND
    assert len(reader.received) == size
    assert counts["a_to_b"] == counts["delivered_a_to_b"] == size and counts["b_to_a"] == 0
    flipped = sum(bin(x ^ y).count("1") for x, y in zip(payload, reader.received, strict=True))
    assert flipped == counts["flipped_a_to_b"]
    bits = size * 8
    assert abs(flipped - bits * ber) <= 4 * math.sqrt(bits * ber * (1 - ber))


@pytest_twisted.ensureDeferred
async def test_latency_is_added_to_the_first_byte(tmp_path: Path, ports: list[SerialPort]) -> None:
    """A byte sent on an idle line arrives no sooner than one byte time plus the latency."""
    latency = 0.25
    with LineEmulator(tmp_path, latency=latency) as line:
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        started = time.monotonic()
        ports[1].write(b"!")
        await until(lambda: reader.received, limit=5)
    assert reader.received == b"!"
    assert reader.first_at is not None
    assert reader.first_at - started >= latency + 1 / BYTES_PER_SECOND


@pytest_twisted.ensureDeferred
async def test_both_directions_carry_bytes_at_once(tmp_path: Path, ports: list[SerialPort]) -> None:
    """Each direction is its own line: bytes sent both ways at once arrive intact both ways."""
    a_data, b_data = random.Random(1).randbytes(3000), random.Random(2).randbytes(2000)
    trace = tmp_path / "line.trace"
    with LineEmulator(tmp_path, trace=trace) as line:
        at_a, at_b = Recorder(), Recorder()
        ports.append(_open(line.link_a, at_a))
        ports.append(_open(line.link_b, at_b))
        line.connect()
        ports[0].write(a_data)
        ports[1].write(b_data)
        await until(lambda: len(at_b.received) >= 3000 and len(at_a.received) >= 2000, limit=10)
        counts = line.hang_up()
    assert bytes(at_b.received) == a_data and bytes(at_a.received) == b_data
    assert (counts["a_to_b"], counts["b_to_a"]) == (3000, 2000)
    timeline = [[float(v) for v in row.split()] for row in trace.read_text().splitlines()]
    assert len(timeline) >= 2  # the transfer takes about 0.3 s: a line every 0.1 s
    assert all(r[2] <= 3000 and r[3] <= r[2] and r[4] <= 2000 and r[5] <= r[4] for r in timeline)
    assert [r[1] for r in timeline] == sorted(r[1] for r in timeline)


@pytest_twisted.ensureDeferred
async def test_a_drop_after_n_bytes_is_end_of_file(tmp_path: Path, ports: list[SerialPort]) -> None:
    """After the drop's byte count the reader has exactly those bytes, then the port closes."""
    limit = 5000
    payload = random.Random(3).randbytes(20_000)
    with LineEmulator(tmp_path, drop=DropPlan(after_bytes=limit, direction="a2b")) as line:
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        ports[1].write(payload)
        await until(lambda: reader.lost is not None and writer.lost is not None, limit=15)
        counts = line.wait_for("line")
        assert line.new_line()["line"] == 2  # a second call on the same device names
        assert line.link_a.resolve().exists()
    assert bytes(reader.received) == payload[:limit]
    assert reader.lost is not None and reader.lost.check(error.ConnectionDone)
    assert counts["dropped"] and counts["delivered_a_to_b"] == limit
    assert line.totals is not None
    assert line.totals["lines"] == 2


@pytest_twisted.ensureDeferred
async def test_a_new_line_keeps_the_device_names(tmp_path: Path, ports: list[SerialPort]) -> None:
    """After a hang-up the same names open a fresh line that carries bytes again."""
    with LineEmulator(tmp_path) as line:
        line.new_line()
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        ports[1].write(b"second call")
        await until(lambda: len(reader.received) >= 11, limit=5)
    assert bytes(reader.received) == b"second call"
    assert [counts["line"] for counts in line.lines] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_silence_delivers_nothing_more(tmp_path: Path, ports: list[SerialPort]) -> None:
    """A silent drop keeps the ports open and delivers nothing after the byte count."""
    plan = DropPlan(after_bytes=100, direction="both", mode="silence")
    with LineEmulator(tmp_path, drop=plan) as line:
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        ports[1].write(bytes(1000))
        await until(lambda: len(reader.received) >= 100, limit=5)
        ports[1].write(bytes(1000))
        await task.deferLater(reactor, 1.0, lambda: None)  # 2 000 bytes' time and more
        counts = line.hang_up()
    assert len(reader.received) == 100 and reader.lost is None
    assert counts["dropped"] and counts["delivered_a_to_b"] == 100


@pytest_twisted.ensureDeferred
async def test_a_drop_after_seconds_is_end_of_file(tmp_path: Path, ports: list[SerialPort]) -> None:
    """A line set to drop after some seconds closes both ports then, mid-transfer."""
    seconds = 0.5
    with LineEmulator(tmp_path, drop=DropPlan(after_seconds=seconds)) as line:
        reader, writer = Recorder(), Recorder()
        ports.append(_open(line.link_b, reader))
        ports.append(_open(line.link_a, writer))
        line.connect()
        ports[1].write(bytes(20_000))  # about 1.7 s of line time
        await until(lambda: reader.lost is not None and writer.lost is not None, limit=10)
        counts = line.wait_for("line")
    assert counts["dropped"] and 0 < len(reader.received) == counts["delivered_a_to_b"]
    assert len(reader.received) <= seconds * BYTES_PER_SECOND + 1
    assert reader.lost is not None and reader.lost.check(error.ConnectionDone)


def test_a_signal_ends_the_emulator_with_its_counts(tmp_path: Path) -> None:
    """SIGTERM makes the emulator report the current line and the totals before it exits."""
    line = LineEmulator(tmp_path)
    line.start()
    assert line.process is not None
    line.process.send_signal(signal.SIGTERM)
    totals = line.wait_for("counts")
    assert line.process.wait(timeout=10) == 0
    assert totals["lines"] == 1 and totals["a_to_b"] == totals["b_to_a"] == 0
    assert [counts["line"] for counts in line.lines] == [1]

"""A serial line between two pseudo-terminals: bit rate, latency, bit errors and drops.

Theory of operation.  The emulator runs as its own process (``python
tests/support/lineemu.py --rate 115200 --link-a A --link-b B ...``) so that the engines'
CPU does not disturb its pacing.  It opens two pseudo-terminals, puts both slave sides in
raw mode (8-bit clean: no echo, no CR/LF mapping, no flow-control characters) and gives
each a stable name: ``A`` and ``B`` are symlinks to the slave devices, re-pointed when a
new line is made, as a real port keeps its name across calls.  The endpoints open ``A``
and ``B`` like serial ports (Twisted's ``SerialPort`` through pyserial).

Bytes the endpoint on A writes go through a ``linemodel.Direction`` (a FIFO at the bit
rate, then the latency, with seeded bit flips) and come out at B, and the other way
round.  The emulator reads from an endpoint only while its transmit queue holds less
than ``--tx-buffer`` bytes, so a fast writer is held back by the line as by a UART.

A line is *made* on hook: the device names exist, but no byte moves until the ``connect``
command (the harness sends it once both endpoints have opened their ports, so no byte
reaches a port before it is open and flushed).  The line then drops after
``--drop-after-bytes`` bytes (counted in ``--drop-direction``) or ``--drop-after-seconds``:
with ``--drop-mode hangup`` once the last byte has been read both masters close, which
each endpoint sees as end of file; with ``silence`` nothing more is delivered.

Commands, one per line on standard input: ``connect``; ``new`` (hang up this line and
make another, optionally followed by a JSON object of drop settings for it);
``hangup``; ``quit`` (or end of input).  Events, one JSON object per line on standard
output: ``ready`` (with the device names), ``connected``, ``dropped``, ``line`` (the
counts of a line that ended) and at exit ``counts`` (the totals); SIGTERM and SIGINT
exit the same way.  Times are ``time.monotonic()``, which is system-wide on Linux.

``LineEmulator`` below starts and stops the process from tests and benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import selectors
import struct
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: make ``support`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.helperprocess import COMMAND, WAKE, ControlLoop, HelperProcess
from support.linemodel import BitFlipper, Direction

READ_SIZE = 4096
DRAIN_WAIT = 2.0  # seconds a hang-up waits for the endpoint to read what it was sent
TICK = 0.0005  # shortest sleep: bytes due within this are written together
TRACE_EVERY = 0.1  # seconds between lines of the trace file


@dataclass(frozen=True)
class DropPlan:
    """When a line drops, and how."""

    after_bytes: int | None = None
    after_seconds: float | None = None
    direction: str = "both"  # which direction's delivered bytes count: a2b, b2a or both
    mode: str = "hangup"  # hangup (close: end of file) or silence (nothing more delivered)

    def __post_init__(self) -> None:
        if self.direction not in ("a2b", "b2a", "both"):
            raise ValueError(f"drop direction must be a2b, b2a or both, not {self.direction!r}")
        if self.mode not in ("hangup", "silence"):
            raise ValueError(f"drop mode must be hangup or silence, not {self.mode!r}")
        if self.after_bytes is not None and self.after_bytes < 0:
            raise ValueError("drop after bytes must not be negative")
        if self.after_seconds is not None and self.after_seconds < 0:
            raise ValueError("drop after seconds must not be negative")

    @classmethod
    def from_json(cls, text: str) -> DropPlan:
        """A plan from the JSON object that may follow the ``new`` command."""
        values = json.loads(text) if text.strip() else {}
        return cls(**values)


@dataclass
class Side:
    """One pseudo-terminal: the master we move bytes through, the slave the endpoint opens."""

    master: int
    slave: int
    device: str
    link: Path
    pending: bytearray = field(default_factory=bytearray)  # due for this side, not yet written
    closed: bool = False
    watched: bool = False  # registered for reading: its transmit queue has room


def _make_side(link: Path) -> Side:
    master, slave = os.openpty()
    tty.setraw(slave)  # 8-bit clean before any endpoint reconfigures it
    os.set_blocking(master, False)
    device = os.ttyname(slave)
    temporary = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(device, temporary)
    os.replace(temporary, link)  # atomic: the name never disappears
    return Side(master, slave, device, link)


def _input_queue(fd: int) -> int:
    """Bytes waiting in a terminal's input queue (not yet read by the endpoint)."""
    answer = fcntl.ioctl(fd, termios.TIOCINQ, struct.pack("i", 0))
    return int(struct.unpack("i", answer)[0])


class Line:
    """One call's line: two sides, two directions, a drop plan, and its counts."""

    def __init__(self, number: int, options: argparse.Namespace, plan: DropPlan) -> None:
        self.number = number
        self.options = options
        self.plan = plan
        self.a = _make_side(Path(options.link_a))
        self.b = _make_side(Path(options.link_b))
        seed = f"{options.seed}/{number}"
        self.a2b = Direction(options.rate, options.latency, BitFlipper(options.ber, seed + "/a2b"))
        self.b2a = Direction(options.rate, options.latency, BitFlipper(options.ber, seed + "/b2a"))
        self.connected_at: float | None = None
        self.dropped = False
        self.lost = 0  # bytes in flight or written after a drop

    def routes(self) -> tuple[tuple[Side, Direction, Side], ...]:
        """(from side, direction, to side) for both directions."""
        return ((self.a, self.a2b, self.b), (self.b, self.b2a, self.a))

    def counted(self) -> int:
        """Delivered bytes in the direction the drop plan counts."""
        if self.plan.direction == "a2b":
            return self.a2b.delivered
        if self.plan.direction == "b2a":
            return self.b2a.delivered
        return self.a2b.delivered + self.b2a.delivered

    def delivery_limit(self) -> int | None:
        """How many more bytes may be delivered before the drop, or None for no limit."""
        if self.plan.after_bytes is None:
            return None
        return max(0, self.plan.after_bytes - self.counted())

    def counts(self) -> dict[str, Any]:
        """What this line carried."""
        return {
            "line": self.number,
            "a_to_b": self.a2b.accepted,
            "b_to_a": self.b2a.accepted,
            "delivered_a_to_b": self.a2b.delivered,
            "delivered_b_to_a": self.b2a.delivered,
            "flipped_a_to_b": self.a2b.flipper.flipped,
            "flipped_b_to_a": self.b2a.flipper.flipped,
            "lost": self.lost + self.a2b.in_flight + self.b2a.in_flight,
            "dropped": self.dropped,
            "connected_at": self.connected_at,
        }

    def close(self) -> None:
        """Hang up: close both masters (each endpoint reads end of file), then the slaves."""
        for side in (self.a, self.b):
            if not side.closed:
                os.close(side.master)
                os.close(side.slave)
                side.closed = True


class Emulator(ControlLoop):
    """The process's main loop: moves bytes, obeys commands, reports events."""

    def __init__(self, options: argparse.Namespace, out: IO[str]) -> None:
        super().__init__(out)
        self.options = options
        self.totals = {"a_to_b": 0, "b_to_a": 0, "flipped_a_to_b": 0, "flipped_b_to_a": 0}
        self.lines = 0
        self.line: Line | None = None
        self.trace = open(options.trace, "w") if options.trace else None  # noqa: SIM115
        self._traced_at = 0.0

    def _trace(self, line: Line, now: float) -> None:
        """A line of the trace: seconds since connect, then each direction's counts."""
        if self.trace is None or line.connected_at is None or now - self._traced_at < TRACE_EVERY:
            return
        self._traced_at = now
        self.trace.write(
            f"{line.number} {now - line.connected_at:.3f} {line.a2b.accepted}"
            f" {line.a2b.delivered} {line.b2a.accepted} {line.b2a.delivered}\n"
        )

    def new_line(self, plan: DropPlan) -> None:
        """Hang up the current line if any and make a new one, on hook."""
        self.end_line()
        self.lines += 1
        self.line = Line(self.lines, self.options, plan)
        self.emit(
            "ready", line=self.lines, link_a=str(self.line.a.link), link_b=str(self.line.b.link)
        )

    def end_line(self) -> None:
        """Hang up the current line and report its counts."""
        line = self.line
        if line is None:
            return
        self._unwatch(line)
        line.close()
        counts = line.counts()
        for key in self.totals:
            self.totals[key] += counts[key]
        self.emit("line", **counts)
        self.line = None

    def connect(self) -> None:
        """Take the line off hook: bytes start to move."""
        line = self.line
        if line is None or line.connected_at is not None:
            return
        line.connected_at = time.monotonic()
        self._watch(line, line.connected_at)
        self.emit("connected", line=line.number, at=line.connected_at)

    def _watch(self, line: Line, now: float) -> None:
        """Read from a side only while its transmit queue has room (or to discard, if silent).

        A side whose queue is full is not polled, so its readable master does not wake the
        loop again and again; the loop's timeout looks again once a byte has left.
        """
        for source, direction, _ in line.routes():
            wanted = line.dropped or direction.unsent(now) < self.options.tx_buffer
            if wanted and not source.watched:
                self.selector.register(source.master, selectors.EVENT_READ, source)
            elif source.watched and not wanted:
                self.selector.unregister(source.master)
            source.watched = wanted

    def _unwatch(self, line: Line) -> None:
        for side in (line.a, line.b):
            if side.watched:
                self.selector.unregister(side.master)
                side.watched = False

    def drop(self, now: float) -> None:
        """The line drops as the plan says."""
        line = self.line
        assert line is not None
        line.dropped = True
        line.lost += line.a2b.discard() + line.b2a.discard()
        self.emit("dropped", line=line.number, at=now, mode=line.plan.mode)
        if line.plan.mode == "hangup":
            self._drain(line)
            self.end_line()

    def _drain(self, line: Line) -> None:
        """Let each endpoint read what it has been sent before the line closes."""
        for side in (line.a, line.b):
            self._flush(side)
        deadline = time.monotonic() + DRAIN_WAIT
        while time.monotonic() < deadline:
            if all(_input_queue(s.slave) == 0 and not s.pending for s in (line.a, line.b)):
                break
            time.sleep(0.002)
            for side in (line.a, line.b):
                self._flush(side)
        time.sleep(0.01)  # bytes still between the pty's buffers

    def _flush(self, side: Side) -> None:
        """Write what is due for ``side``; what the endpoint cannot take yet stays pending."""
        while side.pending:
            try:
                written = os.write(side.master, side.pending)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno == errno.EIO:
                    return
                raise
            del side.pending[:written]

    def command(self, text: str) -> None:
        """Obey one command line."""
        word, _, rest = text.strip().partition(" ")
        if word == "connect":
            self.connect()
        elif word == "new":
            self.new_line(DropPlan.from_json(rest))
        elif word == "hangup":
            self.end_line()
        elif word == "quit":
            self.running = False
        elif word:
            self.emit("error", reason=f"unknown command {word!r}")

    def _read_side(self, line: Line, source: Side, direction: Direction, now: float) -> None:
        """Move what the endpoint on ``source`` wrote into the line, as far as its queue allows."""
        room = self.options.tx_buffer - direction.unsent(now)
        if room <= 0:
            return
        try:
            data = os.read(source.master, min(room, READ_SIZE))
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EIO:  # EIO: no endpoint has the slave open
                raise
            return
        if line.dropped:
            line.lost += len(data)
        else:
            # The loop's clock may predate the connect handled in the same turn: no byte
            # starts its way before the line is up, or a timed drop would let a few more by.
            started = line.connected_at if line.connected_at is not None else now
            direction.accept(data, max(now, started))

    def _deliver(self, line: Line, now: float) -> None:
        """Hand each side what has reached it by ``now`` (nothing that arrives after a drop)."""
        if line.plan.after_seconds is not None and line.connected_at is not None:
            now = min(now, line.connected_at + line.plan.after_seconds)
        for _source, direction, target in line.routes():
            limit = line.delivery_limit()
            data = direction.take_due(now, limit)
            if data:
                target.pending += data
            self._flush(target)

    def _due(self, line: Line, now: float) -> bool:
        if line.dropped or line.connected_at is None:
            return False
        plan = line.plan
        if plan.after_bytes is not None and line.counted() >= plan.after_bytes:
            return True
        return plan.after_seconds is not None and now - line.connected_at >= plan.after_seconds

    def _timeout(self, line: Line | None, now: float) -> float | None:
        if line is None or line.connected_at is None or line.dropped:
            return None
        times = [t for _, d, _ in line.routes() if (t := d.next_arrival()) is not None]
        if line.plan.after_seconds is not None:
            times.append(line.connected_at + line.plan.after_seconds)
        waiting = [s for _, d, s in line.routes() if s.pending]
        # a full transmit queue empties with time: look again when a byte has left
        blocked = any(d.unsent(now) >= self.options.tx_buffer for _, d, _ in line.routes())
        if waiting or blocked:
            times.append(now + 0.002)
        if not times:
            return None
        return max(TICK, min(times) - now)

    def run(self) -> None:
        """Serve until told to quit; then report the totals."""
        self.new_line(self.options.first_plan)
        while self.running:
            now = time.monotonic()
            if self.line is not None and self.line.connected_at is not None:
                self._watch(self.line, now)
            events = self.selector.select(self._timeout(self.line, now))
            now = time.monotonic()
            line = self.line
            for key, _ in events:
                if key.data == WAKE:
                    self.woken()
                elif key.data == COMMAND:
                    for command in self.read_commands():
                        self.command(command)
                elif line is not None and isinstance(key.data, Side):
                    source = key.data
                    direction = line.a2b if source is line.a else line.b2a
                    self._read_side(line, source, direction, now)
            line = self.line
            if line is None or line.connected_at is None:
                continue
            self._trace(line, now)
            if not line.dropped:
                self._deliver(line, now)
                # sides whose queue is full are read again when it empties
                for source, direction, _ in line.routes():
                    self._read_side(line, source, direction, now)
            if self._due(line, now):
                self.drop(now)
        self.end_line()
        self.emit("counts", lines=self.lines, **self.totals)
        if self.trace is not None:
            self.trace.close()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=115200, help="bit/s, 10 bits per byte")
    parser.add_argument("--latency", type=float, default=0.0, help="one-way seconds")
    parser.add_argument("--ber", type=float, default=0.0, help="bit-error rate of data bits")
    parser.add_argument("--seed", default="1", help="seed of the bit errors")
    parser.add_argument("--link-a", required=True, help="device name made for side A")
    parser.add_argument("--link-b", required=True, help="device name made for side B")
    parser.add_argument("--tx-buffer", type=int, default=4096, help="bytes a side may queue")
    parser.add_argument("--drop-after-bytes", type=int, default=None)
    parser.add_argument("--drop-after-seconds", type=float, default=None)
    parser.add_argument("--drop-direction", default="both", choices=("a2b", "b2a", "both"))
    parser.add_argument("--drop-mode", default="hangup", choices=("hangup", "silence"))
    parser.add_argument(
        "--trace",
        help="write every 0.1 s: line, seconds since connect, bytes accepted and delivered"
        " A->B, then B->A (a timeline of the line's use)",
    )
    options = parser.parse_args(argv)
    if options.tx_buffer <= 0:
        parser.error("--tx-buffer must be positive")
    options.first_plan = DropPlan(
        options.drop_after_bytes,
        options.drop_after_seconds,
        options.drop_direction,
        options.drop_mode,
    )
    return options


def main(argv: list[str] | None = None) -> None:
    """Run the emulator process."""
    options = parse_arguments(argv)
    Emulator(options, sys.stdout).run()


class LineEmulator(HelperProcess):
    """The emulator process, started and stopped from a test or a benchmark.

    Use as a context manager, or ``start()`` / ``stop()``.  The device names are
    ``link_a`` and ``link_b``; ``connect()`` takes the line off hook, ``new_line()``
    hangs it up and makes a new one, ``stop()`` returns the totals and ``lines``
    holds the counts of every line that ended.
    """

    name = "line emulator"

    def __init__(
        self,
        directory: Path,
        *,
        rate: int = 115200,
        latency: float = 0.0,
        ber: float = 0.0,
        seed: int | str = 1,
        tx_buffer: int = 4096,
        drop: DropPlan | None = None,
        trace: Path | None = None,
    ) -> None:
        self.link_a = Path(directory) / "line-a"
        self.link_b = Path(directory) / "line-b"
        plan = drop or DropPlan()
        command_line = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--rate={rate}",
            f"--latency={latency}",
            f"--ber={ber}",
            f"--seed={seed}",
            f"--link-a={self.link_a}",
            f"--link-b={self.link_b}",
            f"--tx-buffer={tx_buffer}",
            f"--drop-direction={plan.direction}",
            f"--drop-mode={plan.mode}",
        ]
        if plan.after_bytes is not None:
            command_line.append(f"--drop-after-bytes={plan.after_bytes}")
        if plan.after_seconds is not None:
            command_line.append(f"--drop-after-seconds={plan.after_seconds}")
        if trace is not None:
            command_line.append(f"--trace={trace}")
        super().__init__(command_line)
        self.lines: list[dict[str, Any]] = []
        self.totals: dict[str, Any] | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        if event["event"] == "line":
            self.lines.append(event)
        elif event["event"] == "counts":
            self.totals = event

    def connect(self) -> float:
        """Take the line off hook; returns the monotonic time bytes started to move."""
        self.send("connect")
        return float(self.wait_for("connected")["at"])

    def new_line(self, drop: DropPlan | None = None) -> dict[str, Any]:
        """Hang up the current line if it is still up and make a new one on the same names.

        Returns the new line's ``ready`` event; the old line's counts are in ``lines``.
        """
        plan = drop or DropPlan()
        self.send("new " + json.dumps(plan.__dict__))
        return self.wait_for("ready")

    def hang_up(self) -> dict[str, Any]:
        """Hang up the current line (both endpoints read end of file); returns its counts."""
        self.send("hangup")
        return self.wait_for("line")

    def stop(self) -> dict[str, Any]:
        """Stop the process; returns the totals over every line."""
        return super().stop()


if __name__ == "__main__":
    main()

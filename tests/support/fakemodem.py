"""Two fake Hayes modems on pseudo-terminals, joined through the line emulator on ATDT.

Theory of operation.  The process (``python tests/support/fakemodem.py --dte-a A --dte-b B
--dir D``) makes two pseudo-terminals, one per modem, and gives each a stable name (the
symlinks ``A`` and ``B``), as a real port keeps its name.  A relay opens ``A`` or ``B``
like a serial port with a modem on it.  In command mode each modem answers AT commands
(``AT``, ``ATZ``, ``ATE0``/``ATE1``, ``ATH0``, ``ATA``, ``ATO``, ``ATS0=n``, ``ATD...``
and the harmless settings ``V1 Q0 X L M &C &D &K &F``; anything else is ``ERROR``), with
echo on after a reset, result codes in words (``V1``).

``ATD`` on one modem rings the other (the number is not looked at): ``RING`` every two
seconds until its relay answers with ``ATA`` (or at once after ``S0`` rings), then both
get ``CONNECT <rate>`` and their bytes flow through a line emulator process
(:mod:`support.lineemu`, started by this one) at the emulator's bit rate, latency and
bit-error rate.  With ``--login user:password`` the answering side first presents a
``login:``/``Password:`` dialogue to the caller (``Login incorrect`` and again on a wrong
answer), and the answering relay gets its ``CONNECT`` only after a good login, as a
getty would hand over the line.

The escape sequence ``+++`` (the guard time of silence before and after) returns a
modem to command mode with the call up (``ATO`` back online, ``ATH0`` hangs up).  A
relay closing its device (the slave side; DTR dropping on a real port) hangs up its
call too.  When a call ends, the other side gets ``NO CARRIER``; a pseudo-terminal has
no DCD line, so that text (and silence) is all a relay can see of the drop.

The next ``ATD`` can be told to fail: commands on standard input, one per line,
``mode normal|busy|noanswer|nodialtone|silent`` (``silent``: no result code ever, for
timeouts), ``drop`` (the carrier drops mid-call: both relays get ``NO CARRIER``),
``quit``.  Events, one JSON object per line on standard output: ``ready``, ``command``
(each AT command line a modem obeyed, with its side), ``ring``, ``login``,
``connected``, ``escape``, ``hangup`` (with the side and why) and ``counts`` at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import heapq
import itertools
import os
import re
import selectors
import sys
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

if __package__ in (None, ""):  # run as a script: make ``support`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.helperprocess import COMMAND, WAKE, ControlLoop, HelperProcess
from support.lineemu import LineEmulator

READ_SIZE = 4096
RING_INTERVAL = 2.0
MAX_RINGS = 15
MAX_COMMAND_LINE = 256
IDLE_POLL = 0.05  # seconds between looks at a closed device (has a relay opened it?)
MODES = ("normal", "busy", "noanswer", "nodialtone", "silent")
_SETTING = re.compile(r"(?:V1|Q0|X[0-4]?|L[0-3]?|M[0-2]?|&C[01]?|&D[0-3]?|&K[0-4]?|&F0?)", re.I)


class State(enum.Enum):
    """What a modem is doing."""

    COMMAND = "command"
    DIALING = "dialing"  # ATD sent, waiting for the other side
    RINGING = "ringing"  # being called
    LOGIN = "login"  # connected, the caller logging in (--login)
    ONLINE = "online"
    ONLINE_COMMAND = "online-command"  # escaped with +++, call still up


def _read(fd: int) -> bytes | None:
    """What a terminal has: None if nothing yet, b"" at its end (EIO: the other side closed)."""
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as error:
        if error.errno != errno.EIO:
            raise
        return b""


@dataclass
class Modem:
    """One modem: its DTE pseudo-terminal and its state."""

    side: str
    link: Path
    master: int = -1
    device: str = ""
    open: bool = False  # a relay has the device open
    state: State = State.COMMAND
    echo: bool = True
    auto_answer: int = 0
    command: bytearray = field(default_factory=bytearray)
    last_data: float = 0.0  # when the DTE last sent a byte online
    plus_count: int = 0
    rings: int = 0
    login_stage: str = ""
    login_buffer: bytearray = field(default_factory=bytearray)
    login_user: str = ""

    def make(self) -> None:
        """A fresh pseudo-terminal under the stable name (closed: no relay has it yet)."""
        if self.master >= 0:
            os.close(self.master)
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.device = os.ttyname(slave)
        os.close(slave)
        temporary = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        os.symlink(self.device, temporary)
        os.replace(temporary, self.link)
        self.master = master
        self.open = False


class FakeModems(ControlLoop):
    """The process's main loop."""

    def __init__(self, options: argparse.Namespace, out: IO[str]) -> None:
        super().__init__(out)
        self.options = options
        self.mode = "normal"
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self.a = Modem("a", Path(options.dte_a))
        self.b = Modem("b", Path(options.dte_b))
        self.modems = (self.a, self.b)
        self.caller: Modem | None = None
        self.emulator = LineEmulator(
            Path(options.dir),
            rate=options.rate,
            latency=options.latency,
            ber=options.ber,
            seed=options.seed,
        )
        self.line_fds: dict[str, int] = {}  # side -> the emulator's slave we hold
        self.calls = 0

    # --- plumbing --------------------------------------------------------------------------

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay`` seconds."""
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._sequence), action))

    def other(self, modem: Modem) -> Modem:
        """The modem at the far end."""
        return self.b if modem is self.a else self.a

    def off_hook(self, modem: Modem) -> bool:
        """True while ``modem`` holds a line: dialling, connected, or its caller logging in.

        A ringing modem is on hook: DTR dropping or ATH0 leave the call ringing, as on a
        real modem (the relay that answers may be resetting its line between calls)."""
        if modem.state in (State.DIALING, State.LOGIN, State.ONLINE, State.ONLINE_COMMAND):
            return True
        return modem is self.caller

    def write(self, modem: Modem, data: bytes) -> None:
        """Bytes to a relay (lost if none has the device open, as on a real port)."""
        if not modem.open:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(modem.master, data)

    def result(self, modem: Modem, text: str) -> None:
        """A result code in words."""
        self.write(modem, b"\r\n" + text.encode("ascii") + b"\r\n")

    # --- the DTE side ----------------------------------------------------------------------

    def watch(self, modem: Modem) -> None:
        """Start reading a device that a relay has opened (or may open)."""
        with contextlib.suppress(KeyError):
            self.selector.unregister(modem.master)
        self.selector.register(modem.master, selectors.EVENT_READ, modem)

    def read_dte(self, modem: Modem, now: float) -> None:
        """What a relay wrote; EIO means it closed the device (DTR dropped)."""
        data = _read(modem.master)
        if data is None:
            return
        if not data:
            self.closed_by_dte(modem)
            return
        if not modem.open:
            modem.open = True
        if modem.state in (State.ONLINE,):
            self.online_data(modem, data, now)
        elif modem.state is State.LOGIN:
            pass  # the answering relay waits for CONNECT; what it sends before is lost
        elif modem.login_stage and modem is self.caller:
            self.login_input(modem, data)
        else:
            self.command_bytes(modem, data)

    def closed_by_dte(self, modem: Modem) -> None:
        """The relay closed the device: DTR low, the modem hangs up and resets."""
        with contextlib.suppress(KeyError):
            self.selector.unregister(modem.master)
        modem.open = False
        if self.off_hook(modem):
            self.hang_up(modem, "dtr")
        self.reset(modem)
        self.later(IDLE_POLL, lambda: self.poll_open(modem))

    def poll_open(self, modem: Modem) -> None:
        """Has a relay opened the device again?  (A closed slave reads EIO.)"""
        try:
            data = os.read(modem.master, READ_SIZE)
        except BlockingIOError:
            modem.open = True
            self.watch(modem)
            return
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            self.later(IDLE_POLL, lambda: self.poll_open(modem))
            return
        modem.open = True
        self.watch(modem)
        if data:
            self.command_bytes(modem, data)

    def reset(self, modem: Modem) -> None:
        """ATZ: factory settings, command mode."""
        modem.echo = True
        modem.auto_answer = 0
        modem.command.clear()
        modem.plus_count = 0

    # --- command mode ----------------------------------------------------------------------

    def command_bytes(self, modem: Modem, data: bytes) -> None:
        """Characters in command mode: echoed, gathered into a line, obeyed at CR."""
        if modem.echo:
            self.write(modem, data)
        for byte in data:
            if byte == 0x0D:
                line = modem.command.decode("ascii", "replace")
                modem.command.clear()
                self.obey(modem, line)
            elif byte == 0x0A:
                continue
            elif byte in (0x08, 0x7F):
                del modem.command[-1:]
            elif len(modem.command) < MAX_COMMAND_LINE:
                modem.command.append(byte)

    def obey(self, modem: Modem, line: str) -> None:
        """One command line (``AT`` and commands; what comes before ``AT`` is noise)."""
        start = line.upper().find("AT")
        if start < 0:
            return
        text = line[start + 2 :].strip()
        self.emit("command", side=modem.side, text="AT" + text)
        upper = text.upper()
        index = 0
        while index < len(upper):
            char = upper[index]
            if char == " ":
                index += 1
                continue
            if char == "D":
                self.dial(modem, text[index + 1 :])
                return
            if char == "A":
                self.answer(modem)
                return
            if char == "O":
                self.back_online(modem)
                return
            if char == "Z":
                self.reset(modem)
                index += 1 + (upper[index + 1 : index + 2] == "0")
            elif char == "E" and upper[index + 1 : index + 2] in ("0", "1"):
                modem.echo = upper[index + 1] == "1"
                index += 2
            elif char == "H":
                index += 1 + (upper[index + 1 : index + 2] == "0")
                if self.off_hook(modem):
                    self.hang_up(modem, "ath")
            elif found := re.match(r"S(\d+)=(\d+)", upper[index:]):
                if found.group(1) == "0":
                    modem.auto_answer = int(found.group(2))
                index += found.end()
            elif found := re.match(r"S(\d+)\?", upper[index:]):
                index += found.end()
            elif found := _SETTING.match(upper, index):
                index = found.end()
            else:
                self.result(modem, "ERROR")
                return
        self.result(modem, "OK")

    def dial(self, modem: Modem, number: str) -> None:
        """ATD: ring the other modem, or fail as the mode says."""
        if modem.state is not State.COMMAND or self.caller is not None:
            self.result(modem, "ERROR")
            return
        mode = self.mode
        if mode == "nodialtone":
            self.result(modem, "NO DIALTONE")
            return
        modem.state = State.DIALING
        if mode == "busy":
            self.later(0.2, lambda: self._dial_result(modem, "BUSY"))
            return
        if mode == "noanswer":
            self.later(0.5, lambda: self._dial_result(modem, "NO ANSWER"))
            return
        if mode == "silent":
            return
        callee = self.other(modem)
        if callee.state is not State.COMMAND:
            self.later(0.2, lambda: self._dial_result(modem, "BUSY"))
            return
        self.caller = modem
        callee.state = State.RINGING
        callee.rings = 0
        self.ring(callee)

    def _dial_result(self, modem: Modem, text: str) -> None:
        if modem.state is State.DIALING:
            modem.state = State.COMMAND
            self.result(modem, text)

    def ring(self, callee: Modem) -> None:
        """RING at the callee; auto-answer after S0 rings; give up after many."""
        if callee.state is not State.RINGING:
            return
        callee.rings += 1
        if callee.rings > MAX_RINGS:
            caller = self.other(callee)
            callee.state = State.COMMAND
            self.caller = None
            self._dial_result(caller, "NO ANSWER")
            return
        self.emit("ring", side=callee.side, count=callee.rings)
        self.result(callee, "RING")
        if callee.auto_answer and callee.rings >= callee.auto_answer:
            self.answer(callee)
            return
        self.later(RING_INTERVAL, lambda: self.ring(callee))

    def answer(self, modem: Modem) -> None:
        """ATA: take the ringing call."""
        if modem.state is not State.RINGING:
            self.result(modem, "NO CARRIER")
            return
        self.connect(self.other(modem), modem)

    def back_online(self, modem: Modem) -> None:
        """ATO: back to the call after an escape."""
        if modem.state is not State.ONLINE_COMMAND:
            self.result(modem, "NO CARRIER")
            return
        modem.state = State.ONLINE
        self.result(modem, f"CONNECT {self.options.rate}")

    # --- the call --------------------------------------------------------------------------

    def connect(self, caller: Modem, callee: Modem) -> None:
        """Make a line through the emulator and join both modems to it."""
        self.calls += 1
        self.emulator.new_line()
        for side, path in (("a", self.emulator.link_a), ("b", self.emulator.link_b)):
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(fd)
            modem = caller if side == "a" else callee
            self.line_fds[modem.side] = fd
            self.selector.register(fd, selectors.EVENT_READ, ("line", modem))
        self.emulator.connect()
        self.emit("connected", caller=caller.side, callee=callee.side, call=self.calls)
        connect = f"CONNECT {self.options.rate}"
        caller.state = State.ONLINE
        caller.last_data = time.monotonic()
        self.result(caller, connect)
        if self.options.login:
            callee.state = State.LOGIN
            caller.state = State.COMMAND  # reads go to the login dialogue
            caller.login_stage = "user"
            self.write(caller, b"\r\nlogin: ")
        else:
            callee.state = State.ONLINE
            callee.last_data = time.monotonic()
            self.result(callee, connect)

    def login_input(self, modem: Modem, data: bytes) -> None:
        """The caller's answers to login: and Password: (echoing the name only)."""
        for index, byte in enumerate(data):
            if byte not in (0x0D, 0x0A):
                if len(modem.login_buffer) < MAX_COMMAND_LINE:
                    modem.login_buffer.append(byte)
                if modem.login_stage == "user":
                    self.write(modem, bytes([byte]))
                continue
            if byte == 0x0A and not modem.login_buffer:
                continue
            answer = modem.login_buffer.decode("latin-1")
            modem.login_buffer.clear()
            if modem.login_stage == "user":
                modem.login_user = answer
                modem.login_stage = "password"
                self.write(modem, b"\r\nPassword: ")
                continue
            user, _, password = self.options.login.partition(":")
            good = modem.login_user == user and answer == password
            self.emit("login", side=modem.side, user=modem.login_user, ok=good)
            if not good:
                modem.login_stage = "user"
                self.write(modem, b"\r\nLogin incorrect\r\nlogin: ")
                continue
            modem.login_stage = ""
            modem.state = State.ONLINE
            modem.last_data = time.monotonic()
            callee = self.other(modem)
            callee.state = State.ONLINE
            self.result(callee, f"CONNECT {self.options.rate}")
            rest = data[index + 1 :]
            if rest:
                self.online_data(modem, rest, time.monotonic())
            return

    def online_data(self, modem: Modem, data: bytes, now: float) -> None:
        """Bytes for the far end; ``+++`` between guard times escapes to command mode."""
        guard = self.options.guard
        if data.strip(b"+") == b"" and (modem.plus_count or now - modem.last_data >= guard):
            modem.plus_count += len(data)
            if modem.plus_count == 3:
                count_at = modem.plus_count
                self.later(guard, lambda: self._escape(modem, count_at))
        else:
            modem.plus_count = 0
        modem.last_data = now
        fd = self.line_fds.get(modem.side)
        if fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fd, data)

    def _escape(self, modem: Modem, count_at: int) -> None:
        quiet = time.monotonic() - modem.last_data >= self.options.guard * 0.9
        if modem.state is State.ONLINE and modem.plus_count == count_at and quiet:
            modem.state = State.ONLINE_COMMAND
            modem.plus_count = 0
            self.emit("escape", side=modem.side)
            self.result(modem, "OK")

    def read_line(self, modem: Modem) -> None:
        """Bytes from the emulator for ``modem``'s relay; EOF/EIO: the line dropped."""
        fd = self.line_fds.get(modem.side)
        data = None if fd is None else _read(fd)
        if data is None:
            return
        if not data:
            self.hang_up(None, "line")
            return
        if modem.state is State.ONLINE:
            self.write(modem, data)

    def hang_up(self, modem: Modem | None, why: str) -> None:
        """End the call (if any): the line goes, the far end hears NO CARRIER."""
        caller = self.caller
        if caller is None:
            if modem is not None and modem.state is State.DIALING:
                modem.state = State.COMMAND
            return
        callee = self.other(caller)
        self.caller = None
        line_made = bool(self.line_fds)  # not while it was only ringing
        for fd in self.line_fds.values():
            with contextlib.suppress(KeyError):
                self.selector.unregister(fd)
            os.close(fd)
        self.line_fds.clear()
        if line_made and why != "line":  # the emulator's own drop ended its line already
            with contextlib.suppress(RuntimeError, OSError):
                self.emulator.hang_up()
        self.emit("hangup", side=modem.side if modem else None, why=why)
        for each in (caller, callee):
            each.login_stage = ""
            was = each.state
            each.state = State.COMMAND
            each.plus_count = 0
            if each is modem:
                continue
            if was is not State.COMMAND or each is caller:
                self.result(each, "NO CARRIER")

    # --- the loop --------------------------------------------------------------------------

    def control(self, text: str) -> None:
        """One command from the test."""
        word, _, rest = text.strip().partition(" ")
        if word == "mode" and rest in MODES:
            self.mode = rest
            self.emit("mode", mode=rest)
        elif word == "drop":
            self.hang_up(None, "drop")
        elif word == "quit":
            self.running = False
        elif word:
            self.emit("error", reason=f"unknown command {text.strip()!r}")

    def run(self) -> None:
        """Serve until told to quit."""
        self.emulator.start()
        for modem in self.modems:
            modem.make()
            self.later(0, lambda m=modem: self.poll_open(m))
        self.emit("ready", dte_a=str(self.a.link), dte_b=str(self.b.link))
        while self.running:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, action = heapq.heappop(self.timers)
                action()
                now = time.monotonic()
            timeout = max(0.0, self.timers[0][0] - now) if self.timers else None
            for key, _ in self.selector.select(timeout):
                now = time.monotonic()
                if key.data == WAKE:
                    self.woken()
                elif key.data == COMMAND:
                    for command in self.read_commands():
                        self.control(command)
                elif isinstance(key.data, Modem):
                    self.read_dte(key.data, now)
                elif isinstance(key.data, tuple):
                    self.read_line(key.data[1])
        self.hang_up(None, "quit")
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            self.emulator.stop()
        self.emit("counts", calls=self.calls)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dte-a", required=True, help="device name of modem A")
    parser.add_argument("--dte-b", required=True, help="device name of modem B")
    parser.add_argument("--dir", required=True, help="where the line emulator's names go")
    parser.add_argument("--rate", type=int, default=115200)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--ber", type=float, default=0.0)
    parser.add_argument("--seed", default="1")
    parser.add_argument("--guard", type=float, default=0.5, help="escape guard time, seconds")
    parser.add_argument("--login", default="", help="user:password the caller must give")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the fake modems."""
    FakeModems(parse_arguments(argv), sys.stdout).run()


class FakeModem(HelperProcess):
    """The fake modems' process, from a test: ``dte_a``/``dte_b`` are the device names.

    ``set_mode`` says how the next ``ATD`` goes, ``drop`` drops the carrier mid-call,
    ``wait_for`` reads events (it blocks: call it off the reactor, or after the fact).
    """

    name = "fake modem"

    def __init__(
        self,
        directory: Path,
        *,
        rate: int = 115200,
        login: str = "",
        guard: float = 0.5,
        ber: float = 0.0,
    ) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.dte_a = directory / "modem-a"
        self.dte_b = directory / "modem-b"
        command_line = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--dte-a={self.dte_a}",
            f"--dte-b={self.dte_b}",
            f"--dir={directory}",
            f"--rate={rate}",
            f"--guard={guard}",
            f"--ber={ber}",
        ]
        if login:
            command_line.append(f"--login={login}")
        super().__init__(command_line)

    def set_mode(self, mode: str) -> None:
        """How the next ATD goes: normal, busy, noanswer, nodialtone or silent."""
        self.send(f"mode {mode}")
        self.wait_for("mode")

    def drop(self) -> None:
        """Drop the carrier of the call now."""
        self.send("drop")


if __name__ == "__main__":
    main()

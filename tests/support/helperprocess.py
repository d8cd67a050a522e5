"""The plumbing shared by the test helper processes (the line emulator, the fake modems).

Each helper runs as its own process so that its timing does not depend on the engines
under test.  It reads command lines on standard input, writes one JSON object per event
on standard output, and stops cleanly on SIGTERM/SIGINT or at the end of its input.
:class:`ControlLoop` is that plumbing inside the helper; :class:`HelperProcess` starts
a helper from a test or a benchmark and reads its events.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
from typing import IO, Any, Self

WAKE = "wake"
COMMAND = "command"


class ControlLoop:
    """A selector with standard input and a signal wake-up registered; JSON events out.

    Keys of the selector's events: :data:`WAKE` (call :meth:`woken`), :data:`COMMAND`
    (call :meth:`read_commands`), or whatever the helper registered itself."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.selector = selectors.DefaultSelector()
        self.running = True
        self._wake_read, wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        self.selector.register(self._wake_read, selectors.EVENT_READ, WAKE)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, COMMAND)
        self._command_buffer = b""

    def emit(self, event: str, **values: Any) -> None:
        """One JSON line on standard output."""
        self.out.write(json.dumps({"event": event, **values}) + "\n")
        self.out.flush()

    def _on_signal(self, number: int, frame: object) -> None:
        self.running = False

    def woken(self) -> None:
        """A signal arrived (the handler has already asked the loop to stop)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 64)

    def read_commands(self) -> list[str]:
        """The complete command lines now on standard input; its end stops the loop."""
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            self.running = False
            self.selector.unregister(sys.stdin.fileno())
            return []
        self._command_buffer += chunk
        lines = []
        while b"\n" in self._command_buffer:
            line, _, self._command_buffer = self._command_buffer.partition(b"\n")
            lines.append(line.decode("utf-8", "replace"))
        return lines


class HelperProcess:
    """A helper process started from a test: command lines in, JSON events out.

    ``wait_for`` blocks: call it off the reactor (``deferToThread``) or after the fact.
    An ``error`` event raises ``RuntimeError``; :meth:`on_event` sees every event."""

    name = "helper"

    def __init__(self, command_line: list[str]) -> None:
        self.command_line = command_line
        self.process: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []  # every event, in order
        self._unclaimed: list[dict[str, Any]] = []  # events no ``wait_for`` has returned
        self._final: dict[str, Any] | None = None  # the ``counts`` event at exit

    def start(self) -> None:
        """Start the process and wait until it is ready."""
        self.process = subprocess.Popen(
            self.command_line, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.wait_for("ready")

    def send(self, command: str) -> None:
        """One command line to the process."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        """Hook: every event as it is read."""

    def _next_event(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        text = self.process.stdout.readline()
        if not text:
            raise RuntimeError(f"{self.name} exited with {self.process.wait()}")
        event: dict[str, Any] = json.loads(text)
        self.events.append(event)
        self.on_event(event)
        if event["event"] == "error":
            raise RuntimeError(f"{self.name}: {event['reason']}")
        return event

    def wait_for(self, kind: str) -> dict[str, Any]:
        """Read events until one of ``kind`` arrives."""
        for index, seen in enumerate(self._unclaimed):
            if seen["event"] == kind:
                return self._unclaimed.pop(index)
        while True:
            event = self._next_event()
            if event["event"] == kind:
                return event
            self._unclaimed.append(event)

    def stop(self) -> dict[str, Any]:
        """Ask the process to quit; returns its ``counts`` event (once; later calls too)."""
        if self.process is None:
            raise RuntimeError(f"the {self.name} was not started")
        if self._final is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("quit")
            self._final = self.wait_for("counts")
            self.process.wait(timeout=10)
        return self._final

    def kill(self) -> None:
        """Stop the process however it is doing (after a failure)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._final is None:
            try:
                self.stop()
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired):
                self.kill()

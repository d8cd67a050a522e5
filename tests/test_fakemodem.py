"""The fake Hayes modems themselves: commands, auto-answer, the escape's guard time."""

from __future__ import annotations

import contextlib
import os
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.fakemodem import FakeModem


@pytest.fixture
def modems(tmp_path: Path) -> Iterator[FakeModem]:
    """The fake modems' process."""
    with FakeModem(tmp_path) as fake:
        yield fake


def _open(device: Path) -> int:
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return fd


def _read_until(fd: int, wanted: bytes, limit: float = 10.0) -> bytes:
    """Read until ``wanted`` has arrived (or give up after ``limit`` seconds of polling)."""
    got = b""
    for _ in range(int(limit / 0.01)):
        with contextlib.suppress(BlockingIOError):
            got += os.read(fd, 4096)
        if wanted in got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"{wanted!r} never came; got {got!r}")


def test_commands_are_echoed_and_answered(modems: FakeModem) -> None:
    """AT commands are echoed until ATE0, settings answer OK, unknown commands ERROR."""
    a = _open(modems.dte_a)
    try:
        time.sleep(0.1)  # the modem notices the device is open
        os.write(a, b"ATZ\r")
        assert _read_until(a, b"OK\r\n") == b"ATZ\r\r\nOK\r\n"
        os.write(a, b"ATE0 V1 &C1 &D2 S0=0\r")
        _read_until(a, b"OK\r\n")
        os.write(a, b"AT&Q9\r")
        assert _read_until(a, b"ERROR\r\n") == b"\r\nERROR\r\n"  # echo off: no command echoed
    finally:
        os.close(a)


def test_auto_answer_connects_after_s0_rings_and_the_escape_needs_its_guard(
    modems: FakeModem,
) -> None:
    """With S0=1 the callee answers by itself; +++ inside data is data, +++ alone escapes."""
    a, b = _open(modems.dte_a), _open(modems.dte_b)
    try:
        time.sleep(0.1)
        os.write(b, b"ATE0S0=1\r")
        _read_until(b, b"OK\r\n")
        os.write(a, b"ATE0\r")
        _read_until(a, b"OK\r\n")
        os.write(a, b"ATDT5551234\r")
        assert b"CONNECT 115200" in _read_until(b, b"CONNECT 115200\r\n")
        _read_until(a, b"CONNECT 115200\r\n")
        os.write(a, b"data+++more")
        assert _read_until(b, b"data+++more").endswith(b"data+++more")
        time.sleep(0.6)  # the guard time before
        os.write(a, b"+++")
        _read_until(a, b"OK\r\n")  # after the guard time after
        os.write(a, b"ATH0\r")
        _read_until(a, b"OK\r\n")
        _read_until(b, b"NO CARRIER")
        assert modems.wait_for("escape")["side"] == "a"
        assert modems.wait_for("hangup") == {"event": "hangup", "side": "a", "why": "ath"}
    finally:
        os.close(a)
        os.close(b)


def test_a_ringing_modem_keeps_ringing_through_a_reset_and_the_caller_can_give_up(
    modems: FakeModem,
) -> None:
    """DTR dropped or ATH0 while ringing leave the call ringing; the caller hanging up ends it."""
    a, b = _open(modems.dte_a), _open(modems.dte_b)
    try:
        time.sleep(0.1)
        os.write(a, b"ATDT1\r")
        _read_until(b, b"RING")
        os.close(b)  # the answering relay closes its line to reset it
        b = _open(modems.dte_b)
        os.write(b, b"ATZ\r")
        _read_until(b, b"OK\r\n")
        os.write(b, b"ATH0\r")
        _read_until(b, b"OK\r\n")
        assert _read_until(b, b"RING", limit=5.0).count(b"RING") >= 1  # still ringing
        os.write(a, b"ATH0\r")  # the caller gives up
        _read_until(a, b"OK\r\n")
        os.write(b, b"ATA\r")
        _read_until(b, b"NO CARRIER")  # nothing left to answer
        assert modems.wait_for("hangup") == {"event": "hangup", "side": "a", "why": "ath"}
    finally:
        os.close(a)
        os.close(b)

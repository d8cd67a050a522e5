"""The lean epoll reactor handles real socket events as Twisted's does, minus the log context.

Each test makes its own :class:`LeanEPollReactor` (never installed, never run: the tests
call ``doPoll`` themselves) over a real socket pair.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.runtime.leanreactor import LeanEPollReactor


@implementer(IReadDescriptor)
class _Reader:
    """A socket the reactor reads; what it got, and how it ended."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.data = b""
        self.lost: list[Failure] = []
        self.prefix_asked = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        self.prefix_asked += 1
        return "reader"

    def doRead(self) -> None:
        chunk = self.sock.recv(4096)
        if self.fail:
            raise RuntimeError("the protocol broke")
        self.data += chunk

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@pytest.fixture
def lean() -> Iterator[Any]:
    reactor = LeanEPollReactor()  # type: ignore[no-untyped-call]
    yield reactor
    reactor._poller.close()


@pytest.fixture
def errors() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_readable_socket_is_read_without_asking_for_a_log_prefix(lean: Any) -> None:
    """Bytes sent to the socket reach doRead; logPrefix is never called per event."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        reader = _Reader(ours)
        lean.addReader(reader)
        theirs.sendall(b"EHLO client.test\r\n")
        lean.doPoll(5)
        theirs.sendall(b"QUIT\r\n")
        lean.doPoll(5)
        assert reader.data == b"EHLO client.test\r\nQUIT\r\n"
        assert reader.prefix_asked == 0 and reader.lost == []
        lean.removeReader(reader)


def test_an_error_in_the_handler_is_logged_and_drops_only_that_socket(
    lean: Any, errors: list[LogEvent]
) -> None:
    """What doRead raises is logged and that selectable disconnected; the others go on."""
    bad_ours, bad_theirs = socket.socketpair()
    good_ours, good_theirs = socket.socketpair()
    with bad_ours, bad_theirs, good_ours, good_theirs:
        bad_ours.setblocking(False)
        good_ours.setblocking(False)
        bad, good = _Reader(bad_ours, fail=True), _Reader(good_ours)
        lean.addReader(bad)
        lean.addReader(good)
        bad_theirs.sendall(b"x")
        good_theirs.sendall(b"y")
        lean.doPoll(5)
        if not good.data:  # the two events may come in two rounds
            lean.doPoll(5)
        assert good.data == b"y" and good.lost == []
        assert len(bad.lost) == 1 and bad.lost[0].check(RuntimeError)
        logged = [e for e in errors if "the protocol broke" in str(e.get("failure"))]
        assert len(logged) == 1 and logged[0]["system"] == "-"  # no connection label: lean
        assert bad not in lean.getReaders() and good in lean.getReaders()
        lean.removeReader(good)


def test_nothing_to_do_returns_after_the_timeout(lean: Any) -> None:
    """No event within the timeout: doPoll returns, having called nothing."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = _Reader(ours)
        lean.addReader(reader)
        lean.doPoll(0.01)
        assert reader.data == b"" and reader.lost == []
        lean.removeReader(reader)

"""relay.runtime.logfile: Twisted's text observer's lines, buffered, flushed on time."""

from __future__ import annotations

import io
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure

from relay.runtime.logfile import FLUSH_INTERVAL, RelayLogObserver, observer

WHEN = 1_795_000_000.25


class Out(io.StringIO):
    """A text file that keeps what was written apart from what was flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed = ""
        self.flushes = 0

    def flush(self) -> None:
        self.flushed = self.getvalue()
        self.flushes += 1


def _twisted_line(event: dict[str, object]) -> str:
    return formatEventAsClassicLogText(event) or ""


def _ours(event: dict[str, object]) -> str:
    out = Out()
    RelayLogObserver(out, task.Clock())(dict(event))
    return out.getvalue()


def _event(form: str, **fields: object) -> dict[str, object]:
    return {
        "log_format": form,
        "log_time": WHEN,
        "log_namespace": "relay.test",
        "log_level": LogLevel.info,
        **fields,
    }


@pytest.mark.parametrize(
    "event",
    [
        _event("smtp: {queue_id} stored size={size}", queue_id="0660CB0F36073B", size=4096),
        _event("retry in {delay:.0f}s ({why!r})", delay=59.7, why="451 busy"),
        _event("two\nlines {x}", x="and\nthree"),
        _event("no fields at all"),
        _event("{summary}", summary="smtp: 0660 stored from=<a@x.test> nrcpt=1"),
        _event("{a.real} attribute", a=3),  # Twisted's own formatter handles this
        _event("{call()} syntax", call=lambda: "called"),
        _event("missing {nothere}"),
        _event("{x}", x="", log_level=LogLevel.warn),
        {**_event("with a system"), "log_system": "TCP Port 2525"},
        {"log_format": "no time", "log_namespace": "n", "log_level": LogLevel.error},
        _event("rounds up", log_time=1_795_000_020.9999996),  # datetime rounds to the µs
        _event("before 1970", log_time=-1.5),
        _event("odd namespace", log_namespace="two\nlines"),
    ],
)
def test_lines_are_the_ones_twisted_writes(event: dict[str, object]) -> None:
    """Our observer writes the same line as Twisted's file observer for each sample event."""
    assert _ours(event) == _twisted_line(event)


def test_a_failure_gets_its_traceback_as_twisted_writes_it() -> None:
    """An event with a failure gets the traceback Twisted's observer writes."""
    failure = Failure(ZeroDivisionError("division by zero"))
    event = _event("it broke: {what}", what="division", log_failure=failure)
    assert _ours(event) == _twisted_line(event)
    assert "ZeroDivisionError" in _ours(event)


def test_an_event_without_text_writes_nothing() -> None:
    """An event with no format and no text writes nothing."""
    assert _ours({"log_time": WHEN, "log_namespace": "n"}) == ""


@given(st.text(), st.integers(), st.sampled_from(list(LogLevel.iterconstants())))
def test_any_values_render_as_twisted_renders_them(text: str, number: int, level: object) -> None:
    """Any text, number and level render as Twisted's observer renders them."""
    event = _event("a {text} and {number:d} end", text=text, number=number, log_level=level)
    assert _ours(event) == _twisted_line(event)


def test_lines_wait_in_the_buffer_for_the_flush_interval(clock: task.Clock) -> None:
    """Info lines wait in the buffer until the flush interval passes, leaving no timer after."""
    out = Out()
    log = Logger(namespace="relay.test", observer=LogPublisher(RelayLogObserver(out, clock)))
    log.info("one {n}", n=1)
    log.info("two {n}", n=2)
    assert out.flushed == "" and "two 2" in out.getvalue()
    clock.advance(FLUSH_INTERVAL)
    assert "one 1" in out.flushed and "two 2" in out.flushed and out.flushes == 1
    clock.advance(FLUSH_INTERVAL * 10)
    assert out.flushes == 1  # nothing written since: no timer left behind


def test_warnings_and_worse_are_flushed_at_once() -> None:
    """A warning flushes at once, with the lines buffered before it."""
    out, clock = Out(), task.Clock()  # not the strict fixture: the interval's timer stays armed
    log = Logger(namespace="relay.test", observer=LogPublisher(RelayLogObserver(out, clock)))
    log.info("quiet")
    log.warn("loud {what}", what="disk full")
    assert "quiet" in out.flushed and "loud disk full" in out.flushed


def test_the_twistd_factory_writes_to_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The observer twistd's --logger makes writes to standard output."""
    made = observer()
    made(_event("hello {who}", who="operator", log_level=LogLevel.error))
    assert "[relay.test#error] hello operator" in capsys.readouterr().out
    assert sys.stdout is not None


class ThreadClock(Clock):
    """A Clock that also takes callFromThread (run at once, recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[str] = []

    def callFromThread(self, f: object, *args: object) -> None:
        self.from_threads.append(threading.current_thread().name)
        f(*args)  # type: ignore[operator]


def test_a_line_from_another_thread_asks_the_owner_for_the_flush() -> None:
    """The writer thread logs too: its line is written, the timer is the owner's to set."""
    out, clock = Out(), ThreadClock()
    observer = RelayLogObserver(out, clock)
    worker = threading.Thread(
        target=observer, args=(_event("from {who}", who="spool-writer"),), name="writer"
    )
    worker.start()
    worker.join()
    assert "from spool-writer" in out.getvalue()
    assert clock.from_threads == ["writer"]
    clock.advance(FLUSH_INTERVAL)
    assert "from spool-writer" in out.flushed


def test_the_operator_facing_logger_name_still_names_the_observer() -> None:
    """``--logger relay.logfile.observer`` (README, unit files) resolves to the runtime observer."""
    from twisted.python.reflect import namedAny

    assert namedAny("relay.logfile.observer") is observer

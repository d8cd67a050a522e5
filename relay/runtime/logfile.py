"""The relay's text log observer: Twisted's log lines, at a fraction of the CPU.

Why: every message costs the relay three log events (stored, delivered, removed).
Twisted's ``textFileLogObserver`` formats each with its own Python-level formatter,
builds the time stamp with ``datetime`` and ``strftime``, and flushes the file after
every line (one ``write`` system call per event).  ``bench/logfile.py`` measures both
on a real file (the figures are in the README).

This observer writes the same lines (``2026-11-21T15:31:47+0000 [namespace#info]
text``), so nothing that reads the log needs to change, but:

* an ordinary event (a ``log_format`` with plain ``{name}`` fields, no traceback) is
  rendered with ``str.format``; anything else (call syntax, a failure, a legacy
  ``twisted.python.log`` event) goes through Twisted's own formatter;
* the time stamp is made once per second;
* lines collect in the file's buffer and are flushed :data:`FLUSH_INTERVAL` seconds
  after the first unflushed one, at once for warnings and worse, and at shutdown.  A
  relay killed outright may lose the last second of log lines, never mail (the spool
  is durable on its own).

Use it with twistd's ``--logger`` option, in the foreground (systemd, a terminal,
``make run``)::

    twistd --nodaemon --pidfile= --logger relay.logfile.observer relay

It writes to the standard output twistd started with.
"""

from __future__ import annotations

import sys
import threading
from string import Formatter
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

__all__ = ["FLUSH_INTERVAL", "RelayLogObserver", "observer"]

FLUSH_INTERVAL = 1.0
_PARSER = Formatter()


@implementer(ILogObserver)
class RelayLogObserver:
    """Classic Twisted log lines to a text file, buffered and flushed on a timer."""

    def __init__(self, out: IO[str], clock: Any = None) -> None:
        """``clock`` schedules the flushes (the global reactor when None).

        The thread that makes the observer owns its timer (twistd makes it in the thread
        that runs the reactor); events logged in other threads (the spool's writer, the
        password checker) are written at once and ask that thread for the timer.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self._out = out
        self._clock = clock
        self._owner = threading.get_ident()
        self._lock = threading.Lock()  # one line at a time into the file's buffer
        self._stamp: tuple[int, str] = (-1, "")  # one tuple: two threads never mix halves
        self._plain: dict[str, bool] = {}  # format string → only plain {name} fields
        self._flush_call: Any = None
        self._flush_wanted = False
        self._shutdown_hooked = False

    def __call__(self, event: LogEvent) -> None:
        """Write one event's line."""
        line = self._fast_line(event)
        if line is None:
            line = formatEventAsClassicLogText(event, self._format_time)
            if line is None:
                return
        level = event.get("log_level")
        urgent = level is not None and level >= LogLevel.warn
        with self._lock:
            self._out.write(line)
            if urgent:
                self._out.flush()
            schedule = not urgent and not self._flush_wanted
            if schedule:
                self._flush_wanted = True
        if not schedule:
            return
        if threading.get_ident() == self._owner:
            self._schedule_flush()
        else:
            try:
                self._clock.callFromThread(self._schedule_flush)
            except Exception:  # no reactor to ask (it is gone): be plain
                self._timed_flush()

    def flush(self) -> None:
        """Write out the buffered lines now (in the observer's own thread)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        self._timed_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is not None:
            return
        try:
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self._timed_flush)
        except Exception:  # no clock to ask (the reactor is gone): be plain
            self._timed_flush()
            return
        if not self._shutdown_hooked and hasattr(self._clock, "addSystemEventTrigger"):
            self._shutdown_hooked = True
            self._clock.addSystemEventTrigger("after", "shutdown", self.flush)

    def _timed_flush(self) -> None:
        self._flush_call = None
        with self._lock:
            self._flush_wanted = False
            self._out.flush()

    def _fast_line(self, event: LogEvent) -> str | None:
        """The line for an ordinary event, or None to let Twisted format it."""
        form = event.get("log_format")
        if (
            not isinstance(form, str)
            or "log_failure" in event
            or "log_flattened" in event
            or "log_system" in event
            or not self._is_plain(form)
        ):
            return None
        try:
            text = form.format_map(event)
        except Exception:  # a missing key, a bad spec: Twisted's formatter says what it can
            return None
        if not text:
            return None
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        line = f"{self._format_time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _is_plain(self, form: str) -> bool:
        """Whether every field of ``form`` is a plain name (Twisted allows calls, ``{f()}``)."""
        known = self._plain.get(form)
        if known is None:
            try:
                fields = [name for _, name, _, _ in _PARSER.parse(form) if name is not None]
            except ValueError:
                fields = ["("]
            known = all(name.isidentifier() for name in fields)
            if len(self._plain) < 1024:
                self._plain[form] = known
        return known

    def _format_time(self, when: float | None) -> str:
        if when is None:
            return "-"
        # The second Twisted would print: datetime rounds to the microsecond first.
        second = round(when * 1_000_000) // 1_000_000
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = formatTime(second)
            self._stamp = (second, stamp)
        return stamp


def observer() -> RelayLogObserver:
    """twistd's ``--logger relay.logfile.observer``: the observer on standard output."""
    return RelayLogObserver(sys.stdout)

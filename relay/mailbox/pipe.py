"""Mail to a command (``|command`` in aliases): spawn it, feed it the message, judge its exit.

The command runs under ``/bin/sh -c`` through the reactor (``spawnProcess``), never a
blocking ``subprocess`` call; its standard input is fed with backpressure (the text is
read from the queue only as fast as the command takes it), and the first few KiB of its
output are kept for the reply, because that is usually where it says what went wrong.

The exit status is read the way every MTA reads it, through ``sysexits.h`` (Postfix's
table):  0 delivered; ``EX_TEMPFAIL`` (75), ``EX_OSERR`` (71) and ``EX_IOERR`` (74) try
again later; ``EX_NOUSER`` (67) is an unknown user; ``EX_NOPERM`` (77) not authorised;
the other sysexits codes and any other status are permanent failures.  A command
killed by a signal, or by us after ``timeout`` seconds, is tried again later.

When the relay runs as root the command runs as the identity it is given (for aliases:
the owner of the aliases file, or ``nobody``), and in a session of its own (``setsid``),
so that a time-out kills the whole process group, not just the shell.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.mailbox.identity import Identity
from relay.oneline import one_line
from relay.reply import Reply, ReplyCode

__all__ = ["CommandOutcome", "reply_for_outcome", "run_command"]

_OUTPUT_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How a command ended: exit code or signal (or time-out), and what it printed."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    output: bytes = b""


# sysexits.h → (MMDF reply, enhanced status, SMTP code); the texts are Postfix's.
_SYSEXITS: dict[int, tuple[ReplyCode, str, int, str]] = {
    os.EX_USAGE: (ReplyCode.NO, "5.3.0", 554, "command line usage error"),
    os.EX_DATAERR: (ReplyCode.NO, "5.6.0", 554, "data format error"),
    os.EX_NOINPUT: (ReplyCode.NO, "5.3.0", 554, "cannot open input"),
    os.EX_NOUSER: (ReplyCode.USER, "5.1.1", 550, "user unknown"),
    os.EX_NOHOST: (ReplyCode.NDEL, "5.1.2", 550, "host name unknown"),
    os.EX_UNAVAILABLE: (ReplyCode.NO, "5.3.0", 554, "service unavailable"),
    os.EX_SOFTWARE: (ReplyCode.NO, "5.3.0", 554, "internal software error"),
    os.EX_OSERR: (ReplyCode.LIO, "4.3.0", 451, "system resource problem"),
    os.EX_OSFILE: (ReplyCode.NO, "5.3.0", 554, "critical OS file missing"),
    os.EX_CANTCREAT: (ReplyCode.NO, "5.2.0", 554, "can't create user output file"),
    os.EX_IOERR: (ReplyCode.LIO, "4.3.0", 451, "input/output error"),
    os.EX_TEMPFAIL: (ReplyCode.AGN, "4.3.0", 451, "temporary failure"),
    os.EX_PROTOCOL: (ReplyCode.NO, "5.5.0", 554, "remote error in protocol"),
    os.EX_NOPERM: (ReplyCode.NAUTH, "5.7.0", 550, "permission denied"),
    os.EX_CONFIG: (ReplyCode.NO, "5.3.5", 554, "local configuration error"),
}


def reply_for_outcome(command: str, outcome: CommandOutcome) -> Reply:
    """The MMDF reply for a command's end, with its output (one line) in the text."""
    said = one_line(outcome.output.decode("utf-8", "replace"), 200)
    suffix = f": {said}" if said else ""
    shown = one_line(command, 80)
    if outcome.timed_out:
        return Reply(ReplyCode.AGN, f"command |{shown} timed out{suffix}", 451, "4.3.0")
    if outcome.signal is not None:
        return Reply(
            ReplyCode.AGN, f"command |{shown} killed by signal {outcome.signal}{suffix}", 451
        )
    if outcome.exit_code == 0:
        return Reply(ReplyCode.MOK, f"delivered to command |{shown}")
    code = outcome.exit_code if outcome.exit_code is not None else -1
    if code in _SYSEXITS:
        mmdf, enhanced, smtp, meaning = _SYSEXITS[code]
        text = f"command |{shown} exited {code} ({meaning}){suffix}"
        return Reply(mmdf, text, smtp, enhanced)
    text = f"command |{shown} exited {code}{suffix}"
    return Reply(ReplyCode.NO, text, 554, "5.3.0")


@implementer(IPushProducer)
class _StdinFeeder:
    """Writes the message into the command's stdin as fast as the pipe takes it."""

    def __init__(self, transport: Any, source: Callable[[], Awaitable[bytes]]) -> None:
        self._transport = transport
        self._source = source
        self._resume: Deferred[None] | None = None
        self._stopped = False

    def pauseProducing(self) -> None:
        """The pipe is full: stop until resumed."""
        if self._resume is None:
            self._resume = Deferred()

    def resumeProducing(self) -> None:
        """The pipe drained: go on."""
        resume, self._resume = self._resume, None
        if resume is not None and not resume.called:  # called: cancelled while paused
            resume.callback(None)

    def stopProducing(self) -> None:
        """The command closed its stdin (or exited): stop feeding."""
        self._stopped = True
        self.resumeProducing()

    async def run(self) -> None:
        """Feed every chunk, then close stdin (the command sees end of file)."""
        self._transport.registerProducer(self, True)
        try:
            while not self._stopped:
                if self._resume is not None:
                    await self._resume
                    continue
                chunk = await self._source()
                if not chunk or self._stopped:
                    break
                self._transport.write(chunk)
        finally:
            self._transport.unregisterProducer()
            self._transport.closeStdin()


class _CommandProtocol(ProcessProtocol):
    """Collects the command's output and tells waiters how it ended.

    Each :meth:`wait` gets a Deferred of its own, so cancelling one (the deliverer
    giving up on a delivery) never leaves ``processEnded`` firing a cancelled Deferred.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self._ended: tuple[int | None, int | None] | None = None
        self._waiters: list[Deferred[tuple[int | None, int | None]]] = []

    def wait(self) -> Deferred[tuple[int | None, int | None]]:
        """Fire with (exit code, signal) once the command has ended."""
        if self._ended is not None:
            return succeed(self._ended)
        waiter: Deferred[tuple[int | None, int | None]] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Keep the first few KiB of stdout and stderr."""
        room = _OUTPUT_LIMIT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def processEnded(self, reason: Failure) -> None:
        """Record the exit code or the signal, and tell the waiters."""
        value = reason.value
        if isinstance(value, ProcessDone):
            self._ended = (0, None)
        elif isinstance(value, ProcessTerminated):
            self._ended = (value.exitCode, value.signal)
        else:
            self._ended = (None, None)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(self._ended)


async def run_command(
    reactor: Any,
    command: str,
    source: Callable[[], Awaitable[bytes]],
    *,
    env: Mapping[str, str],
    identity: Identity | None,
    timeout: float,
    setsid: str | None,
) -> CommandOutcome:
    """Run ``command`` with ``/bin/sh -c``, feed it ``source()``'s chunks, wait for its end.

    ``source`` returns the next chunk of the text, ``b""`` at the end; if it fails the
    command is killed and the failure propagates.  ``identity`` is used only when the
    relay runs as root; ``setsid`` is the path of ``setsid(1)`` (or None to run without a
    session of its own).
    """
    argv = ["/bin/sh", "-c", command]
    if setsid is not None:
        argv = [setsid, *argv]
    kwargs: dict[str, Any] = {}
    if identity is not None and os.geteuid() == 0 and identity.uid != 0:
        kwargs.update(uid=identity.uid, gid=identity.gid)
    protocol = _CommandProtocol()
    process = reactor.spawnProcess(protocol, argv[0], argv, env=dict(env), path="/", **kwargs)
    timed_out = False

    def kill() -> None:
        nonlocal timed_out
        timed_out = True
        _kill(process, session=setsid is not None)

    timer = reactor.callLater(timeout, kill)
    try:
        await _StdinFeeder(process, source).run()
        exit_code, killed_by = await protocol.wait()
    except BaseException:
        # The text could not be read, or the delivery was cancelled: the command must
        # not go on with half a message.  Killed, it ends at once; wait for that.
        _kill(process, session=setsid is not None)
        await protocol.wait()
        raise
    finally:
        if timer.active():
            timer.cancel()
    return CommandOutcome(exit_code, killed_by, timed_out, bytes(protocol.output))


def _kill(process: Any, *, session: bool) -> None:
    """SIGKILL the command: its whole session when it has one, else the process."""
    pid = process.pid
    if pid is None:
        return
    try:
        if session:
            os.killpg(pid, signal.SIGKILL)
        else:
            process.signalProcess("KILL")
    except (OSError, ProcessExitedAlready):
        return

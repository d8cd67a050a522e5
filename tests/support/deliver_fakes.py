"""Scripted channels and a Clock-driven deliverer for the deliverer's tests.

:class:`ScriptedChannel` is a real IChannel whose answers a test can replace call by
call: each answer is a function of the call's arguments returning a value (fired at
once), a Deferred (returned as is: a test can fire it later, or never), or an exception
(a failed Deferred).  Left alone it behaves like a good channel in its mode.  It records
every call, per session, and what it delivered.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface import implementer

from relay.address import Address, parse_forward_path, parse_reverse_path
from relay.config import Config, parse_config
from relay.deliver import build_deliverer
from relay.envelope import (
    Destination,
    Envelope,
    Recipient,
    Submitter,
)
from relay.interfaces import (
    IChannel,
    IChannelSession,
    IMessage,
    SequencingMode,
)
from relay.policy.dsn import is_dsn
from relay.queue.ready import QueueReady
from relay.reply import Reply, ReplyCode

from support.deferreds import fired
from support.memqueue import MemoryQueue

Answer = Callable[..., object]
DEST = Destination("fake", "dest.test")
LIST = SequencingMode.ADDRESS_THEN_TEXT
PER_ADDRESS = SequencingMode.TEXT_PER_ADDRESS


@dataclass(frozen=True)
class Raw:
    """A scripted answer returned as it is, not wrapped in a Deferred (a broken channel)."""

    value: object


@dataclass(frozen=True)
class Raise:
    """A scripted answer that raises at once instead of returning a Deferred."""

    error: Exception


def _deferred(value: object) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    if isinstance(value, BaseException):
        return defer.fail(value)
    return defer.succeed(value)


@dataclass
class Call:
    """One call a channel received: which session (0: the channel itself), what, with what."""

    session: int
    name: str
    detail: Any = None


@implementer(IChannel)
class ScriptedChannel:
    """A channel whose answers tests script; it records every call and every delivery."""

    def __init__(self, mode: SequencingMode, name: str = "fake", **answers: Answer) -> None:
        self.name = name
        self.mode = mode
        self.answers: dict[str, Answer] = dict(answers)
        self.calls: list[Call] = []
        self.sessions: list[ScriptedSession] = []
        self.delivered: list[tuple[str, str]] = []  # (queue id, address) per delivered copy
        self.texts: list[bytes] = []  # each text received in list mode
        self.current: ScriptedSession | None = None  # the session whose call is answered

    def open_session(self, destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: a new session, unless the script says otherwise."""
        self.calls.append(Call(0, "open_session", destination))
        session = ScriptedSession(self, len(self.sessions) + 1, destination)
        answer = self.answers.get("open_session")
        if answer is None:
            self.sessions.append(session)
            return defer.succeed(session)
        result = answer(destination)
        if isinstance(result, ScriptedSession):
            self.sessions.append(result)
        return _deferred(result)

    def names(self, session: int | None = None) -> list[str]:
        """The calls made (on one session, if given), by name."""
        return [c.name for c in self.calls if session is None or c.session == session]

    @property
    def sessions_opened(self) -> int:
        """How many times open_session was called."""
        return sum(1 for c in self.calls if c.name == "open_session")


@implementer(IChannelSession)
@dataclass(eq=False)
class ScriptedSession:
    """One session of a ScriptedChannel."""

    channel: ScriptedChannel
    number: int
    destination: Destination
    message: IMessage | None = None
    accepted: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    pipelines_addresses: bool = False  # a test sets it to drive the pipelined sequence

    def _do(self, name: str, detail: Any, default: Callable[[], object], *args: Any) -> Any:
        self.channel.calls.append(Call(self.number, name, detail))
        self.channel.current = self
        answer = self.channel.answers.get(name)
        result = default() if answer is None else answer(*args)
        if isinstance(result, Raw):
            return result.value
        if isinstance(result, Raise):
            raise result.error
        return _deferred(result)

    def begin_message(
        self, mode: str, return_path: Address | None, message: IMessage
    ) -> Deferred[None]:
        """``xx_winit``."""
        self.message = message
        self.accepted = []
        self.chunks = []
        return self._do("begin_message", message.queue_id, lambda: None, mode, return_path, message)

    def add_recipient(self, recipient: Recipient) -> Deferred[Reply]:
        """``xx_wadr``: AOK (list mode) or deliver and MOK, unless scripted."""
        address = str(recipient.address)

        def default() -> object:
            if self.channel.mode is LIST:
                return Reply(ReplyCode.AOK)
            return defer.ensureDeferred(self._deliver_copy(address))

        answer = self._do("add_recipient", address, default, recipient)

        def note(reply: object) -> object:
            if isinstance(reply, Reply) and self.message is not None:
                if reply.code is ReplyCode.AOK:
                    self.accepted.append(address)
                elif reply.code is ReplyCode.MOK and self.channel.mode is PER_ADDRESS:
                    self.channel.delivered.append((self.message.queue_id, address))
            return reply

        return answer.addCallback(note)

    async def _deliver_copy(self, address: str) -> Reply:
        assert self.message is not None
        reader = self.message.open_text()
        try:
            while await reader.read(4096):
                pass
        finally:
            reader.close()
        return Reply(ReplyCode.MOK)

    def end_recipients(self) -> Deferred[None]:
        """``xx_waend``."""
        return self._do("end_recipients", None, lambda: None)

    def begin_text(self) -> Deferred[None]:
        """``xx_wtinit``."""
        return self._do("begin_text", None, lambda: None)

    def write_text(self, chunk: bytes) -> Deferred[None]:
        """``xx_wtxt``: keep the chunk."""
        self.chunks.append(chunk)
        return self._do("write_text", len(chunk), lambda: None, chunk)

    def end_text(self) -> Deferred[Reply]:
        """``xx_wtend``: OK for every accepted address, unless scripted."""
        answer = self._do("end_text", None, lambda: Reply(ReplyCode.OK))

        def note(reply: object) -> object:
            self.channel.texts.append(b"".join(self.chunks))
            ok = isinstance(reply, Reply) and reply.code.is_success
            if ok and reply.code not in (ReplyCode.AOK, ReplyCode.MOK) and self.message:
                queue_id = self.message.queue_id
                self.channel.delivered.extend((queue_id, a) for a in self.accepted)
            return reply

        return answer.addCallback(note)

    def abort_message(self) -> Deferred[None]:
        """``xx_wkill``."""
        return self._do("abort_message", None, lambda: None)

    def end_session(self) -> Deferred[None]:
        """``xx_end``."""
        return self._do("end_session", None, lambda: None)


# --- envelopes ------------------------------------------------------------------------------


def envelope(
    *recipients: str,
    sender: str | None = "<sender@example.test>",
    destination: Destination | None = DEST,
    arrival: float = 0.0,
    protocol: str = "ESMTP",
) -> Envelope:
    """An envelope from ``sender`` (None: ``<>``) to ``recipients``, all routed alike."""
    return Envelope(
        return_path=None if sender is None else parse_reverse_path(sender),
        recipients=tuple(Recipient(parse_forward_path(f"<{r}>"), destination) for r in recipients),
        arrival=arrival,
        submitter=Submitter(protocol),
    )


TEXT = (
    b"From: Sender <sender@example.test>\r\n"
    b"To: rcpt@dest.test\r\n"
    b"Subject: a test message\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


# --- a deliverer on a Clock -------------------------------------------------------------------

T0 = 1_700_000_000.0  # the clock's start: a real date, so DSN dates look like dates

CONFIG = """
[relay]
hostname = "relay.here.test"
local_domains = ["here.test"]
spool = "spool"
postmaster = "postmaster@here.test"

[deliver]
retry_min = "5m"
retry_max = "70m"
warn_after = "4h"
give_up_after = "5d"
concurrency_per_destination = 20
initial_destination_concurrency = 5
concurrency_total = 100
recipients_per_transaction = 50
dead_host_delay = "10m"
"""


class ZeroJitter(random.Random):
    """A Random whose uniform(a, b) is the midpoint: retries exactly on the nominal schedule."""

    def random(self) -> float:
        """Always the middle of [0, 1)."""
        return 0.5


def make_config(**deliver: object) -> Config:
    """The test configuration with some ``[deliver]`` keys replaced (values in seconds)."""
    config = parse_config(CONFIG, Path("/nonexistent"))
    return replace(config, deliver=replace(config.deliver, **deliver))


class Harness:
    """A deliverer over a MemoryQueue on a task.Clock, its log captured."""

    def __init__(
        self,
        *channels: IChannel,
        rng: random.Random | None = None,
        latency: float | None = None,
        channel_limits: dict[str, int] | None = None,
        idle_timeout: float = 5.0,
        active_limit: int = 20_000,
        **deliver: object,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.queue = MemoryQueue(self.clock, latency=latency)
        self.events: list[dict[str, Any]] = []
        self.log = Logger(namespace="relay.deliver", observer=self.events.append)
        self.config = make_config(**deliver)
        self.channels = {c.name: c for c in channels}
        self.mine: set[str] = set()  # the ids of messages the test stored
        self.service = build_deliverer(
            self.config,
            QueueReady.of(self.queue),
            self.channels,
            self.clock,
            rng if rng is not None else ZeroJitter(),
            channel_limits=channel_limits,
            idle_timeout=idle_timeout,
            active_limit=active_limit,
            log=self.log,
        )

    def start(self) -> Harness:
        """Start the service and let it scan."""
        self.service.startService()
        self.clock.advance(0)
        return self

    def store(self, env: Envelope, text: bytes = TEXT) -> str:
        """Queue a message now (arrival = the clock's time) and let the deliverer see it."""
        queue_id: str = fired(self.queue.store(replace(env, arrival=self.clock.seconds()), text))
        self.mine.add(queue_id)
        self.clock.advance(0)
        return queue_id

    def put(self, env: Envelope, text: bytes = TEXT) -> str:
        """Queue a message without letting the clock run: several puts make one scan."""
        queue_id: str = fired(self.queue.store(replace(env, arrival=self.clock.seconds()), text))
        self.mine.add(queue_id)
        return queue_id

    def advance(self, seconds: float, step: float = 60.0) -> None:
        """Let ``seconds`` pass, in steps (so timers set along the way fire in order)."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def stop(self) -> None:
        """Stop the service; its Deferred must fire (the channels here never hang)."""
        done = self.service.stopService()
        self.clock.advance(0)
        fired(done)

    def dispositions(self, status: str | None = None) -> list[dict[str, Any]]:
        """The disposition events logged (with a given status, if asked)."""
        return [
            e
            for e in self.events
            if "status" in e and "attempt" in e and (status is None or e["status"] == status)
        ]

    def notices(self) -> list[tuple[str, Envelope, bytes]]:
        """The DSNs the deliverer queued: (id, envelope, text)."""
        return [
            (qid, self.queue.envelope(qid), self.queue.texts[qid])
            for qid in self.queue.stored()
            if qid not in self.mine and is_dsn(self.queue.envelope(qid))
        ]

    def violations(self) -> list[dict[str, Any]]:
        """The contract violations logged."""
        return [e for e in self.events if "violation" in e]

"""From an opened line to a call, and back: the modem, the login chat, the hang-up.

:class:`LineSetup` is the protocol put on a freshly opened line (a serial port, a TCP
connection, standard input/output).  It runs the line's :class:`LinePlan`: the modem
script if a modem is on the line (dialling out, or waiting for RING and answering), then
the login chat if the far end wants one, and hands the line to the call protocol
(:class:`relay.phone.driver.PhoneProtocol`): ``makeConnection`` on the same transport,
then the bytes that arrived after the last match, so nothing read is lost.  From then on
it only passes bytes through, watching for the modem's ``NO CARRIER`` where a modem is on
the line (a pseudo-terminal or a cable without DCD cannot say so otherwise).

When the call protocol closes the line, a modem is hung up first (DTR dropped, then
``+++``/``ATH0``, :func:`relay.sansio.modem.hangup_script`), then the line is closed;
a ``NO CARRIER`` meanwhile (the far end hung up first) closes it at once.
:attr:`LineSetup.handed_over` fires when the call has the line (or fails with
:class:`CallFailed` and the reply the deliverer acts on); :attr:`LineSetup.closed` when
the line is closed and the port free for the next call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import serial
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.oneline import escape
from relay.reply import Reply, ReplyCode
from relay.sansio.chat import (
    Chat,
    ChatFailed,
    ChatScript,
    ChatSucceeded,
    Send,
    SendBreak,
    SetDTR,
)
from relay.sansio.modem import Connected, ModemChat, ModemFailed, chat_failure_reply
from relay.transport.lock import DeviceLocked, DeviceLockError

__all__ = ["CallFailed", "LinePlan", "LineSetup", "reply_for_open_failure"]

log = Logger()
NO_CARRIER: Final = b"NO CARRIER"


class CallFailed(Exception):
    """The call did not get through; ``reply`` is what the deliverer makes of it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class LinePlan:
    """What happens on a line before the call's first byte and after its last.

    ``modem``: a :func:`~relay.sansio.modem.dial_script` or
    :func:`~relay.sansio.modem.answer_script` (None: a direct line or TCP).
    ``login``: a chat run after the modem has connected (None: no login).
    ``hang_up``: a :func:`~relay.sansio.modem.hangup_script` run before closing.
    ``watch_no_carrier``: end the call when the modem says ``NO CARRIER`` mid-call.
    """

    modem: ChatScript | None = None
    login: ChatScript | None = None
    hang_up: ChatScript | None = None
    watch_no_carrier: bool = False

    @classmethod
    def for_modem(
        cls, modem: ChatScript, login: ChatScript | None, hang_up: ChatScript
    ) -> LinePlan:
        """A modem on the line: its script, a login if any, the hang-up, NO CARRIER watched."""
        return cls(modem, login, hang_up, watch_no_carrier=True)


class _Phase(enum.Enum):
    OPENING = "opening"
    MODEM = "modem"
    LOGIN = "login"
    CALL = "call"
    HANGING_UP = "hanging-up"
    CLOSED = "closed"


def reply_for_open_failure(failure: Failure) -> Reply:
    """The reply for a line that could not be opened or connected."""
    error = failure.value
    text = escape(str(error))
    if isinstance(error, DeviceLocked):
        return Reply(ReplyCode.LOCK, text)
    if isinstance(error, DeviceLockError):
        return Reply(ReplyCode.LIO, text)
    if isinstance(error, internet_error.TimeoutError):
        return Reply(ReplyCode.TIME, text)
    if isinstance(error, internet_error.ConnectError | internet_error.ConnectionLost):
        return Reply(ReplyCode.DHST, text)
    if isinstance(error, OSError | serial.SerialException):
        return Reply(ReplyCode.LIO, text)
    return Reply(ReplyCode.NIO, text)


class _CallTransport:
    """The transport as the call protocol sees it: closing it hangs the modem up first."""

    def __init__(self, transport: Any, setup: LineSetup) -> None:
        self._transport = transport
        self._setup = setup

    def loseConnection(self) -> None:
        self._setup.hang_up()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LineSetup(Protocol):
    """Runs a :class:`LinePlan` on one opened line around one call protocol."""

    def __init__(self, plan: LinePlan, call: IProtocol, clock: IReactorTime) -> None:
        self.plan = plan
        self.call = call
        self._clock = clock
        self._phase = _Phase.OPENING
        self._engine: ModemChat | Chat | None = None
        self._timer: IDelayedCall | None = None
        self._tail = b""  # the last bytes of the call, for NO CARRIER split across reads
        self.rate: int | None = None
        self.handed_over: Deferred[LineSetup] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.failure: Reply | None = None

    @property
    def phase(self) -> str:
        """Where the line is: opening, modem, login, call, hanging-up or closed."""
        return self._phase.value

    # --- transport events ------------------------------------------------------------------

    def connectionMade(self) -> None:
        if self.plan.modem is not None:
            self._start(_Phase.MODEM, ModemChat(self.plan.modem, self._clock.seconds()), b"")
        else:
            self._after_modem(b"")

    def dataReceived(self, data: bytes) -> None:
        if self._phase is _Phase.CALL:
            self._pass_on(data)
        elif self._phase is _Phase.HANGING_UP and self._carrier_gone(data):
            self._close()  # the modem is on hook already: nothing left to hang up
        elif self._engine is not None and self._phase is not _Phase.CLOSED:
            self._engine.receive_data(data, self._clock.seconds())
            self._run()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        phase, self._phase = self._phase, _Phase.CLOSED
        if phase in (_Phase.CALL, _Phase.HANGING_UP):
            self.call.connectionLost(reason)
        elif phase is not _Phase.CLOSED:
            self._fail(Reply(ReplyCode.DHST, "line closed before the call began"))
        if not self.closed.called:
            self.closed.callback(None)

    # --- phases ----------------------------------------------------------------------------

    def _start(self, phase: _Phase, engine: ModemChat | Chat, data: bytes) -> None:
        self._phase = phase
        self._engine = engine
        if data:
            engine.receive_data(data, self._clock.seconds())
        self._run()

    def _after_modem(self, rest: bytes) -> None:
        if self.plan.login is not None:
            self._start(_Phase.LOGIN, Chat(self.plan.login, self._clock.seconds()), rest)
        else:
            self._hand_over(rest)

    def _hand_over(self, rest: bytes) -> None:
        self._phase = _Phase.CALL
        self._engine = None
        self._cancel_timer()
        log.info("line: call begins{rate}", rate=f" at {self.rate} bit/s" if self.rate else "")
        self.call.makeConnection(_CallTransport(self.transport, self))  # type: ignore[arg-type]
        self.handed_over.callback(self)
        if rest and self._phase is _Phase.CALL:
            self._pass_on(rest)

    def _pass_on(self, data: bytes) -> None:
        self.call.dataReceived(data)
        if self._phase is _Phase.CALL and self._carrier_gone(data):
            log.info("line: the modem says NO CARRIER: the call is gone")
            self._drop()

    def _carrier_gone(self, data: bytes) -> bool:
        """True if the modem's NO CARRIER is in ``data`` (or split across reads)."""
        if not self.plan.watch_no_carrier:
            return False
        window = self._tail + data
        self._tail = window[-(len(NO_CARRIER) - 1) :]
        return NO_CARRIER in window

    def hang_up(self) -> None:
        """The call is over: hang the modem up (if any), then close the line."""
        if self._phase in (_Phase.HANGING_UP, _Phase.CLOSED):
            return
        if self.plan.hang_up is None or self.transport is None:
            self._close()
            return
        self._start(_Phase.HANGING_UP, Chat(self.plan.hang_up, self._clock.seconds()), b"")

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and self._phase is not _Phase.CLOSED:
            self.transport.loseConnection()

    def _drop(self) -> None:
        """The line is gone: close without waiting for buffered bytes."""
        drop = getattr(self.transport, "drop", None)
        if drop is not None:
            drop(internet_error.ConnectionLost("NO CARRIER"))
        else:
            self._close()

    def _fail(self, reply: Reply) -> None:
        self.failure = reply
        if not self.handed_over.called:
            self.handed_over.errback(CallFailed(reply))

    # --- the engine ------------------------------------------------------------------------

    def _run(self) -> None:
        """Carry out the engine's actions; move on when it has finished."""
        engine = self._engine
        while engine is not None and engine is self._engine:
            event = engine.next_event()
            if event is None:
                self._arm_timer()
                return
            if isinstance(event, Send):
                assert self.transport is not None
                self.transport.write(event.data)
            elif isinstance(event, SendBreak):
                send_break = getattr(self.transport, "sendBreak", None)
                if send_break is not None:
                    send_break()
            elif isinstance(event, SetDTR):
                set_dtr = getattr(self.transport, "set_dtr", None)
                if set_dtr is not None:
                    set_dtr(event.on)
            else:
                self._finished(event)

    def _finished(self, event: Connected | ModemFailed | ChatSucceeded | ChatFailed) -> None:
        self._cancel_timer()
        self._engine = None
        phase = self._phase
        if phase is _Phase.HANGING_UP:
            if isinstance(event, ChatFailed):
                log.info("line: the modem did not confirm the hang-up ({why})", why=event.reason)
            self._close()
        elif isinstance(event, Connected):
            self.rate = event.rate
            self._after_modem(event.rest)
        elif isinstance(event, ChatSucceeded):
            self._hand_over(event.rest)
        else:
            reply = event.reply if isinstance(event, ModemFailed) else chat_failure_reply(event)
            log.info("line: {phase} failed: {reply}", phase=phase.value, reply=str(reply))
            self._fail(reply)
            self._close()

    def _arm_timer(self) -> None:
        self._cancel_timer()
        if self._engine is None:
            return
        deadline = self._engine.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._engine is not None:
            self._engine.tick(self._clock.seconds())
            self._run()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _OneProtocol(Factory):
    """A factory that hands out one prepared protocol (for an endpoint's ``connect``)."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def place_call(
    endpoint: Any, plan: LinePlan, call: IProtocol, clock: IReactorTime
) -> Deferred[LineSetup]:
    """Open ``endpoint`` (never blocking), run ``plan``, hand the line to ``call``.

    Fires with the :class:`LineSetup` once ``call`` has the line (watch its ``closed``
    for the port to be free again), or fails with :class:`CallFailed`, whose reply's
    action tells the caller whether to retry soon (``BUSY``, a locked port) or to mark
    the site down and back off (no answer, no carrier, a timeout)."""
    setup = LineSetup(plan, call, clock)

    def opened(_: object) -> Deferred[LineSetup]:
        return setup.handed_over

    def not_opened(failure: Failure) -> Failure:
        if failure.check(CallFailed):  # type: ignore[no-untyped-call]
            return failure
        reply = reply_for_open_failure(failure)
        log.info("line: cannot open: {reply}", reply=str(reply))
        return Failure(CallFailed(reply))  # type: ignore[no-untyped-call]

    d: Deferred[Any] = endpoint.connect(_OneProtocol(setup))
    d.addCallback(opened)
    d.addErrback(not_opened)
    return d

"""One message to one destination over an open session: MMDF's ``qu2xx_send``, with its checks.

Theory of operation
-------------------
A :class:`Transaction` makes the calls of the channel contract for one message and some
of its recipients (at most ``recipients_per_transaction``), in the channel's mode:

* address-then-text: ``begin_message``; ``add_recipient`` for each address (``AOK`` or a
  failure); ``end_recipients``; then, if any address got ``AOK``, ``begin_text``, the
  text once as chunks read from the queue (each ``write_text`` awaited: that is the
  backpressure, and no more than one chunk is ever in memory), ``end_text``, whose
  reply becomes every accepted address's reply; if none got ``AOK``, ``abort_message``.
* text-per-address: ``begin_message``; ``add_recipient`` for each address, which
  delivers and answers ``MOK`` or a failure; ``end_recipients``.

It returns a :class:`TransactionOutcome`: the final reply of every address that got one,
one reply for every address that did not (the session failed, or the channel broke the
contract), and a :class:`Verdict` on the session.  It records nothing: the caller
commits the outcome, so an address is committed only after its final reply.

**Checking the channel.**  MMDF made ``qu2xx_send`` responsible for rejecting replies a
channel may not give; so does this.  Each is a :class:`relay.errors.ContractViolation`:

* ``add_recipient`` answering a success other than ``AOK`` in address-then-text mode
  (``MOK`` above all: a list channel cannot have delivered without the text), or other
  than ``MOK`` in text-per-address mode (``AOK`` above all: there is no text phase);
* ``end_text`` answering ``AOK`` or ``MOK`` (it answers for the message, with ``OK``);
* a Deferred firing with something that is not a :class:`~relay.reply.Reply` where a
  reply is due, a call returning something that is not a Deferred, and a
  :class:`~relay.errors.SessionFailed` carrying a reply that is not a failure;
* a Deferred that *fails* (other than with SessionFailed): the channel did not turn its
  trouble into a reply.  As the contract says, that means the session is broken: every
  address without a final reply gets ``NET`` and the destination rests.

For every other violation the addresses without a final reply get a temporary ``AGN``
naming the violation (deferred, attempts counted, the destination *not* rested), and the
session is dropped.  Replies that were final and legal before the violation (a ``MOK``
in text-per-address mode, a refusal of an address) stand: the channel gave them inside
the contract, and re-sending a delivered copy would only duplicate it.

**Connection-level replies.**  A ``HOST_DEAD`` reply (``TIME``, ``NET``, ``DHST``,
``PROT``…) to an address ends the transaction: the addresses already accepted share
that reply, those never sent are listed in ``unasked`` (the caller holds them back
without counting an attempt when the destination is marked dead) and the verdict is
``DEAD``.

**Cancelling.**  :meth:`Transaction.cancel` (the deliverer is stopping) cancels the call
in progress; the outcome is ``abandoned``: the replies already final stand, the rest get
nothing recorded, and so are delivered again after a restart (a duplicate, never a loss).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail

from relay.envelope import Recipient
from relay.errors import ContractViolation, SessionFailed
from relay.interfaces import IChannelSession, IMessage, SequencingMode
from relay.oneline import REPLY_TEXT_LIMIT, one_line
from relay.reply import Action, Reply, ReplyCode

__all__ = [
    "TEXT_CHUNK",
    "Transaction",
    "TransactionOutcome",
    "Verdict",
    "broken_session_reply",
    "violation_reply",
]

TEXT_CHUNK: Final = 65536
"""Octets of text read from the queue and handed to ``write_text`` at a time."""

_FAILURES: Final = frozenset({Action.RETRY, Action.HOST_DEAD, Action.BOUNCE})


class Verdict(enum.Enum):
    """What becomes of the session after a transaction."""

    KEEP = "keep"  # it can carry the next message
    DROP = "drop"  # abort the message and end the session
    DEAD = "dead"  # drop it, and rest the destination (a connection-level failure)


@dataclass(frozen=True, slots=True)
class TransactionOutcome:
    """What a transaction established, for the caller to record.

    ``replies`` holds the final reply of each recipient index that got one; ``failure``
    is the reply of every other index (None only when every index has a reply, or the
    transaction was abandoned); ``unasked`` lists the indices never given to the channel.
    """

    replies: Mapping[int, Reply]
    failure: Reply | None
    verdict: Verdict
    unasked: tuple[int, ...] = ()
    violation: ContractViolation | None = None
    abandoned: bool = False


def violation_reply(violation: ContractViolation) -> Reply:
    """The temporary reply of addresses caught in a contract violation."""
    return Reply(ReplyCode.AGN, one_line(str(violation), REPLY_TEXT_LIMIT), enhanced="4.3.0")


def broken_session_reply(what: str, error: BaseException) -> Reply:
    """``NET``: the reply of addresses whose session failed instead of answering."""
    return Reply(
        ReplyCode.NET, one_line(f"session failed during {what}: {error!r}", REPLY_TEXT_LIMIT)
    )


class _Stop(Exception):
    """Ends a transaction early; every address without a final reply gets ``failure``."""

    def __init__(
        self, failure: Reply, verdict: Verdict, violation: ContractViolation | None = None
    ) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.verdict = verdict
        self.violation = violation


class _Abandoned(Exception):
    """The transaction was cancelled: record nothing more."""


@dataclass(slots=True)
class _Progress:
    asked: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    replies: dict[int, Reply] = field(default_factory=dict)


class Transaction:
    """The calls of the contract for one message and some of its recipients."""

    def __init__(
        self,
        channel_name: str,
        mode: SequencingMode,
        session: IChannelSession,
        message: IMessage,
        recipients: Sequence[tuple[int, Recipient]],
        *,
        text_chunk: int = TEXT_CHUNK,
    ) -> None:
        """``recipients`` pairs each recipient with its index in the envelope."""
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        self.channel_name = channel_name
        self.mode = mode
        self._session = session
        self._message = message
        self._recipients = tuple(recipients)
        self._text_chunk = text_chunk
        self._progress = _Progress()
        self._pending: Deferred[Any] | None = None
        self._cancelled = False

    def run(self) -> Deferred[TransactionOutcome]:
        """Make the calls; fire with the outcome (never fails)."""
        return ensureDeferred(self._run())

    def cancel(self) -> None:
        """Stop at the call in progress; the outcome is ``abandoned``."""
        self._cancelled = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    async def _run(self) -> TransactionOutcome:
        progress = self._progress
        try:
            await self._call(
                "begin_message",
                self._session.begin_message,
                "m",
                self._message.envelope.return_path,
                self._message,
            )
            if self.mode is SequencingMode.ADDRESS_THEN_TEXT:
                return await self._address_then_text()
            return await self._text_per_address()
        except _Stop as stop:
            return TransactionOutcome(
                dict(progress.replies),
                stop.failure,
                stop.verdict,
                self._unasked(),
                stop.violation,
            )
        except _Abandoned:
            return TransactionOutcome(dict(progress.replies), None, Verdict.DROP, abandoned=True)

    async def _address_then_text(self) -> TransactionOutcome:
        progress = self._progress
        # A session that pipelines (SMTP with PIPELINING) gets every address and the end
        # of the addresses before any reply is awaited, so that MAIL, the RCPTs and DATA
        # leave in one write (RFC 2920) instead of one round trip per call.  The replies
        # are still taken one at a time, in order, with the same checks; after a stop,
        # the addresses whose replies were never awaited count as unasked, as before.
        pipelined = bool(getattr(self._session, "pipelines_addresses", False))
        asked: list[Deferred[Any]] = []
        awaited = 0
        try:
            if pipelined:
                for index, recipient in self._recipients:
                    progress.asked.append(index)
                    asked.append(
                        self._start("add_recipient", self._session.add_recipient, recipient)
                    )
                asked.append(self._start("end_recipients", self._session.end_recipients))
            for position, (index, recipient) in enumerate(self._recipients):
                awaited = position + 1
                if pipelined:
                    answer = await self._finish("add_recipient", asked[position])
                else:
                    progress.asked.append(index)
                    answer = await self._call(
                        "add_recipient", self._session.add_recipient, recipient
                    )
                reply = self._as_reply("add_recipient", answer)
                if reply.code is ReplyCode.AOK:
                    progress.accepted.append(index)
                    continue
                if reply.code.action not in _FAILURES:
                    raise self._violation(
                        f"answered {reply.code.name} to an address in address-then-text mode "
                        "(only AOK or a failure may answer an address)"
                    )
                progress.replies[index] = reply
                if reply.code.action is Action.HOST_DEAD:
                    raise _Stop(reply, Verdict.DEAD)
            if pipelined:
                await self._finish("end_recipients", asked[-1])
            else:
                await self._call("end_recipients", self._session.end_recipients)
        except _Stop:
            if pipelined:
                del progress.asked[awaited:]
            raise
        finally:
            for d in asked:  # those not awaited after a stop: never an unhandled error
                d.addErrback(lambda _: None)
        if not progress.accepted:
            await self._call("abort_message", self._session.abort_message)
            return TransactionOutcome(dict(progress.replies), None, Verdict.KEEP)
        await self._call("begin_text", self._session.begin_text)
        unreadable = await self._send_text()
        if unreadable is not None:
            await self._call("abort_message", self._session.abort_message)
            return TransactionOutcome(dict(progress.replies), unreadable, Verdict.KEEP)
        final = await self._reply("end_text", self._session.end_text)
        if final.code in (ReplyCode.AOK, ReplyCode.MOK):
            raise self._violation(
                f"answered {final.code.name} to the end of the text "
                "(the text's reply is OK or a failure)"
            )
        for index in progress.accepted:
            progress.replies[index] = final
        verdict = Verdict.DEAD if final.code.action is Action.HOST_DEAD else Verdict.KEEP
        return TransactionOutcome(dict(progress.replies), None, verdict)

    async def _text_per_address(self) -> TransactionOutcome:
        progress = self._progress
        for index, recipient in self._recipients:
            progress.asked.append(index)
            reply = await self._reply("add_recipient", self._session.add_recipient, recipient)
            if reply.code is not ReplyCode.MOK and reply.code.action not in _FAILURES:
                raise self._violation(
                    f"answered {reply.code.name} to an address in text-per-address mode "
                    "(only MOK or a failure may answer an address)"
                )
            progress.replies[index] = reply
            if reply.code.action is Action.HOST_DEAD:
                raise _Stop(reply, Verdict.DEAD)
        await self._call("end_recipients", self._session.end_recipients)
        return TransactionOutcome(dict(progress.replies), None, Verdict.KEEP)

    async def _send_text(self) -> Reply | None:
        """Stream the text to the channel; a reply if the queue could not read it."""
        try:
            reader = self._message.open_text()
        except Exception as e:
            return _unreadable(e)
        try:
            while True:
                try:
                    chunk = await self._await(reader.read(self._text_chunk))
                except _Abandoned:
                    raise
                except Exception as e:
                    return _unreadable(e)
                if not chunk:
                    return None
                await self._call("write_text", self._session.write_text, chunk)
        finally:
            reader.close()

    async def _reply(self, what: str, call: Callable[..., object], *args: object) -> Reply:
        return self._as_reply(what, await self._call(what, call, *args))

    def _as_reply(self, what: str, answer: object) -> Reply:
        if not isinstance(answer, Reply):
            raise self._violation(f"{what} fired with {answer!r}, not a Reply")
        return answer

    async def _call(self, what: str, call: Callable[..., object], *args: object) -> object:
        """One call of the contract: a Deferred, awaited, its failure turned into a stop."""
        return await self._finish(what, self._start(what, call, *args))

    def _start(self, what: str, call: Callable[..., object], *args: object) -> Deferred[Any]:
        """Make a call of the contract; its Deferred (a non-Deferred is a violation)."""
        if self._cancelled:
            raise _Abandoned()
        try:
            result = call(*args)
        except Exception as e:
            result = fail(e)
        if not isinstance(result, Deferred):
            raise self._violation(f"{what} returned {type(result).__name__}, not a Deferred")
        return result

    async def _finish(self, what: str, result: Deferred[Any]) -> object:
        """Await a call's Deferred; its failure becomes a stop."""
        try:
            return await self._await(result)
        except _Abandoned:
            raise
        except SessionFailed as e:
            if not isinstance(e.reply, Reply) or e.reply.code.action not in _FAILURES:
                raise self._violation(f"{what} failed with SessionFailed({e.reply!r})") from e
            dead = e.reply.code.action is Action.HOST_DEAD
            raise _Stop(e.reply, Verdict.DEAD if dead else Verdict.DROP) from e
        except Exception as e:
            raise self._broken(what, e) from e

    async def _await(self, deferred: Deferred[Any]) -> Any:
        self._pending = deferred
        try:
            return await deferred
        except CancelledError:
            if self._cancelled:
                raise _Abandoned() from None
            raise
        finally:
            if self._pending is deferred:
                self._pending = None

    def _violation(self, problem: str) -> _Stop:
        violation = ContractViolation(self.channel_name, problem)
        return _Stop(violation_reply(violation), Verdict.DROP, violation)

    def _broken(self, what: str, error: BaseException) -> _Stop:
        violation = ContractViolation(
            self.channel_name, f"{what} failed instead of answering with a reply: {error!r}"
        )
        return _Stop(broken_session_reply(what, error), Verdict.DEAD, violation)

    def _unasked(self) -> tuple[int, ...]:
        asked = set(self._progress.asked)
        return tuple(index for index, _ in self._recipients if index not in asked)


def _unreadable(error: BaseException) -> Reply:
    return Reply(ReplyCode.FIO, one_line(f"cannot read the queued text: {error}", REPLY_TEXT_LIMIT))

"""One SMTP channel session: the MMDF write-mail calls, in address-then-text mode, over SMTP.

How the calls map onto the SMTP dialogue:

=======================  ==============================================================
call                     SMTP
=======================  ==============================================================
``begin_message``        refuse early what this server cannot take (below); else MAIL
                         FROM (after RSET if the last transaction was abandoned)
``add_recipient``        RCPT TO; the reply becomes AOK or the failure, with the
                         server's own code, enhanced status and text; a refused MAIL
                         FROM is every recipient's reply
``end_recipients``       with PIPELINING, DATA goes out now, behind the RCPTs
``begin_text``           DATA (if not already sent); wait for the 354
``write_text``           the chunk, dot-stuffed by the engine, straight to the socket;
                         the Deferred waits while the socket's buffer is full
``end_text``             ``CRLF.CRLF``; the reply is the final reply for every AOK
``abort_message``        RSET; during the text, drop the connection (nothing else
                         stops a DATA without delivering it)
``end_session``          keep the connection for the next session to this destination
                         (the channel's cache), or QUIT
=======================  ==============================================================

With PIPELINING, each call writes at once and replies are matched in order, so a
deliverer that issues ``add_recipient`` for every address (and ``end_recipients``)
before waiting for the replies gets MAIL, every RCPT and DATA in one write (RFC 2920).

**Refused before MAIL** (every address gets the reply; nothing is sent):

* the message is larger than the server's SIZE limit: ``FSIZ`` (552 5.3.4);
* it needs SMTPUTF8 and the server does not offer it: permanent, 5.6.7 (RFC 6531 §3.2).
  *Needs* is decided by what the transaction holds, not by the client's declaration
  (:mod:`.smtputf8`): a non-ASCII local part in the return path or in a recipient that
  goes to this destination, or non-ASCII headers in mail declared SMTPUTF8.  A message
  that does not need it goes without the SMTPUTF8 parameter, to any server.  If its
  header section cannot be read, every address gets ``FIO`` (temporary);
* it is 8-bit (BODY=8BITMIME) and the server does not offer 8BITMIME: permanent, 5.6.3
  "conversion required but not supported".  RFC 6152 §3 forbids sending 8-bit data to
  such a server, and we do not convert to quoted-printable (Postfix's default is to send
  anyway; we take the RFC's side, as the brief asks).  BINARYMIME needs BDAT, which we
  do not speak: also 5.6.3.

**A connection that goes bad** (421, dropped, timeout, garbage) never fails a Deferred:
every address not yet final gets the connection's reply (``NET``, ``DHST``, ``TIME``,
``BHST``: all temporary, the host marked dead), and the next ``begin_message`` opens a
new connection (if that fails, every address of that message gets why).  The same
happens when the connection reached its message cap (:attr:`SmtpChannel.max_messages`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import Address
from relay.channels.smtp.protocol import SmtpClientError, SmtpClientProtocol
from relay.channels.smtp.smtputf8 import addresses_need_smtputf8, headers_need_smtputf8
from relay.envelope import BodyType, Destination, Envelope, Recipient
from relay.errors import SessionFailed
from relay.interfaces import IChannelSession, IMessage
from relay.oneline import one_line
from relay.reply import Reply, ReplyCode, from_smtp
from relay.sansio.smtp.client import Data, MailFrom, RcptTo, Rset
from relay.sansio.smtp.wire import SmtpReply

if TYPE_CHECKING:
    from relay.channels.smtp.channel import SmtpChannel

__all__ = ["SmtpSession"]

T = TypeVar("T")


class _Shared(Generic[T]):
    """One Deferred's result for any number of waiters (a Deferred is awaited only once)."""

    def __init__(self, d: Deferred[T]) -> None:
        self._done = False
        self._result: T | Failure | None = None
        self._waiters: list[Deferred[T]] = []
        d.addBoth(self._fire)

    def _fire(self, result: T | Failure) -> None:
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._deliver(w)

    def _deliver(self, waiter: Deferred[T]) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)  # type: ignore[arg-type]

    def get(self) -> Deferred[T]:
        """A new Deferred with the result."""
        waiter: Deferred[T] = Deferred()
        if self._done:
            self._deliver(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class _Transaction:
    """What one message has reached on the connection."""

    def __init__(self) -> None:
        self.refused: Reply | None = None  # every address gets this; nothing was sent
        self.mail: _Shared[SmtpReply] | None = None
        self.smtputf8 = False
        self.rcpts_waiting = 0
        self.accepted = 0
        self.data: _Shared[SmtpReply] | None = None
        self.in_text = False
        self.final: Reply | None = None  # the final reply, known before the end of text


@implementer(IChannelSession)
class SmtpSession:
    """A session of the SMTP channel to one destination.  See the module docstring."""

    pipelines_addresses = True  # the deliverer may ask every address before any reply

    def __init__(
        self, channel: SmtpChannel, destination: Destination, conn: SmtpClientProtocol
    ) -> None:
        self._channel = channel
        self._destination = destination
        self._conn: SmtpClientProtocol | None = conn
        self._tx: _Transaction | None = None
        self._needs_rset = False
        self._ended = False

    @property
    def connection(self) -> SmtpClientProtocol | None:
        """The connection in use (None after it failed and before the next message)."""
        return self._conn

    # --- xx_winit ---------------------------------------------------------------------

    def begin_message(
        self, mode: str, return_path: Address | None, message: IMessage
    ) -> Deferred[None]:
        """``xx_winit``: check the message against the server, then MAIL FROM."""
        return defer.ensureDeferred(self._begin(return_path, message))

    async def _begin(self, return_path: Address | None, message: IMessage) -> None:
        if self._tx is not None:
            await self._abort(self._tx)
        tx = self._tx = _Transaction()
        conn = await self._usable_connection(tx)
        if conn is None:
            return
        envelope: Envelope = message.envelope
        needs_utf8 = await self._needs_smtputf8(tx, envelope, return_path, message)
        if tx.refused is not None:
            return
        tx.refused = _refusal(conn, envelope, int(message.size), needs_utf8)
        if tx.refused is not None:
            return
        if self._needs_rset:
            self._needs_rset = False
            conn.command(Rset()).addErrback(lambda _: None)  # its failure shows in MAIL's
        tx.smtputf8 = needs_utf8
        mail = MailFrom(
            return_path,
            size=int(message.size) if conn.engine.offers("SIZE") else None,
            body=BodyType.EIGHT_BIT_MIME
            if envelope.body_type is BodyType.EIGHT_BIT_MIME
            else BodyType.SEVEN_BIT,
            smtputf8=needs_utf8,
            env_id=envelope.env_id if conn.engine.offers("DSN") else None,
        )
        tx.mail = _Shared(conn.command(mail))

    async def _needs_smtputf8(
        self,
        tx: _Transaction,
        envelope: Envelope,
        return_path: Address | None,
        message: IMessage,
    ) -> bool:
        """Whether this transaction needs SMTPUTF8 (see :mod:`.smtputf8`).

        If the headers cannot be read, ``tx`` is refused with ``FIO``: the text will not
        be readable for DATA either, and the spool's error is the reason to report.
        """

        def here(recipient: Recipient) -> bool:
            return self._channel.travels_to(recipient, self._destination)

        if addresses_need_smtputf8(return_path, envelope.recipients, here):
            return True
        if not envelope.smtputf8:
            return False
        try:
            return await headers_need_smtputf8(message)
        except Exception as e:
            tx.refused = Reply(ReplyCode.FIO, one_line(f"cannot read the queued text: {e}"))
            return False

    async def _usable_connection(self, tx: _Transaction) -> SmtpClientProtocol | None:
        """The connection, or a new one if it went bad or reached the message cap."""
        conn = self._conn
        if conn is not None and conn.ready and conn.messages < self._channel.max_messages:
            return conn
        if conn is not None:
            conn.quit()
        self._conn = None
        self._needs_rset = False
        try:
            self._conn = await self._channel.connect(self._destination)
        except SessionFailed as e:
            tx.refused = e.reply
            return None
        return self._conn

    # --- xx_wadr ----------------------------------------------------------------------

    def add_recipient(self, recipient: Recipient) -> Deferred[Reply]:
        """``xx_wadr``: RCPT TO; AOK or the failure, in the server's words."""
        return defer.ensureDeferred(self._add(recipient))

    async def _add(self, recipient: Recipient) -> Reply:
        tx = self._current()
        if tx.refused is not None:
            return tx.refused
        conn, mail = self._conn, tx.mail
        assert conn is not None and mail is not None
        if recipient.address.needs_smtputf8 and not tx.smtputf8:
            if not conn.engine.offers("SMTPUTF8"):
                return _utf8_refusal(conn, f"recipient {recipient.address}")
            # MAIL FROM went without SMTPUTF8 because, by the envelope and the routes,
            # this recipient does not go here (a route changed, or a defect).  Not the
            # recipient's fault, so not a bounce: it waits, and is tried again.
            return Reply(
                ReplyCode.AGN,
                f"recipient {recipient.address} needs SMTPUTF8, "
                "which this transaction's MAIL FROM did not declare",
            )
        event = RcptTo(recipient.address, recipient.original)
        tx.rcpts_waiting += 1
        try:
            pipelined = conn.command(event) if conn.engine.offers("PIPELINING") else None
            return await self._rcpt_reply(tx, conn, mail, event, pipelined)
        finally:
            tx.rcpts_waiting -= 1

    async def _rcpt_reply(
        self,
        tx: _Transaction,
        conn: SmtpClientProtocol,
        mail: _Shared[SmtpReply],
        event: RcptTo,
        pipelined: Deferred[SmtpReply] | None,
    ) -> Reply:
        try:
            mail_reply = await mail.get()
        except SmtpClientError as e:
            _ignore(pipelined)
            return e.reply()
        if mail_reply.code // 100 != 2:
            _ignore(pipelined)
            return _mapped(mail_reply)
        try:
            reply = await (pipelined if pipelined is not None else conn.command(event))
        except SmtpClientError as e:
            return e.reply()
        if reply.code // 100 == 2:
            tx.accepted += 1
            return Reply(ReplyCode.AOK, reply.text, reply.code, reply.enhanced)
        return _mapped(reply)

    def end_recipients(self) -> Deferred[None]:
        """``xx_waend``: with PIPELINING, DATA goes out now, behind the RCPTs."""
        tx = self._current()
        conn = self._conn
        if (
            tx.refused is None
            and conn is not None
            and conn.usable
            and tx.data is None
            and conn.engine.offers("PIPELINING")
            and (tx.rcpts_waiting or tx.accepted)
        ):
            tx.data = _Shared(conn.command(Data()))
        return defer.succeed(None)

    # --- xx_wtinit, xx_wtxt, xx_wtend ---------------------------------------------------

    def begin_text(self) -> Deferred[None]:
        """``xx_wtinit``: DATA (if not sent yet), and wait for the 354."""
        return defer.ensureDeferred(self._begin_text())

    async def _begin_text(self) -> None:
        tx = self._current()
        if tx.refused is not None:
            tx.final = tx.refused
            return
        conn = self._conn
        assert conn is not None
        if tx.data is None:
            tx.data = _Shared(conn.command(Data()))
        try:
            reply = await tx.data.get()
        except SmtpClientError as e:
            tx.final = e.reply()
            return
        if reply.code == 354:
            tx.in_text = True
            conn.begin_text()
        else:
            tx.final = _mapped(reply)

    def write_text(self, chunk: bytes) -> Deferred[None]:
        """``xx_wtxt``: the chunk goes to the socket; wait while its buffer is full."""
        tx = self._current()
        conn = self._conn
        if not tx.in_text or tx.final is not None or conn is None or not chunk:
            return defer.succeed(None)
        d = conn.write_text(chunk)
        d.addErrback(self._text_failed, tx)
        return d

    def _text_failed(self, failure: Failure, tx: _Transaction) -> Failure | None:
        if not isinstance(failure.value, SmtpClientError):
            return failure
        if tx.final is None:
            tx.final = failure.value.reply()
        return None

    def end_text(self) -> Deferred[Reply]:
        """``xx_wtend``: the end of the text; the final reply for every AOK address."""
        return defer.ensureDeferred(self._end_text())

    async def _end_text(self) -> Reply:
        tx = self._current()
        self._tx = None
        if tx.final is not None:
            if tx.in_text and self._conn is not None:
                self._conn.abort()  # the text was cut short: never let it be delivered
            else:
                self._needs_rset = True  # DATA was refused: clear the server's transaction
            return tx.final
        conn = self._conn
        assert conn is not None
        if not tx.in_text:
            return Reply(ReplyCode.PROT, "end of text before the text began")
        try:
            reply = await conn.end_text()
        except SmtpClientError as e:
            return e.reply()
        conn.messages += 1
        if reply.code // 100 == 2:
            return Reply(ReplyCode.OK, reply.text, reply.code, reply.enhanced)
        return _mapped(reply)

    # --- xx_wkill, xx_end ---------------------------------------------------------------

    def abort_message(self) -> Deferred[None]:
        """``xx_wkill``: RSET; during the text, drop the connection instead."""
        tx, self._tx = self._tx, None
        if tx is None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._abort(tx))

    async def _abort(self, tx: _Transaction) -> None:
        self._tx = None
        conn = self._conn
        if conn is None or not conn.usable or tx.mail is None:
            return
        if tx.in_text:
            conn.abort()
            return
        if tx.data is not None:
            try:
                reply = await tx.data.get()
            except SmtpClientError:
                return
            if reply.code == 354:  # the server wants the text: only closing stops it
                conn.abort()
                return
        try:
            await conn.command(Rset())
        except SmtpClientError:
            return

    def end_session(self) -> Deferred[None]:
        """``xx_end``: keep the connection for the next session, or QUIT."""
        return defer.ensureDeferred(self._end())

    async def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._tx is not None:
            await self._abort(self._tx)
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.ready and conn.messages < self._channel.max_messages:
            self._channel.park(self._destination, conn)
            return
        await conn.quit()

    def _current(self) -> _Transaction:
        if self._tx is None:
            raise RuntimeError("no message begun on this SMTP session")
        return self._tx


def _refusal(
    conn: SmtpClientProtocol, envelope: Envelope, size: int, needs_utf8: bool
) -> Reply | None:
    """Why this server cannot take this message at all, or None."""
    limit = conn.engine.size_limit
    if limit is not None and size > limit:
        return Reply(
            ReplyCode.FSIZ,
            f"message size {size} exceeds size limit {limit} of server {conn.peer}",
            smtp_code=552,
            enhanced="5.3.4",
        )
    if needs_utf8 and not conn.engine.offers("SMTPUTF8"):
        return _utf8_refusal(conn, "message")
    if envelope.body_type is BodyType.EIGHT_BIT_MIME and not conn.engine.offers("8BITMIME"):
        return Reply(
            ReplyCode.NDEL,
            f"8-bit message, and server {conn.peer} does not offer 8BITMIME: "
            "conversion required but not supported",
            smtp_code=554,
            enhanced="5.6.3",
        )
    if envelope.body_type is BodyType.BINARY_MIME:
        return Reply(
            ReplyCode.NDEL,
            "binary MIME message cannot be sent with DATA: conversion required but not supported",
            smtp_code=554,
            enhanced="5.6.3",
        )
    return None


def _utf8_refusal(conn: SmtpClientProtocol, what: str) -> Reply:
    return Reply(
        ReplyCode.NDEL,
        f"{what} needs SMTPUTF8, and server {conn.peer} does not offer it",
        smtp_code=553,
        enhanced="5.6.7",
    )


def _mapped(reply: SmtpReply) -> Reply:
    """A server's failure reply as the MMDF value the deliverer acts on, its words kept."""
    return from_smtp(reply.code, reply.text, reply.enhanced)


def _ignore(d: Deferred[SmtpReply] | None) -> None:
    """Consume a reply we no longer need (a pipelined RCPT after a refused MAIL)."""
    if d is not None:
        d.addErrback(lambda _: None)

"""The spool's end of a gateway worker's link: store what the worker accepted, answer.

One :class:`StoreServer` per worker process, on a UNIX socket pair made when the worker
is started (:mod:`relay.gateway.workers`).  It greets the worker with the ``HELLO`` the
worker builds its gateway from, then answers each ``STORE`` with ``STORED`` once the
message is fsynced (the worker may now say 250) or with ``FAILED`` (the worker says 451,
or 452 for a full disk).  The "stored" log line is written here, where the queue id is
known, exactly as the in-process gateway writes it.

**Early answers.**  This process's reactor is also the deliverer's, and under load a
frame waits there behind the deliverer's work, twice per message (the request, then the
spool's answer coming back from its writer thread), while the worker's client waits for
its 250.  So the spool calls an ``on_durable`` hook in its writer thread right after
the fsync; the hook notes the STORED, and the finisher it returns, which the spool calls
once all of that sync's hooks have run, sends them together in one datagram on a second
socket (whole or not at all, never blocking: :meth:`StoreServer._send_early`).  If that
send fails (the worker's queue is full, it is gone), the reactor sends those STOREDs on
the link as before.  Refusals always go on the link.

**Failed AUTH.**  This process holds the relay's one
:class:`~relay.gateway.limits.AuthThrottle`; the worker asks it before each password
check (``AUTH``, answered at once with a ``VERDICT``) and tells it the outcome
(``ENDED``).  The attempts allowed on this link and not ended yet are kept per client:
if the link drops first they are counted as failed, since a password may have been
checked (:mod:`relay.handoff.remote_auth`).

A malformed frame is a bug in one of the two processes, not hostile input (the socket
is private): it is logged, counted in :attr:`StoreServer.rejected`, and the link is
dropped, which ends the worker (its clients get no 250 for anything not yet stored, so
they send it again); the workers service starts a new one.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections import Counter
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from relay.handoff.codec import (
    MAX_ACK_DATAGRAM,
    AuthAnswer,
    AuthBegin,
    AuthEnd,
    HandoffError,
    Hello,
    Ready,
    Sessions,
    Stored,
    StoreFailed,
    StoreRequest,
    decode,
    encode,
    framed,
)
from relay.interfaces import AuthVerdict, IAuthThrottle, IHandoffStore
from relay.queue.intake import disk_full, log_stored
from relay.queue.payload import PayloadError, decode_envelope
from relay.runtime.fastwrite import write_now

__all__ = ["StoreServer", "frame_limit"]

_log = Logger()


def frame_limit(max_message_size: int) -> int:
    """The largest STORE frame to take: the biggest message, its header and envelope."""
    return max_message_size + 4 * 1024 * 1024


class StoreServer(Int32StringReceiver):
    """Stores the messages one worker hands over, and answers it."""

    def sendString(self, string: bytes) -> None:
        """Send one frame, straight to the socket when nothing is queued (fastwrite)."""
        write_now(self.transport, framed(string))

    def __init__(
        self,
        hello: Hello,
        queue: IHandoffStore | None,
        max_length: int,
        acks: socket.socket | None = None,
        *,
        auth: IAuthThrottle,
        on_ready_change: Callable[[], object] | None = None,
    ) -> None:
        """``acks`` is this end of the worker's datagram socket for early answers;
        ``auth`` the relay's failed-AUTH count as this process's sessions ask it (a
        :class:`~relay.gateway.limits.LocalAuthThrottle`, whose verdicts come at once);
        ``on_ready_change()`` hears that the worker said it is (no longer) READY."""
        self.hello = hello
        self.auth = auth
        self.auth_in_progress: Counter[str] = Counter()  # allowed here, not ended yet
        self.queue = queue  # None until the spool is open: stores are then refused
        self.MAX_LENGTH = max_length
        self.stored = 0
        self.rejected = 0
        self.early = 0  # answers the spool's writer thread sent itself
        self.ready = False  # the worker says it takes new connections
        self.sessions = Sessions(0, {})  # its last report of SMTP sessions (metrics)
        self.on_ready_change = on_ready_change
        self.lost = False
        self._acks = acks
        self._acks_lock = threading.Lock()  # the writer thread sends, the reactor closes
        self._acked: set[int] = set()
        self._early_due: list[bytes] = []  # writer thread: this sync's answers, framed
        self._early_requests: list[int] = []  # ... and their requests

    def connectionMade(self) -> None:
        """Tell the worker what to build."""
        self.sendString(encode(self.hello))

    def stringReceived(self, string: bytes) -> None:
        """A frame from the worker: a message to store (anything else ends the link)."""
        try:
            frame = decode(string)
            if isinstance(frame, Ready):
                self.ready = frame.accepting
                if self.on_ready_change is not None:
                    self.on_ready_change()
                return
            if isinstance(frame, Sessions):
                self.sessions = frame
                return
            if isinstance(frame, AuthBegin | AuthEnd):
                self._auth(frame)
                return
            if not isinstance(frame, StoreRequest):
                raise HandoffError(f"a worker does not send {type(frame).__name__}")
            envelope = decode_envelope(frame.envelope_json)
        except (HandoffError, PayloadError) as e:
            self._reject(str(e))
            return
        queue = self.queue
        if queue is None:
            self._answer(StoreFailed(frame.request, False, "the spool is not open yet"))
            return
        text = frame.text
        request = frame.request
        early = None if self._acks is None else functools.partial(self._ack_early, request)
        d: Deferred[str] = queue.store(
            envelope, text, on_durable=early, envelope_json=frame.envelope_json
        )

        def stored(queue_id: str) -> None:
            self.stored += 1
            log_stored(queue_id, envelope, len(text))
            if request in self._acked:
                self._acked.discard(request)
                self.early += 1
            else:
                self._answer(Stored(request, queue_id))

        def failed(failure: Failure) -> None:
            if request in self._acked:
                # Synced and answered early, then the writer failed the batch after all
                # (a defect): the message is on disk and recovery will find it; telling
                # the worker "failed" now would contradict the 250 it already gave.
                self._acked.discard(request)
                _log.failure(
                    "smtp worker {index}: a store already answered failed afterwards",
                    failure,
                    index=self.hello.index,
                )
                return
            _log.failure(
                "smtp worker {index}: cannot store message from {client}",
                failure,
                index=self.hello.index,
                client=envelope.submitter.client_address,
            )
            full = disk_full(failure.value)
            self._answer(StoreFailed(frame.request, full, failure.getErrorMessage()))

        d.addCallbacks(stored, failed)

    def _auth(self, frame: AuthBegin | AuthEnd) -> None:
        """Answer whether a client may have a password checked; count what is done."""
        client = frame.client
        if isinstance(frame, AuthEnd):
            if not self.auth_in_progress[client]:  # (reading a Counter adds no key)
                raise HandoffError("ENDED for an AUTH attempt that was not allowed")
            self.auth_in_progress[client] -= 1
            if not self.auth_in_progress[client]:
                del self.auth_in_progress[client]
            self.auth.end(client, frame.failed)
            return

        def answer(verdict: AuthVerdict) -> None:
            if verdict.allowed:
                self.auth_in_progress[client] += 1
            self._answer(AuthAnswer(frame.request, verdict))

        self.auth.begin(client).addCallback(answer)

    def close_acks(self) -> None:
        """The worker is gone: no more early answers (the writer thread may still try)."""
        self.lost = True
        with self._acks_lock:
            acks, self._acks = self._acks, None
            if acks is not None:
                acks.close()

    def _ack_early(self, request: int, queue_id: str) -> Callable[[], None]:
        """In the spool's writer thread, right after the fsync: an answer to send now.

        Noted here; :meth:`_send_early`, the finisher the spool calls once all of the
        sync's hooks have run, sends them together.
        """
        with self._acks_lock:
            self._early_due.append(framed(encode(Stored(request, queue_id))))
            self._early_requests.append(request)
        return self._send_early

    def _send_early(self) -> None:
        """In the writer thread: this sync's answers, in as few datagrams as fit.

        A datagram goes whole or not at all, never blocking; the answers of one that
        cannot go (the worker's queue is full, it is gone) are left to the reactor, which
        sends them on the link as usual.
        """
        with self._acks_lock:
            due, self._early_due = self._early_due, []
            requests, self._early_requests = self._early_requests, []
            acks = self._acks
            if acks is None:
                return
            start = 0
            while start < len(due):
                end, size = start, 0
                while end < len(due) and (end == start or size + len(due[end]) <= MAX_ACK_DATAGRAM):
                    size += len(due[end])
                    end += 1
                try:
                    acks.send(b"".join(due[start:end]))
                except OSError:
                    return
                self._acked.update(requests[start:end])
                start = end

    def lengthLimitExceeded(self, length: int) -> None:
        """A frame longer than any message may be: the worker is broken."""
        self._reject(f"a frame of {length} bytes (limit {self.MAX_LENGTH})")

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The worker is gone; answers still due are dropped (its clients retry), and
        its AUTH attempts in progress count as failed (their passwords may be checked)."""
        self.lost = True
        self.ready = False
        in_progress, self.auth_in_progress = self.auth_in_progress, Counter()
        for client, count in in_progress.items():
            _log.info(
                "smtp worker {index}: link lost with {count} AUTH check(s) of {client} "
                "in progress; counted as failed",
                index=self.hello.index,
                count=count,
                client=client,
            )
            for _ in range(count):
                self.auth.end(client, True)
        if self.on_ready_change is not None:
            self.on_ready_change()

    def _answer(self, frame: Stored | StoreFailed | AuthAnswer) -> None:
        if not self.lost:
            self.sendString(encode(frame))

    def _reject(self, why: str) -> None:
        self.rejected += 1
        _log.error(
            "smtp worker {index}: malformed frame ({why}); dropping the link",
            index=self.hello.index,
            why=why,
        )
        if self.transport is not None:
            self.transport.loseConnection()

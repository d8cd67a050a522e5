"""The phone session engine: handshake, mail both ways, resume, hang-up, accounting.

Theory of operation
-------------------
One :class:`PhoneSession` is one call, at either end.  It sits on a record link
(:class:`RecordLink`, the API of :class:`relay.sansio.phone.link.Link`) and, like the
link, does no I/O: the driver feeds it the line's bytes (:meth:`receive_data`, ``b""``
for a dropped line), writes what :meth:`data_to_send` returns, calls :meth:`tick` at
:meth:`next_deadline`, and reads :meth:`next_event` after each of those.

**Handshake** (:class:`SessionState` ``GREETING`` then ``PROVING``).  Each end sends its
:class:`~relay.sansio.phone.records.Hello` at once (version, name, a nonce the driver
drew, capabilities); on the peer's hello it knows everything
(:mod:`relay.sansio.phone.handshake`) and sends its proof; on the peer's proof it is
``RUNNING``.  Full duplex, so authentication costs about one round trip.  Per-site
settings (``site_options``): the caller's are in its hello; the answerer's, known only
once the caller's hello names it, travel in its proof and count from there at both ends
(no extra round trip).  What leaks
before the peer is proven: our name, version, link limits and options, never a mail id,
size or count (the driver does not even load the outgoing mail before
:class:`Authenticated`); with encryption on, everything after the proofs is sealed
(:mod:`~relay.sansio.phone.seal`).  An unknown site gets a decoy proof (so a caller
cannot tell an unknown name from a wrong secret); a failed proof, an unknown site or
silence leads to ``REFUSING``: the event :class:`CallFailing` for the log, nothing more
sent, and after
``SessionOptions.failure_delay`` the call ends (the driver drops the line).  A different
major version: an :class:`~relay.sansio.phone.records.Abort` naming both versions, and a
clean hang-up (``CLOSING``).

**Mail** (``RUNNING``).  The driver offers what it holds for the peer
(:meth:`offer`, then :meth:`close_offers`); once the peer is proven the session sends
the :class:`~relay.sansio.phone.records.Inventory` and then the proposals, up to
:data:`MAX_OUTSTANDING` messages without a final reply, so answers come back while text
flows (proposals and the inventory travel deflated, :mod:`~relay.sansio.phone.compress`).
The receiver's driver decides each proposal (:class:`ProposalReceived`: :meth:`accept`
naming the offset it holds durably, or :meth:`refuse`), stores each piece
(:class:`TextReceived`), and commits (:class:`CommitRequested` → :meth:`commit_done`):
only then does the final reply go back.  No text of a message flows before its answer
named the offset.  Text is sent in chunks of ``chunk_size``, always from the accepted
message with the least left to send, and handed to the link only as it can send it
(:meth:`PhoneSession._with_text`), so a small message waits behind a large one for at
most the large one's bytes in flight (about one window), and an answer or a final reply
never waits behind queued text.  Each side's job tables are
:mod:`relay.sansio.phone.jobs`.

**Hang-up.**  A side sends :class:`~relay.sansio.phone.records.Done` when it will
propose nothing more and has sent all the text it will send (not waiting for the final
replies, so the hang-up costs no round trip of its own).  With both ``Done``\\ s
exchanged, every message we sent settled and every final reply of ours sent, the
session is ``CLOSING``:
it ends (:class:`CallEnded`, outcome ``COMPLETED``) once the link has everything
acknowledged, or after ``closing_grace`` (all mail is settled by then; only the last
acknowledgement may be lost), or when the line drops.

**Failures.**  A record that breaks the protocol (:class:`PhoneProtocolError` from the
codec, the seal, the inflater or a job table) never raises out of the engine: after the
handshake it is answered with an ``Abort`` and a clean hang-up; before, by ``REFUSING``.
A dropped line ends the call at once (``LINE_DROPPED``); what was not committed stays
with its sender for the next call, and what was partly stored is resumed.

**A final reply lost with the line.**  The receiver committed, the line dropped before
the final reply arrived, and the sender proposes the message again in the next call.
The store answers from what it remembered durably with the id: :func:`held_acceptance`
gives each recipient of the re-proposal its first answer (``ALREADY_HAVE`` for those
accepted, the refusal for those refused), sent as a per-recipient answer with no
recipient to receive text, so the sender settles every address exactly as the lost final
reply would have had it: a refused recipient still bounces.  No new record is needed;
``ALREADY_HAVE`` as a whole answer remains right when every recipient was accepted.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

from relay.envelope import Envelope, Submitter
from relay.reply import Reply, ReplyCode
from relay.sansio.phone import defaults, handshake, records
from relay.sansio.phone.accounting import CallOutcome, CallSummary
from relay.sansio.phone.compress import (
    ChunkCompressor,
    ChunkDecompressor,
    RecordDeflater,
    RecordInflater,
)
from relay.sansio.phone.errors import LocalPhoneError, PhoneProtocolError
from relay.sansio.phone.jobs import (
    IN_TRANSITIONS,
    OUT_TRANSITIONS,
    InInput,
    InState,
    OutInput,
    OutState,
)
from relay.sansio.phone.link import ACK_DELAY, LinkEvent, LinkParams, LinkStats, RecordReceived
from relay.sansio.phone.records import (
    Abandon,
    Abort,
    Answer,
    Capabilities,
    Done,
    FinalReply,
    Hello,
    Inventory,
    InventoryItem,
    MailEnvelope,
    Proof,
    Propose,
    Record,
    Role,
    Text,
)
from relay.sansio.phone.seal import Opener, Sealer

__all__ = [
    "ALREADY_HAVE",
    "NOT_HELD_FOR",
    "Acceptance",
    "Authenticated",
    "CallEnded",
    "CallFailing",
    "CommitRequested",
    "InventoryReceived",
    "MessageSettled",
    "Outgoing",
    "PhoneSession",
    "ProposalReceived",
    "RecordLink",
    "SessionEvent",
    "SessionOptions",
    "SessionState",
    "TextReceived",
    "TextWanted",
    "held_acceptance",
]

ALREADY_HAVE: Final = Reply(ReplyCode.DONE, "already have it")
NOT_HELD_FOR: Final = Reply(ReplyCode.AGN, "held already, but not for this recipient")
"""A re-proposal's recipient that the first answer did not name."""
LINGER: Final = ACK_DELAY + 0.01
"""Seconds a hanging-up end stays after its last record was acknowledged, so that its
acknowledgement of the peer's last record goes out before the line drops."""
MAX_OUTSTANDING: Final = 64
"""The most messages we have proposed that have no final reply yet."""
READERS: Final = 4
"""How many accepted messages have text read ahead at once."""
_STORING: Final = frozenset((InState.RECEIVING, InState.COMMITTING))
_TEXT_TO_SEND: Final = frozenset((OutState.QUEUED, OutState.PROPOSED, OutState.SENDING))
_TEXT_EXPECTED: Final = frozenset((InState.DECIDING, InState.RECEIVING))
_FINAL_SENT: Final = frozenset((InState.SETTLED, InState.DRAINING))


class RecordLink(Protocol):
    """What the session needs of :class:`relay.sansio.phone.link.Link`."""

    def receive_data(self, data: bytes, now: float) -> None: ...
    def send_record(self, record: bytes) -> None: ...
    def reconfigure(self, params: LinkParams) -> None: ...
    def data_to_send(self, now: float, max_bytes: int | None = None) -> bytes: ...
    def next_event(self) -> LinkEvent | None: ...
    def next_deadline(self) -> float | None: ...
    def tick(self, now: float) -> None: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def unsent_bytes(self) -> int: ...
    @property
    def idle(self) -> bool: ...
    def stats(self) -> LinkStats: ...


class SessionState(enum.Enum):
    """Where the call stands."""

    GREETING = "greeting"  # our hello sent, the peer's awaited
    PROVING = "proving"  # our proof sent, the peer's awaited
    RUNNING = "running"  # authenticated: mail both ways
    CLOSING = "closing"  # hang-up agreed (or abort sent): waiting for the last acks
    REFUSING = "refusing"  # handshake failed: silent until the delay is over
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """This end's settings for one call (the capabilities it offers, its timers)."""

    max_message_size: int = defaults.MAX_MESSAGE_SIZE
    compression: bool = defaults.COMPRESSION
    encryption: bool = defaults.ENCRYPTION
    resume: bool = True
    chunk_size: int = 2048
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    failure_delay: float = 5.0
    closing_grace: float = 10.0
    read_ahead: int = 16384
    line_rate: int | None = None  # bits per second, for the efficiency in the summary

    def __post_init__(self) -> None:
        if not 64 <= self.chunk_size <= 65536:
            raise ValueError("chunk_size must be between 64 and 65536")
        if self.max_message_size < 0 or self.read_ahead < self.chunk_size:
            raise ValueError("bad message size limit or read-ahead")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the driver offers: its id, envelope, text size and SHA-256."""

    message_id: str
    envelope: Envelope
    size: int
    digest: bytes

    def __post_init__(self) -> None:
        if not records.valid_message_id(self.message_id):
            raise ValueError(f"bad message id {self.message_id!r}")
        if len(self.digest) != records.DIGEST_SIZE or self.size < 0:
            raise ValueError("a digest is SHA-256 and a size is not negative")


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The receiving store's answer to a proposal (see :meth:`PhoneSession.answer_proposal`).

    ``whole`` set: no text wanted (refused, deferred, or held already: ``ALREADY_HAVE``).
    Otherwise one reply per recipient (``AOK`` for those accepted) and the offset of the
    text held durably already (0, or where a cut-off message resumes).
    """

    replies: tuple[Reply, ...] = ()
    offset: int = 0
    whole: Reply | None = None


def held_acceptance(proposed: Envelope, answered: Mapping[str, Reply]) -> Acceptance:
    """The answer to a re-proposal of a message committed before.

    ``answered`` maps each recipient's address (``smtp_path()``) to the reply the first
    answer gave it (``AOK`` if accepted), as the store remembered it durably with the id.
    Accepted recipients get ``ALREADY_HAVE``, refused ones their refusal again, one the
    first answer did not name :data:`NOT_HELD_FOR`; when all were accepted, the answer is
    ``ALREADY_HAVE`` for the whole message.
    """
    replies = tuple(
        ALREADY_HAVE if reply.code is ReplyCode.AOK else reply
        for reply in (
            answered.get(r.address.smtp_path(), NOT_HELD_FOR) for r in proposed.recipients
        )
    )
    if all(reply is ALREADY_HAVE for reply in replies):
        return Acceptance(whole=ALREADY_HAVE)
    return Acceptance(replies=replies)


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The peer proved it knows the secret; the call carries mail now."""

    peer: str
    negotiated: handshake.Negotiated


@dataclass(frozen=True, slots=True)
class CallFailing:
    """The call is failing (for the log); :class:`CallEnded` follows after the delay."""

    outcome: CallOutcome
    reason: str


@dataclass(frozen=True, slots=True)
class InventoryReceived:
    """What the peer holds for us (ids and sizes); its proposals follow."""

    items: tuple[InventoryItem, ...]


@dataclass(frozen=True, slots=True)
class ProposalReceived:
    """The peer offers a message: answer with :meth:`PhoneSession.accept` or ``refuse``.

    Look the id up in the store: already held → answer with :func:`held_acceptance`
    (``ALREADY_HAVE`` for the recipients accepted the first time, the first refusal for
    the others); partly held → accept naming the offset held durably (only when
    ``resume`` is true).
    """

    job: int
    peer: str
    message_id: str
    envelope: Envelope
    size: int
    digest: bytes
    resume: bool


@dataclass(frozen=True, slots=True)
class TextReceived:
    """A piece of an accepted message's text, to store at ``offset``."""

    job: int
    message_id: str
    offset: int
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CommitRequested:
    """All of the text of ``proposal`` is here: make the message durable for the
    recipients accepted (``envelope``), checking the digest over the whole text, then call
    :meth:`PhoneSession.commit_done`."""

    proposal: ProposalReceived
    envelope: Envelope  # the proposal's, with only the recipients answered AOK


@dataclass(frozen=True, slots=True)
class TextWanted:
    """Read up to ``max_bytes`` of a message we send from ``offset``: answer with
    :meth:`PhoneSession.provide_text` (or ``text_unavailable``)."""

    message_id: str
    offset: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class MessageSettled:
    """A message we sent has a reply for each recipient (in envelope order)."""

    message_id: str
    replies: tuple[Reply, ...]


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call is over: drop the line (after writing what :meth:`data_to_send` gives)."""

    summary: CallSummary


SessionEvent = (
    Authenticated
    | CallFailing
    | InventoryReceived
    | ProposalReceived
    | TextReceived
    | CommitRequested
    | TextWanted
    | MessageSettled
    | CallEnded
)


# --- jobs ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _OutJob:
    job: int
    message: Outgoing
    state: OutState = OutState.QUEUED
    replies: tuple[Reply, ...] = ()
    next_send: int = 0  # offset of the next byte to send
    next_read: int = 0  # offset of the next byte to ask the driver for
    reading: bool = False
    buffer: bytearray = field(default_factory=bytearray)

    @property
    def remaining(self) -> int:
        return self.message.size - self.next_send


@dataclass(slots=True)
class _InJob:
    proposal: ProposalReceived
    state: InState = InState.DECIDING
    received: int = 0
    accepted: Envelope | None = None

    @property
    def job(self) -> int:
        return self.proposal.job

    @property
    def message_id(self) -> str:
        return self.proposal.message_id

    @property
    def envelope(self) -> Envelope:
        return self.proposal.envelope

    @property
    def size(self) -> int:
        return self.proposal.size


# --- the engine ----------------------------------------------------------------------------


class PhoneSession:
    """One call's mail session over a record link.  See the module docstring."""

    def __init__(
        self,
        *,
        link: RecordLink,
        link_params: LinkParams,
        role: Role,
        local_name: str,
        secrets: Callable[[str], bytes | None],
        nonce: bytes,
        now: float,
        peer_name: str | None = None,
        options: SessionOptions | None = None,
        site_options: Callable[[str], SessionOptions | None] | None = None,
    ) -> None:
        """``site_options``, if given, are this end's settings for one peer (None: the
        defaults in ``options``): the caller applies them at once, the answerer once the
        caller's hello names it (see :mod:`relay.sansio.phone.handshake`)."""
        if role is Role.CALLER and peer_name is None:
            raise LocalPhoneError("a caller knows whom it calls")
        if role is Role.CALLER and site_options is not None and peer_name is not None:
            options = site_options(peer_name) or options
        self._link = link
        self._link_params = link_params
        self._role = role
        self._name = local_name
        self._secrets = secrets
        self._nonce = nonce
        self._peer: str | None = peer_name if role is Role.CALLER else None
        self._options = options or SessionOptions()
        self._site_options = site_options if role is Role.ANSWERER else None
        self._state = SessionState.GREETING
        self._started = now
        self._now = now
        self._deadline: float | None = now + self._options.handshake_timeout
        self._events: deque[SessionEvent] = deque()
        self._outcome = CallOutcome.COMPLETED
        self._reason = ""
        self._handshake_seconds: float | None = None
        self._closing_since = now
        self._negotiated: handshake.Negotiated | None = None
        self._secret: bytes | None = None
        self._peer_known = False
        self._transcript = b""
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._compressor: ChunkCompressor | None = None
        self._decompressor = ChunkDecompressor()
        self._deflater = RecordDeflater()
        self._inflater = RecordInflater()
        # jobs
        self._out: dict[int, _OutJob] = {}  # proposed, by job number
        self._offered: list[_OutJob] = []
        self._queued: deque[_OutJob] = deque()  # offered, not yet proposed
        self._sending: dict[int, _OutJob] = {}  # accepted, text still to send
        self._unsettled_out = 0  # offered, no final reply yet
        self._text_pending = 0  # offered, text not all sent (nor the message settled)
        self._out_by_id: dict[str, _OutJob] = {}
        self._offers_closed = False
        self._inventory_sent = False
        self._inventory_received = False
        self._done_sent = False
        self._done_received = False
        self._in: dict[int, _InJob] = {}  # jobs not yet settled
        self._last_in_job = 0
        self._in_ids: set[str] = set()
        # accounting
        self._payload_sent = self._payload_received = 0
        self._text_wire_sent = self._text_wire_received = 0
        self._messages_sent = self._messages_received = 0

        caps = Capabilities(
            min_frame_payload=link_params.min_frame_payload,
            max_frame_payload=link_params.max_frame_payload,
            window=link_params.window,
            max_record=link_params.max_record,
            max_message_size=self._options.max_message_size,
            compression=self._options.compression,
            encryption=self._options.encryption,
            resume=self._options.resume,
        )
        self._major, self._minor = handshake.MAJOR, handshake.MINOR
        self._hello = Hello(self._major, self._minor, role, local_name, nonce, caps)
        self._hello_bytes = records.encode(self._hello)
        self._link.send_record(self._hello_bytes)

    # --- driver API: bytes and time ---------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the call stands."""
        return self._state

    @property
    def ended(self) -> bool:
        """True once :class:`CallEnded` has been queued."""
        return self._state is SessionState.ENDED

    @property
    def peer(self) -> str | None:
        """The peer's name once known (the caller knows it from the start)."""
        return self._peer

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the line; ``b""`` when the line dropped."""
        self._now = now
        if self._state is SessionState.ENDED:
            return
        self._link.receive_data(data, now)
        self._drain_link()
        if not data and not self.ended:
            self._line_gone("the line dropped")
        self._pump()

    def data_to_send(self, now: float, max_bytes: int | None = None) -> bytes:
        """Bytes to write to the line now (frames, retransmissions, acknowledgements)."""
        self._now = now
        if self._state is SessionState.ENDED:
            return self._link.data_to_send(now, max_bytes)
        self._pump()
        out = self._link.data_to_send(now, max_bytes)
        if self._state is SessionState.RUNNING:
            out = self._with_text(now, max_bytes, out)
        self._drain_link()  # the link may have found the peer dead
        self._check_closed()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (None: only when bytes arrive)."""
        if self._state is SessionState.ENDED:
            return None
        times = [t for t in (self._link.next_deadline(), self._deadline) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        """Time passed: the link's timers, the handshake timeout, the delays."""
        self._now = now
        if self._state is SessionState.ENDED:
            return
        self._link.tick(now)
        self._drain_link()
        if self._deadline is not None and now >= self._deadline:
            self._deadline_passed()
        self._pump()
        self._check_closed()

    def next_event(self) -> SessionEvent | None:
        """The next event for the driver, or None."""
        return self._events.popleft() if self._events else None

    # --- driver API: sending ---------------------------------------------------------------

    def offer(self, message: Outgoing) -> None:
        """A message to send the peer in this call (before :meth:`close_offers`)."""
        if self._offers_closed:
            raise LocalPhoneError("offers are closed")
        if message.message_id in self._out_by_id:
            raise LocalPhoneError(f"message {message.message_id} offered twice")
        job = _OutJob(0, message)  # numbered when proposed: the peer checks the sequence
        self._offered.append(job)
        self._queued.append(job)
        self._unsettled_out += 1
        self._text_pending += 1
        self._out_by_id[message.message_id] = job

    def close_offers(self) -> None:
        """Nothing more to offer: the inventory can go out."""
        self._offers_closed = True
        self._pump()

    def provide_text(self, message_id: str, offset: int, data: bytes) -> None:
        """The answer to :class:`TextWanted` (``b""`` only at the end of the text)."""
        job = self._out_by_id.get(message_id)
        if job is None or not job.reading or offset != job.next_read:
            raise LocalPhoneError(f"text for {message_id} at {offset} was not asked for")
        job.reading = False
        if job.state is not OutState.SENDING:
            return  # settled meanwhile (the receiver gave up on it)
        if not data or job.next_read + len(data) > job.message.size:
            self._abandon(job, Reply(ReplyCode.FIO, "message text is not the announced size"))
        else:
            job.buffer += data
            job.next_read += len(data)
        self._pump()

    def text_unavailable(self, message_id: str, reply: Reply) -> None:
        """The text cannot be read: the message is given up for this call with ``reply``."""
        job = self._out_by_id.get(message_id)
        if job is None or not job.reading:
            raise LocalPhoneError(f"text for {message_id} was not asked for")
        job.reading = False
        if job.state is OutState.SENDING:
            self._abandon(job, reply)
        self._pump()

    # --- driver API: receiving --------------------------------------------------------------

    def accept(self, job: int, replies: Sequence[Reply], offset: int = 0) -> None:
        """Answer a :class:`ProposalReceived`: one reply per recipient (``AOK`` for those
        accepted) and the offset held already (resume)."""
        in_job = self._in_job_for_driver(job, InState.DECIDING)
        if len(replies) != len(in_job.envelope.recipients):
            raise LocalPhoneError("one reply per recipient")
        if not 0 <= offset <= in_job.size or (offset and not self._resume):
            raise LocalPhoneError(f"bad resume offset {offset}")
        if self._state is not SessionState.RUNNING:
            return
        self._send(Answer(job, tuple(replies), offset))
        if not any(r.code is ReplyCode.AOK for r in replies):
            self._step_in(in_job, InInput.REFUSE, local=True)
            return
        in_job.received = offset
        in_job.accepted = in_job.envelope.with_recipients(
            tuple(
                r
                for r, reply in zip(in_job.envelope.recipients, replies, strict=True)
                if reply.code is ReplyCode.AOK
            )
        )
        if offset == in_job.size:
            self._step_in(in_job, InInput.ACCEPT_COMPLETE, local=True)
            self._request_commit(in_job)
        else:
            self._step_in(in_job, InInput.ACCEPT, local=True)
        self._pump()

    def answer_proposal(self, job: int, acceptance: Acceptance) -> None:
        """Answer a :class:`ProposalReceived` with what the store decided."""
        if acceptance.whole is not None:
            self.refuse(job, acceptance.whole)
        else:
            self.accept(job, acceptance.replies, acceptance.offset)

    def refuse(self, job: int, reply: Reply) -> None:
        """Answer a :class:`ProposalReceived` for the whole message: refused, deferred, or
        (a success reply such as ``ALREADY_HAVE``) held already."""
        in_job = self._in_job_for_driver(job, InState.DECIDING)
        if self._state is not SessionState.RUNNING:
            return
        self._send(Answer(job, whole=reply))
        self._step_in(in_job, InInput.REFUSE, local=True)
        self._pump()

    def commit_done(self, job: int, reply: Reply) -> None:
        """Answer a :class:`CommitRequested`: the final reply (success only when durable)."""
        in_job = self._in_job_for_driver(job, InState.COMMITTING)
        if self._state is not SessionState.RUNNING:
            return
        self._step_in(in_job, InInput.COMMITTED, local=True)
        if reply.code.is_success:
            self._messages_received += 1
        self._send(FinalReply(job, reply))
        self._pump()

    def fail_receiving(self, job: int, reply: Reply) -> None:
        """Storing a message's text failed: send the final failure now (the rest of its
        text, if any is still coming, is read and dropped)."""
        if not 0 < job <= self._last_in_job:
            raise LocalPhoneError(f"no job {job}")
        in_job = self._in.get(job)
        if (
            in_job is None
            or in_job.state not in _STORING
            or self._state is not SessionState.RUNNING
        ):
            return  # the message (the peer gave it up) or the call ended meanwhile
        what = InInput.FAIL if in_job.state is InState.RECEIVING else InInput.COMMITTED
        self._step_in(in_job, what, local=True)
        self._send(FinalReply(job, reply))
        self._pump()

    def abort(self, reply: Reply) -> None:
        """Hang up now because of local trouble (the peer is told why)."""
        if self._state in (SessionState.RUNNING, SessionState.GREETING, SessionState.PROVING):
            self._begin_abort(CallOutcome.LOCAL_ABORT, reply)
            self._pump()

    # --- incoming records ------------------------------------------------------------------

    def _drain_link(self) -> None:
        while self._state is not SessionState.ENDED:
            event = self._link.next_event()
            if event is None:
                return
            if isinstance(event, RecordReceived):
                self._on_raw_record(event.record)
            else:
                self._line_gone(f"link dead: {event.reason}")

    def _on_raw_record(self, raw: bytes) -> None:
        if self._state in (SessionState.REFUSING, SessionState.ENDED):
            return
        try:
            if self._opener is not None:
                raw = self._opener.open(raw)
            record = self._decode(raw)
            self._on_record(record, raw)
        except PhoneProtocolError as e:
            self._protocol_error(e.reason)

    def _on_record(self, record: Record, raw: bytes) -> None:
        state = self._state
        if isinstance(record, Abort):
            self._peer_aborted(record.reply)
        elif state is SessionState.GREETING and isinstance(record, Hello):
            self._on_hello(record, raw)
        elif state is SessionState.PROVING and isinstance(record, Proof):
            self._on_proof(record, raw)
        elif state is SessionState.RUNNING:
            self._on_mail_record(record)
        elif state is SessionState.CLOSING:
            pass  # an abort was sent; the rest of what the peer says no longer matters
        else:
            raise PhoneProtocolError(f"{type(record).__name__} record while {state.value}")

    def _on_hello(self, hello: Hello, raw: bytes) -> None:
        if hello.role is self._role:
            raise PhoneProtocolError(f"both ends claim to be the {self._role.name.lower()}")
        handshake.check_capabilities(hello.capabilities)
        if hello.major != self._major:
            reason = (
                f"version {hello.major}.{hello.minor} is not supported; "
                f"this end speaks {self._major}.{self._minor}"
            )
            self._begin_abort(CallOutcome.VERSION_MISMATCH, Reply(ReplyCode.PROT, reason))
            return
        if self._role is Role.CALLER:
            caller, answerer = self._hello_bytes, raw
            self._peer_known = hello.name == self._peer
        else:
            caller, answerer = raw, self._hello_bytes
            self._peer = hello.name
        wanted = self._peer_known or self._role is Role.ANSWERER
        secret = self._secrets(hello.name) if wanted else None
        self._peer_known = secret is not None
        self._transcript = handshake.transcript_hash(caller, answerer)
        # an unknown peer gets a decoy proof: it must not learn whether the name exists
        self._secret = secret if secret is not None else hashlib.sha256(self._nonce).digest()
        self._peer_hello = hello
        ours = self._hello.capabilities
        proof = Proof(handshake.make_proof(self._secret, self._role, self._transcript))
        if secret is not None and self._site_options is not None:
            ours = self._apply_site_options(hello.name)
            if ours != self._hello.capabilities:
                terms = records.proof_terms(records.encode(Proof(proof.mac, ours)))
                mac = handshake.make_proof(self._secret, self._role, self._transcript, terms)
                proof = Proof(mac, ours)
        self._send(proof)
        self._negotiated = handshake.negotiate(self._minor, ours, hello.capabilities, hello.minor)
        self._state = SessionState.PROVING

    def _apply_site_options(self, peer: str) -> Capabilities:
        """The answerer's settings for the caller, now that it is known: they replace the
        defaults for this call; the capabilities to offer with them."""
        options = self._site_options(peer) if self._site_options is not None else None
        if options is None:
            return self._hello.capabilities
        self._options = options
        return replace(
            self._hello.capabilities,
            max_message_size=options.max_message_size,
            compression=options.compression,
            encryption=options.encryption,
            resume=options.resume,
        )

    def _on_proof(self, proof: Proof, raw: bytes) -> None:
        assert self._secret is not None and self._negotiated is not None
        if not self._peer_known:
            self._refuse(CallOutcome.UNKNOWN_SITE, f"unknown site {self._peer_hello.name!r}")
            return
        if proof.capabilities is not None and self._role is Role.ANSWERER:
            raise PhoneProtocolError("a caller's proof with capabilities")
        terms = records.proof_terms(raw)
        if not handshake.verify_proof(
            self._secret, self._role.other, self._transcript, proof.mac, terms
        ):
            self._refuse(CallOutcome.AUTH_FAILED, f"site {self._peer!r} failed to prove its secret")
            return
        if proof.capabilities is not None:  # the answerer's settings for us
            handshake.check_capabilities(proof.capabilities)
            self._negotiated = handshake.negotiate(
                self._minor, self._hello.capabilities, proof.capabilities, self._peer_hello.minor
            )
        negotiated = self._negotiated
        if negotiated.encryption:
            if self._role is Role.CALLER:
                nonces = (self._nonce, self._peer_hello.nonce)
            else:
                nonces = (self._peer_hello.nonce, self._nonce)
            c2a, a2c = handshake.derive_keys(self._secret, *nonces, self._transcript)
            ours, theirs = (c2a, a2c) if self._role is Role.CALLER else (a2c, c2a)
            self._sealer, self._opener = Sealer(ours), Opener(theirs)
        if negotiated.compression:
            self._compressor = ChunkCompressor()
        try:
            self._link.reconfigure(
                replace(
                    self._link_params,
                    min_frame_payload=negotiated.min_frame_payload,
                    max_frame_payload=negotiated.max_frame_payload,
                    window=negotiated.window,
                    max_record=negotiated.max_record,
                )
            )
        except LocalPhoneError as e:  # limits both ends accepted that the link refuses
            raise PhoneProtocolError(f"negotiated link limits refused: {e}") from None
        self._state = SessionState.RUNNING
        self._deadline = None
        self._handshake_seconds = self._now - self._started
        assert self._peer is not None
        self._events.append(Authenticated(self._peer, negotiated))

    @property
    def _resume(self) -> bool:
        return self._negotiated is not None and self._negotiated.resume

    def _on_mail_record(self, record: Record) -> None:
        if isinstance(record, Text):
            self._on_text(record)
        elif isinstance(record, Propose):
            self._on_propose(record)
        elif isinstance(record, Answer):
            self._on_answer(record)
        elif isinstance(record, FinalReply):
            self._on_final(record)
        elif isinstance(record, Inventory):
            if self._inventory_received:
                raise PhoneProtocolError("a second inventory")
            self._inventory_received = True
            self._events.append(InventoryReceived(record.items))
        elif isinstance(record, Abandon):
            in_job = self._peer_in_job(record.job)
            self._step_in(in_job, InInput.ABANDONED)
        elif isinstance(record, Done):
            self._on_done()
        else:
            raise PhoneProtocolError(f"{type(record).__name__} record after the handshake")

    def _on_propose(self, p: Propose) -> None:
        if not self._inventory_received or self._done_received:
            raise PhoneProtocolError("a proposal outside the inventory and hang-up")
        if p.job != self._last_in_job + 1:
            raise PhoneProtocolError(f"job {p.job} proposed out of sequence")
        if len(self._in) >= 2 * MAX_OUTSTANDING or p.job > records.MAX_INVENTORY:
            raise PhoneProtocolError("too many messages proposed")
        self._last_in_job = p.job
        assert self._peer is not None
        envelope = p.envelope.to_envelope(Submitter("phone", client_name=self._peer))
        proposal = ProposalReceived(
            p.job, self._peer, p.message_id, envelope, p.size, p.digest, self._resume
        )
        self._in[p.job] = _InJob(proposal)
        if p.size > self._options.max_message_size:
            limit = self._options.max_message_size
            self.refuse(p.job, Reply(ReplyCode.FSIZ, f"over the limit of {limit} bytes"))
        elif p.message_id in self._in_ids:
            self.refuse(p.job, Reply(ReplyCode.AGN, "proposed twice in one call"))
        else:
            self._in_ids.add(p.message_id)
            self._events.append(proposal)

    def _on_text(self, t: Text) -> None:
        job = self._peer_in_job(t.job)
        if job.state is InState.RECEIVING:
            limit = job.size - job.received
        else:
            limit = self._negotiated.max_record if self._negotiated else 0
        data = t.data
        if t.compressed:
            data = self._decompressor.decompress(data, limit)
        elif len(data) > limit:
            raise PhoneProtocolError(f"text for job {t.job} past its size")
        self._text_wire_received += len(t.data)
        if job.state is InState.DRAINING:
            self._step_in(job, InInput.TEXT)
            return
        if not data:
            return
        offset = job.received
        job.received += len(data)
        self._payload_received += len(data)
        done = job.received == job.size
        self._step_in(job, InInput.TEXT_COMPLETE if done else InInput.TEXT)
        self._events.append(TextReceived(job.job, job.message_id, offset, data))
        if done:
            self._request_commit(job)

    def _on_answer(self, a: Answer) -> None:
        job = self._out.get(a.job)
        if job is None:
            raise PhoneProtocolError(f"answer for unknown job {a.job}")
        n = len(job.message.envelope.recipients)
        if a.whole is not None:
            self._step_out(job, OutInput.REFUSED)
            self._settle(job, (a.whole,) * n)
            return
        if len(a.recipients) != n or a.offset > job.message.size:
            raise PhoneProtocolError(f"answer for job {a.job} does not fit its proposal")
        if a.offset and not self._resume:
            raise PhoneProtocolError("a resume offset without resume")
        job.replies = a.recipients
        if not any(r.code is ReplyCode.AOK for r in a.recipients):
            self._step_out(job, OutInput.REFUSED)
            self._settle(job, a.recipients)
            return
        self._step_out(job, OutInput.ACCEPTED)
        job.next_send = job.next_read = a.offset
        if a.offset == job.message.size:
            self._step_out(job, OutInput.TEXT_SENT)

    def _on_final(self, f: FinalReply) -> None:
        job = self._out.get(f.job)
        if job is None:
            raise PhoneProtocolError(f"final reply for unknown job {f.job}")
        self._step_out(job, OutInput.FINAL)
        job.buffer.clear()
        replies = tuple(f.reply if r.code is ReplyCode.AOK else r for r in job.replies)
        if f.reply.code.is_success:
            self._messages_sent += 1
        self._settle(job, replies)

    def _on_done(self) -> None:
        if self._done_received:
            raise PhoneProtocolError("a second hang-up")
        open_jobs = [j.job for j in self._in.values() if j.state in _TEXT_EXPECTED]
        if open_jobs:
            raise PhoneProtocolError(f"hang-up with the text of jobs {open_jobs[:5]} to come")
        self._done_received = True

    # --- job steps -------------------------------------------------------------------------

    def _peer_in_job(self, number: int) -> _InJob:
        job = self._in.get(number)
        if job is None:
            raise PhoneProtocolError(f"record for unknown job {number}")
        return job

    def _in_job_for_driver(self, number: int, state: InState) -> _InJob:
        job = self._in.get(number)
        if job is None or (job.state is not state and self._state is SessionState.RUNNING):
            raise LocalPhoneError(f"job {number} is not {state.value}")
        return job

    def _step_in(self, job: _InJob, what: InInput, local: bool = False) -> None:
        new = IN_TRANSITIONS.get((job.state, what))
        if new is None:
            problem = f"job {job.job}: {what.value} while {job.state.value}"
            raise LocalPhoneError(problem) if local else PhoneProtocolError(problem)
        job.state = new
        if new is InState.SETTLED:
            del self._in[job.job]  # nothing more may come for it

    def _step_out(self, job: _OutJob, what: OutInput) -> None:
        old = job.state
        new = OUT_TRANSITIONS.get((old, what))
        if new is None:
            raise PhoneProtocolError(f"job {job.job}: {what.value} while {old.value}")
        job.state = new
        if new is OutState.SENDING:
            self._sending[job.job] = job
        else:
            self._sending.pop(job.job, None)
        if new is OutState.SETTLED:
            self._unsettled_out -= 1
        if old in _TEXT_TO_SEND and new not in _TEXT_TO_SEND:
            self._text_pending -= 1

    def _request_commit(self, job: _InJob) -> None:
        assert job.accepted is not None
        self._events.append(CommitRequested(job.proposal, job.accepted))

    def _settle(self, job: _OutJob, replies: tuple[Reply, ...]) -> None:
        self._events.append(MessageSettled(job.message.message_id, replies))

    def _abandon(self, job: _OutJob, reply: Reply) -> None:
        self._step_out(job, OutInput.ABANDON)
        job.buffer.clear()
        self._send(Abandon(job.job, reply))
        self._settle(job, tuple(reply if r.code is ReplyCode.AOK else r for r in job.replies))

    # --- sending ---------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> Record:
        if not raw or raw[0] != records.DEFLATED:
            return records.decode(raw)
        if self._state is not SessionState.RUNNING:
            raise PhoneProtocolError("a deflated record before the handshake's end")
        assert self._negotiated is not None
        record = records.decode(self._inflater.inflate(raw[1:], self._negotiated.max_record))
        if not isinstance(record, records.DEFLATABLE):
            raise PhoneProtocolError(f"a deflated {type(record).__name__} record")
        return record

    def _send(self, record: Record) -> None:
        raw = records.encode(record)
        if isinstance(record, records.DEFLATABLE):
            raw = bytes((records.DEFLATED,)) + self._deflater.deflate(raw)
        if self._sealer is not None:
            raw = self._sealer.seal(raw)
        self._link.send_record(raw)

    def _pump(self) -> None:
        """Move what may go now into the link: inventory, proposals, text, hang-up."""
        if self._state is not SessionState.RUNNING:
            return
        assert self._negotiated is not None
        if not self._inventory_sent:
            if not self._offers_closed:
                return
            self._inventory_sent = True
            items = (InventoryItem(j.message.message_id, j.message.size) for j in self._offered)
            self._send(Inventory(tuple(items)))
        self._propose_ahead()
        self._request_reads()
        self._maybe_done()

    def _propose_ahead(self) -> None:
        """Propose while fewer than ``MAX_OUTSTANDING`` of our jobs await their final reply:
        whatever their sizes, so a small message behind a large one is accepted (and then
        sent first) without waiting for the large one."""
        assert self._negotiated is not None
        limit = self._negotiated.max_message_size
        outstanding = self._unsettled_out - len(self._queued)
        while self._queued and outstanding < MAX_OUTSTANDING:
            job = self._queued.popleft()
            if job.message.size > limit:
                self._step_out(job, OutInput.TOO_BIG)
                reply = Reply(ReplyCode.FSIZ, f"over the peer's limit of {limit} bytes")
                self._settle(job, (reply,) * len(job.message.envelope.recipients))
                continue
            m = job.message
            job.job = len(self._out) + 1
            proposal = Propose(
                job.job, m.message_id, m.size, m.digest, MailEnvelope.from_envelope(m.envelope)
            )
            if len(records.encode(proposal)) > self._negotiated.max_record - 64:
                self._step_out(job, OutInput.TOO_BIG)
                reply = Reply(ReplyCode.NO, "envelope too long for the link")
                self._settle(job, (reply,) * len(m.envelope.recipients))
                continue
            self._step_out(job, OutInput.PROPOSE)
            self._out[job.job] = job
            self._send(proposal)
            outstanding += 1

    def _with_text(self, now: float, max_bytes: int | None, out: bytes) -> bytes:
        """Text goes into the link only here, as the link can send it: the link keeps at
        most ``lookahead`` bytes unsent (a frame and a chunk, so that the frame it sends is
        not taken for the tail of the stream), so that an answer or a final reply queued
        now leaves right after what is on the line, not behind a window of text, and the
        next chunk is chosen as late as possible."""
        assert self._negotiated is not None
        chunk = min(self._options.chunk_size, self._negotiated.max_record - 64)
        window = self._negotiated.window
        lookahead = self._negotiated.max_frame_payload + chunk
        link = self._link
        parts = [out]
        size = len(out)
        while max_bytes is None or size < max_bytes:
            while (
                link.unsent_bytes < lookahead
                and link.queued_bytes < window
                and self._send_chunk(chunk)
            ):
                pass
            more = link.data_to_send(now, None if max_bytes is None else max_bytes - size)
            if not more:
                break
            parts.append(more)
            size += len(more)
        self._request_reads()
        return b"".join(parts)

    def _send_chunk(self, chunk: int) -> bool:
        """One chunk of the accepted message with the least left to send; False if none
        has text ready."""
        ready = [j for j in self._sending.values() if j.buffer]
        if not ready:
            return False
        job = min(ready, key=lambda j: (j.remaining, j.job))
        piece = bytes(job.buffer[:chunk])
        del job.buffer[:chunk]
        compressed, data = self._compressor.compress(piece) if self._compressor else (False, piece)
        self._send(Text(job.job, compressed, data))
        job.next_send += len(piece)
        self._payload_sent += len(piece)
        self._text_wire_sent += len(data)
        if job.next_send == job.message.size:
            self._step_out(job, OutInput.TEXT_SENT)
        return True

    def _request_reads(self) -> None:
        """Read ahead for the few accepted messages to be sent next (least left first), so
        text is ready when the link wants it and memory stays a few read-aheads."""
        read_ahead = self._options.read_ahead
        sending = list(self._sending.values())
        if len(sending) > READERS:
            sending = sorted(sending, key=lambda j: (j.remaining, j.job))[:READERS]
        for job in sending:
            if (
                not job.reading
                and job.next_read < job.message.size
                and len(job.buffer) < self._options.chunk_size
            ):
                job.reading = True
                want = min(read_ahead, job.message.size - job.next_read)
                self._events.append(TextWanted(job.message.message_id, job.next_read, want))

    def _maybe_done(self) -> None:
        if not self._done_sent and self._offers_closed and self._text_pending == 0:
            self._done_sent = True
            self._send(Done())
        if (
            self._done_sent
            and self._done_received
            and self._unsettled_out == 0
            and all(j.state in _FINAL_SENT for j in self._in.values())
        ):
            self._close()

    # --- ending ----------------------------------------------------------------------------

    def _protocol_error(self, reason: str) -> None:
        if self._state is SessionState.RUNNING:
            self._begin_abort(CallOutcome.PROTOCOL_ERROR, Reply(ReplyCode.PROT, reason[:150]))
        elif self._state in (SessionState.GREETING, SessionState.PROVING):
            self._refuse(CallOutcome.PROTOCOL_ERROR, reason)

    def _begin_abort(self, outcome: CallOutcome, reply: Reply) -> None:
        self._outcome, self._reason = outcome, reply.description
        self._events.append(CallFailing(outcome, reply.description))
        self._send(Abort(reply))
        self._close()

    def _peer_aborted(self, reply: Reply) -> None:
        if self._state is SessionState.CLOSING:
            return
        outcome = (
            CallOutcome.VERSION_MISMATCH
            if self._state is SessionState.GREETING
            else CallOutcome.PEER_ABORTED
        )
        self._outcome, self._reason = outcome, f"peer hung up: {reply.description}"
        self._events.append(CallFailing(outcome, self._reason))
        self._close()

    def _close(self) -> None:
        """Hang up: end once the link has everything acknowledged and our own
        acknowledgement of the peer's last record has had time to leave (``LINGER``), or
        after ``closing_grace`` whatever the link says."""
        self._state = SessionState.CLOSING
        self._closing_since = self._now
        self._deadline = self._now + LINGER

    def _refuse(self, outcome: CallOutcome, reason: str) -> None:
        self._outcome, self._reason = outcome, reason
        self._events.append(CallFailing(outcome, reason))
        self._state = SessionState.REFUSING
        self._deadline = self._now + self._options.failure_delay

    def _deadline_passed(self) -> None:
        if self._state in (SessionState.GREETING, SessionState.PROVING):
            self._refuse(CallOutcome.TIMEOUT, "the peer stayed silent during the handshake")
        elif self._state is SessionState.REFUSING:
            self._end()
        elif self._state is SessionState.CLOSING:
            if self._link.idle or self._now >= self._closing_since + self._options.closing_grace:
                self._end()
            else:
                self._deadline = self._closing_since + self._options.closing_grace

    def _line_gone(self, reason: str) -> None:
        if self._state in (SessionState.CLOSING, SessionState.REFUSING):
            self._end()  # the outcome is decided already
        else:
            self._outcome, self._reason = CallOutcome.LINE_DROPPED, reason
            self._end()

    def _check_closed(self) -> None:
        if (
            self._state is SessionState.CLOSING
            and self._link.idle
            and self._now >= self._closing_since + LINGER
        ):
            self._end()

    def _end(self) -> None:
        self._state = SessionState.ENDED
        self._deadline = None
        self._events.append(CallEnded(self._summary()))

    def _summary(self) -> CallSummary:
        stats = self._link.stats()
        return CallSummary(
            role=self._role.name.lower(),
            peer=self._peer or "",
            outcome=self._outcome,
            reason=self._reason,
            seconds=self._now - self._started,
            handshake_seconds=self._handshake_seconds,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            payload_bytes_sent=self._payload_sent,
            payload_bytes_received=self._payload_received,
            text_wire_bytes_sent=self._text_wire_sent,
            text_wire_bytes_received=self._text_wire_received,
            wire_bytes_sent=stats.wire_bytes_sent,
            wire_bytes_received=stats.wire_bytes_received,
            frames_sent=stats.frames_sent,
            frames_resent=stats.frames_resent,
            frames_damaged=stats.frames_damaged,
            rtt=stats.rtt,
            line_rate=self._options.line_rate,
        )

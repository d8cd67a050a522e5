"""The seams of the relay: the MMDF channel contract, the queue and the deliverer.

A channel is anything mail can leave or enter by: SMTP, local mailboxes, the phone/slave
serial link.  MMDF gave every channel module the same calls, grouped in phases, and one
deliverer (``deliver``, the ``qu_`` side) that drives them all.  We keep that contract,
renamed for Python and made asynchronous: every call returns a Deferred, and a call a
channel has nothing to do in is still present (and fires at once), so the deliverer's
sequencing never depends on which channel it talks to.

The mapping to MMDF's names, once:

==========================  ======================================  ==================
MMDF call                   here                                    phase
==========================  ======================================  ==================
``xx_init``                 :meth:`IChannel.open_session`           session
``xx_end``                  :meth:`IChannelSession.end_session`     session
``xx_winit``                :meth:`IChannelSession.begin_message`   write a message
``xx_wadr`` + ``xx_rrply``  :meth:`IChannelSession.add_recipient`   write a message
``xx_waend``                :meth:`IChannelSession.end_recipients`  write a message
``xx_wtinit``               :meth:`IChannelSession.begin_text`      write a message
``xx_wtxt``                 :meth:`IChannelSession.write_text`      write a message
``xx_wtend`` + ``xx_rrply`` :meth:`IChannelSession.end_text`        write a message
``xx_wkill``                :meth:`IChannelSession.abort_message`   write a message
``xx_rinit``                :meth:`IReadSession.next_message`       read a message
``xx_radr``                 :meth:`IReadSession.next_recipient`     read a message
``xx_wrply`` (address)      :meth:`IReadSession.answer_recipient`   read a message
``xx_rtinit``               :meth:`IReadSession.begin_text`         read a message
``xx_rtxt``                 :meth:`IReadSession.read_text`          read a message
``xx_wrply`` (text)         :meth:`IReadSession.answer_message`     read a message
``xx_rkill``                :meth:`IReadSession.abort_message`      read a message
``xx_sbinit``               :meth:`ISubmitPickup.begin_submission`  submit
``xx_sbend``                :meth:`ISubmitPickup.end_submission`    submit
``xx_pkinit``               :meth:`ISubmitPickup.begin_pickup`      pick up
``xx_pkkill``               :meth:`ISubmitPickup.stop_pickup`       pick up
==========================  ======================================  ==================

MMDF's ``xx_wainit`` ("get ready for addresses") has no call of its own: it is always
immediately after ``xx_winit``, so :meth:`IChannelSession.begin_message` covers both.

**Sequencing modes.**  A channel declares one (:class:`SequencingMode`):

* *address-then-text* (list mode: SMTP, phone).  The deliverer calls ``begin_message``,
  then ``add_recipient`` for each address, each answered ``AOK`` (address accepted, text
  to follow) or a failure; then ``end_recipients``, ``begin_text``, ``write_text`` for
  each chunk, and ``end_text``, whose reply applies to every address that got ``AOK``.
  If no address got ``AOK`` the deliverer calls ``abort_message`` instead of sending text.
* *text-per-address* (local mailboxes).  ``add_recipient`` delivers the whole message
  (the channel reads it from ``message.open_text()``) and answers ``MOK`` or a failure.
  ``end_recipients`` follows; no text calls are made.

A channel that can answer one of ``AOK`` and ``MOK`` never answers the other.  The
deliverer checks this: a violation defers the message (never loses it), aborts the
session and is logged with the channel's name.

**Failures.**  A channel reports the fate of an address with a
:class:`relay.reply.Reply`, never by failing the Deferred.  A Deferred that fails means
the session itself is broken (a defect, or a lost connection the channel did not turn
into a reply): the deliverer treats every address not yet final as ``NET`` (deferred,
destination marked dead) and drops the session.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from relay.address import Address
from relay.envelope import Destination, Envelope, Recipient, RecipientStatus
from relay.reply import Reply
from relay.sansio.phone.session import Acceptance, Outgoing

__all__ = [
    "AuthVerdict",
    "IAuthThrottle",
    "IChannel",
    "IChannelSession",
    "IDeliverer",
    "IHandoffStore",
    "ILocalRecipients",
    "IMessage",
    "IPhoneStore",
    "IQueue",
    "IReadSession",
    "IStore",
    "ISubmitPickup",
    "ITextReader",
    "SequencingMode",
]


class SequencingMode(enum.Enum):
    """How a channel wants a message: all addresses then one text, or text per address."""

    ADDRESS_THEN_TEXT = "address-then-text"
    TEXT_PER_ADDRESS = "text-per-address"


# --- the message as a channel sees it ---------------------------------------------------


class ITextReader(Interface):
    """A stream over a message's text: read it chunk by chunk, never all at once."""

    def read(max_bytes: int) -> Deferred[bytes]:
        """Fire with up to ``max_bytes`` of the text; ``b""`` at the end."""

    def close() -> None:
        """Release the underlying file; further reads are an error."""


class IMessage(Interface):
    """A queued message handed to a channel: its identity, envelope and text.

    The text is the message as received, with CRLF line ends and no dot-stuffing;
    each call to :meth:`open_text` starts a fresh stream from the first byte, so a
    text-per-address channel can read it once per address.
    """

    queue_id = Attribute("str: the spool's id of the message (safe as a file name)")
    envelope = Attribute("relay.envelope.Envelope: sender, recipients, flags")
    size = Attribute("int: the text's size in octets")

    def open_text() -> ITextReader:
        """A new stream over the text, from its first byte."""


# --- the channel contract (MMDF xx_*) ---------------------------------------------------


class IChannel(Interface):
    """A way out of the relay (MMDF's channel module, its ``xx_init`` entry point)."""

    name = Attribute("str: the channel's name in routes, logs and the spool ('smtp', 'local')")
    mode = Attribute("SequencingMode: how this channel wants a message sequenced")

    def open_session(destination: Destination) -> Deferred[IChannelSession]:
        """``xx_init``: get ready to handle mail for one destination.

        Fires with a session once the channel can take a message (for SMTP: connected
        and greeted).  If the destination cannot be reached the Deferred fires with a
        session anyway only if the channel wants to answer per address; otherwise it
        fails with :class:`relay.errors.SessionFailed` carrying the reply (``DHST``,
        ``NS``, ``TIME``…) that every address for the destination then gets.
        """


class IChannelSession(Interface):
    """One open session of a channel to a destination: MMDF's write-mail calls.

    A session carries any number of messages, one at a time, until ``end_session``.
    """

    pipelines_addresses = Attribute(
        "bool: whether the deliverer may send every address of a message before the first"
        " reply comes back (SMTP PIPELINING); False makes it wait for each reply in turn"
    )

    def begin_message(mode: str, return_path: Address | None, message: IMessage) -> Deferred[None]:
        """``xx_winit`` (+ ``xx_wainit``): a message follows.

        ``mode`` is MMDF's mode string (``"m"``: for a mailbox); ``return_path`` is None
        for the null sender.  The message's text is available through ``message``.
        """

    def add_recipient(recipient: Recipient) -> Deferred[Reply]:
        """``xx_wadr`` then ``xx_rrply``: here is one address; fire with its reply.

        Address-then-text channels answer ``AOK`` or a failure; text-per-address
        channels deliver the whole message here and answer ``MOK`` or a failure.
        """

    def end_recipients() -> Deferred[None]:
        """``xx_waend``: no more addresses for this message."""

    def begin_text() -> Deferred[None]:
        """``xx_wtinit``: the text follows (address-then-text channels only)."""

    def write_text(chunk: bytes) -> Deferred[None]:
        """``xx_wtxt``: one more chunk of the text; fires when the chunk may be reused.

        Chunks are pieces of the CRLF text with no dot-stuffing; a line may be split
        across chunks.  The Deferred gives backpressure: the deliverer waits for it.
        """

    def end_text() -> Deferred[Reply]:
        """``xx_wtend`` then ``xx_rrply``: end of text; fire with the final reply.

        The reply applies to every address of this message that was answered ``AOK``.
        """

    def abort_message() -> Deferred[None]:
        """``xx_wkill``: abandon the current message; the session stays usable."""

    def end_session() -> Deferred[None]:
        """``xx_end``: end this session (for SMTP: QUIT and close)."""


class IReadSession(Interface):
    """The receiving side: a channel delivers messages *to* the relay (MMDF's read-mail).

    The phone channel's received messages are read into the queue this way
    (:class:`relay.channels.phone.held.HeldMessage`; the SMTP gateway stores straight
    through :meth:`IQueue.store`); the caller answers each address and each text.
    """

    def next_message() -> Deferred[tuple[str, Address | None] | None]:
        """``xx_rinit``: fire with the next message's (mode, return path), or None if none."""

    def next_recipient() -> Deferred[Recipient | None]:
        """``xx_radr``: fire with the next address, or None after the last one."""

    def answer_recipient(reply: Reply) -> Deferred[None]:
        """``xx_wrply`` for the address just read: accepted (``AOK``) or why not."""

    def begin_text() -> Deferred[None]:
        """``xx_rtinit``: the caller is ready for the text."""

    def read_text() -> Deferred[bytes]:
        """``xx_rtxt``: fire with the next chunk of text; ``b""`` at the end."""

    def answer_message(reply: Reply) -> Deferred[None]:
        """``xx_wrply`` for the text: the final answer (``OK`` only once it is durable)."""

    def abort_message() -> Deferred[None]:
        """``xx_rkill``: drop the current message; nothing of it is kept."""


class ISubmitPickup(Interface):
    """Two-way sessions (phone/slave): the caller submits mail, then picks up its own."""

    def begin_submission() -> Deferred[None]:
        """``xx_sbinit``: the caller will submit (send) mail on this session."""

    def end_submission() -> Deferred[None]:
        """``xx_sbend``: the caller has no more mail to submit."""

    def begin_pickup() -> Deferred[IReadSession]:
        """``xx_pkinit``: the caller wants to receive the mail waiting for it."""

    def stop_pickup() -> Deferred[None]:
        """``xx_pkkill``: the caller wants no more mail on this session."""


# --- the queue and the deliverer ---------------------------------------------------------


class IStore(Interface):
    """Where the SMTP gateway puts what it accepts: the spool, or (in a gateway worker
    process) a link to the process that owns the spool."""

    def store(envelope: Envelope, text: bytes) -> Deferred[str]:
        """Write a new message durably; fire with its queue id (unique, sortable by arrival).

        Fails (and leaves nothing visible) when the message cannot be made durable,
        e.g. on a full disk: the SMTP gateway then answers 452 4.3.1.
        """


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """Whether an AUTH attempt may have its password checked (it is then counted), and
    the client's counts when it asked: its failures within ``window`` seconds and its
    attempts being checked (the log line of a refusal names them)."""

    allowed: bool
    failures: int
    pending: int
    window: float


class IAuthThrottle(Interface):
    """Where an SMTP session asks before it checks a password, and tells the outcome after:
    the failed-AUTH count of :class:`relay.gateway.limits.AuthThrottle`, in this process
    or (from a gateway worker process) in the spool's, so the limit holds relay-wide."""

    def begin(client: str) -> Deferred[AuthVerdict]:
        """Ask whether ``client`` may have a password checked now; fire with the verdict.

        An allowed attempt is counted from now and must be ended with :meth:`end`.  Fails
        when the answer cannot be had (the link to the spool's process is gone): the
        session then answers ``454`` and checks nothing, so no check goes uncounted.
        """

    def end(client: str, failed: bool) -> None:
        """An allowed attempt of ``client``'s is done; a failed one counts in the window."""


class QueueSource(Protocol):
    """The queue, once it is open: what parts built before the spool opens are given.

    :class:`relay.queue.ready.QueueReady` is the one ``relay.tap`` makes; the spool's
    service settles it when the queue opens.  ``when_ready`` fires with the open
    :class:`IQueue` (at once if it is open) or fails if the spool cannot be opened.  It
    is the one way a part is given the queue: one open before the part is built (a
    gateway worker's link, a test's queue) is handed over as ``QueueReady.of(queue)``.
    """

    def when_ready(self) -> Deferred[Any]:
        """Fire with the open queue."""
        ...


class IQueue(IStore):
    """The spool: where accepted mail waits, durably, with per-recipient state.

    Every Deferred that reports a change fires only after the change is on disk
    (fsynced), so a caller may say "yes" to a peer as soon as it fires.
    """

    def load(queue_id: str) -> Deferred[tuple[Envelope, Sequence[RecipientStatus]]]:
        """Fire with a message's envelope and its recipients' states (not its text)."""

    def open_message(queue_id: str) -> IMessage:
        """The message as a channel sees it, with its text readable in chunks."""

    def update(queue_id: str, changes: Mapping[int, RecipientStatus]) -> Deferred[None]:
        """Atomically record new states for some recipients (by index in the envelope).

        Fires when durable.  When every recipient is final, the message is removed.
        """

    def list_messages() -> Deferred[Sequence[str]]:
        """Fire with the ids of every message in the queue, oldest first."""

    def due(now: float) -> Deferred[Iterable[tuple[str, int]]]:
        """Fire with (queue id, recipient index) of every recipient due at ``now``.

        Answered from an index held in memory: no message body is read.
        """

    def next_due_time() -> float | None:
        """When the earliest deferred recipient falls due, or None if nothing waits."""

    def due_by_destination(
        now: float,
    ) -> Deferred[Mapping[Destination | None, Sequence[tuple[str, int]]]]:
        """The recipients :meth:`due` reports, grouped by destination, oldest message first.

        The key is the recipient's (channel, host); None for recipients not routed yet.
        """

    def add_listener(callback: object) -> None:
        """Call ``callback()`` whenever new mail is stored or a recipient becomes due."""

    def remove_listener(callback: object) -> None:
        """Stop calling a callback given to :meth:`add_listener`."""

    def remove(queue_id: str) -> Deferred[None]:
        """Delete a message whatever its recipients' states (the operator's ``rm``).

        Fires when durable; fails with :class:`relay.queue.state.NoSuchMessage` if the
        message is not queued.  No notification goes to the sender.
        """

    def hold(queue_id: str) -> Deferred[int]:
        """Put every recipient not yet final on hold; fire with how many changed.

        Held recipients are never due; their attempts and next attempt are kept.
        """

    def release(queue_id: str) -> Deferred[int]:
        """Take held recipients off hold (deferred until their next attempt, or due now)."""

    def flush_message(queue_id: str, channel: str | None = None) -> Deferred[int]:
        """Make the message's deferred recipients (on ``channel`` if given) due now.

        Fires with how many changed; fails with NoSuchMessage if it is not queued.
        """

    def flush(queue_ids: Iterable[str] | None = None, channel: str | None = None) -> Deferred[int]:
        """:meth:`flush_message` for each id (every message if None); fire with the total."""


class IHandoffStore(IStore):
    """The spool as the gateway workers' link needs it (:mod:`relay.handoff.spool_side`):
    answering a worker the moment its message is durable, not when the reactor gets to it."""

    def store(
        envelope: Envelope,
        text: bytes,
        *,
        on_durable: Callable[[str], object] | None = None,
        envelope_json: bytes | None = None,
    ) -> Deferred[str]:
        """As :meth:`IStore.store`; and ``on_durable(queue_id)``, if given, is called the
        moment the message is durable, possibly in another thread and before the Deferred
        fires (a busy reactor does not delay it): it must be quick, thread-safe and never
        block.  A gateway worker's link answers its worker from there.  It may return a
        callable: after every hook of the same sync has run, each distinct such callable
        is called once (in the same thread), so answers can go out one batch at a time.

        ``envelope_json``, if given, is bytes that ``relay.queue.payload.decode_envelope``
        reads as ``envelope`` (a worker's link decoded ``envelope`` from them): the
        spool may keep those bytes instead of encoding the envelope again."""


class IDeliverer(Interface):
    """MMDF's deliver: drives channels through the contract for every due recipient."""

    def wake() -> None:
        """New mail arrived or something fell due: look at the queue soon."""

    def flush(queue_ids: Iterable[str] | None = None, channel: str | None = None) -> Deferred[int]:
        """Make matching deferred recipients due now; fire with how many were."""


class ILocalRecipients(Interface):
    """Who can receive mail here: the local channel's users and aliases.

    The SMTP gateway asks it at RCPT time (so unknown local users get 550 5.1.1 during
    the SMTP dialogue, not a bounce later); the local channel answers from the same
    users, recipient delimiter and aliases it delivers with, so the two never disagree.
    """

    def exists(address: Address) -> bool:
        """True when ``address`` (in a local domain) names a user or an alias here."""


class IPhoneStore(Interface):
    """What the phone link keeps durably for each site it talks to.

    The link's engine (:mod:`relay.sansio.phone.session`) asks, its driver calls these
    and answers the engine when the Deferred fires.  Both directions of a call use it:

    * **to send**: :meth:`outgoing`, :meth:`read_text`, then :meth:`settle` with the
      receiver's replies.
    * **to receive, exactly once**: :meth:`accept` (is the id held already, how much of
      its text is held from an earlier call, which addresses are accepted),
      :meth:`write_text` for each piece, then :meth:`commit`.  The ids of committed
      messages are remembered durably per site, long enough to outlive any resend, so a
      re-proposal is answered "already have it"; the text of a cut-off message stays, so
      the next call resumes where it stopped.

    ``site`` is the peer's name on the link and ``message_id`` the peer's id for the
    message (both safe as file names).  Every Deferred that reports a change fires only
    once the change is durable.
    """

    def outgoing(site: str) -> Deferred[Sequence[Outgoing]]:
        """Fire with the messages held for ``site``, oldest first (id, envelope of the
        recipients still to do, text size and SHA-256)."""

    def read_text(site: str, message_id: str, offset: int, max_bytes: int) -> Deferred[bytes]:
        """Fire with up to ``max_bytes`` of an outgoing message's text from ``offset``."""

    def settle(site: str, message_id: str, replies: Sequence[Reply]) -> Deferred[None]:
        """Record the peer's reply for each recipient (envelope order): recipients with a
        success or a permanent failure are done, the others stay for the next call; a
        message with every recipient done is no longer outgoing."""

    def accept(site: str, message_id: str, envelope: Envelope, size: int) -> Deferred[Acceptance]:
        """Decide a proposal: a whole refusal (too big, over quota, not now), or a reply
        per recipient and the offset of the text held durably from an earlier call.

        For an id committed before, answer what the first answer said for each
        recipient, remembered durably with the id
        (:func:`relay.sansio.phone.session.held_acceptance`: ``ALREADY_HAVE`` for those
        accepted, the same refusal for the others), so a refusal whose final reply was
        lost with the line still reaches the sender."""

    def write_text(site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        """Keep a piece of an incoming message's text at ``offset`` (pieces come in order,
        the first at the offset :meth:`accept` named)."""

    def commit(
        site: str, message_id: str, envelope: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        """Check the whole text against ``size`` and ``digest`` (SHA-256), make the
        message durable for ``envelope`` (the recipients :meth:`accept` accepted),
        remember its id with the reply :meth:`accept` gave each recipient, and fire with
        the local queue id.  On a
        mismatch the partial text is dropped (the sender sends it all again) and the
        Deferred fails with :class:`relay.errors.DigestMismatch`."""

"""The session's records: what one side says to the other, one record per link record.

Theory of operation
-------------------
The link (:mod:`relay.sansio.phone.link`) carries records reliably and in order; this
module says what is inside one.  A record is one type byte and the fields of that type,
packed tightly, because every byte of overhead on a 115 200 bit/s line is a byte of mail
less: numbers are LEB128 varints, strings a varint length and UTF-8, a reply one byte
(MMDF reply values fit in one, as in ``mmdf.h``) and a short text.  Mail addresses travel
in their SMTP path form and are parsed back with the gateway's parser, so nothing reaches
the store that the parser would not accept.

:func:`decode` never raises anything but :class:`RecordError` (a
:class:`~relay.sansio.phone.errors.PhoneProtocolError`), whatever the bytes: every length
is checked against what is left and against a limit before anything is allocated.

The hello is the one record a later version must still be able to read, so its
capabilities are tag-length-value pairs and unknown tags are skipped; every other record
is strict (trailing bytes are an error).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path
from relay.envelope import BodyType, Envelope, Recipient, Submitter
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.errors import PhoneProtocolError

__all__ = [
    "DEFLATABLE",
    "DEFLATED",
    "DIGEST_SIZE",
    "NONCE_SIZE",
    "Abandon",
    "Abort",
    "Answer",
    "Capabilities",
    "Done",
    "FinalReply",
    "Hello",
    "Inventory",
    "InventoryItem",
    "MailEnvelope",
    "Proof",
    "Propose",
    "Record",
    "RecordError",
    "Role",
    "Text",
    "decode",
    "encode",
    "proof_terms",
    "valid_message_id",
]

NONCE_SIZE: Final = 32
DIGEST_SIZE: Final = 32  # SHA-256 of a message's text
MAC_SIZE: Final = 32  # HMAC-SHA256
MAX_NAME = 64
MAX_MESSAGE_ID = 128
MAX_REPLY_TEXT = 200
MAX_RECIPIENTS = 1000
MAX_INVENTORY = 10_000
MAX_VARINT = (1 << 63) - 1
DEFLATED: Final = 0x18
"""The type byte of a deflated record: the inflated bytes are one record of the types in
:data:`DEFLATABLE`."""

_MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RecordError(PhoneProtocolError):
    """A record that cannot be read: truncated, oversized, of an unknown type or value."""


class Role(enum.Enum):
    """Which end of the call: the one that dialled or the one that answered."""

    CALLER = 1
    ANSWERER = 2

    @property
    def other(self) -> Role:
        """The peer's role."""
        return Role.ANSWERER if self is Role.CALLER else Role.CALLER


def valid_message_id(text: str) -> bool:
    """True for an id the protocol carries: short, ASCII, safe as a file name."""
    return len(text) <= MAX_MESSAGE_ID and _MESSAGE_ID.fullmatch(text) is not None


# --- the records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one side can do: link limits, the largest message it takes, its options."""

    min_frame_payload: int
    max_frame_payload: int
    window: int
    max_record: int
    max_message_size: int
    compression: bool
    encryption: bool
    resume: bool = True


@dataclass(frozen=True, slots=True)
class Hello:
    """The first record each side sends, at once: who it is, its nonce, what it can do."""

    major: int
    minor: int
    role: Role
    name: str
    nonce: bytes
    capabilities: Capabilities

    def __post_init__(self) -> None:
        if not (0 <= self.major <= 255 and 0 <= self.minor <= 255):
            raise ValueError("a version number is one byte")
        if len(self.name) > MAX_NAME or _SITE_NAME.fullmatch(self.name) is None:
            raise ValueError(f"bad site name: {self.name!r}")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("a nonce is 32 bytes")


@dataclass(frozen=True, slots=True)
class Proof:
    """HMAC-SHA256 over both hellos with the site's secret: proves the sender knows it.

    ``capabilities``, sent only by the answerer and only when they differ from its
    hello's: what it offers now that it knows who calls (its settings for that site);
    its proof covers them too.
    """

    mac: bytes
    capabilities: Capabilities | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    """The sender is hanging up because of ``reply`` (version, protocol, local trouble)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class InventoryItem:
    """One message the sender holds for the peer."""

    message_id: str
    size: int


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything the sender will propose in this call (sent once the peer is proven)."""

    items: tuple[InventoryItem, ...]


@dataclass(frozen=True, slots=True)
class MailEnvelope:
    """The envelope as it crosses the line: no submitter (the receiver writes its own)."""

    return_path: Address | None
    recipients: tuple[Recipient, ...]
    arrival: float
    body_type: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    env_id: str | None = None

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> MailEnvelope:
        """The parts of a spool envelope that travel (routes are the receiver's business)."""
        recipients = tuple(Recipient(r.address, None, r.original) for r in envelope.recipients)
        return cls(
            envelope.return_path,
            recipients,
            envelope.arrival,
            envelope.body_type,
            envelope.smtputf8,
            envelope.env_id,
        )

    def to_envelope(self, submitter: Submitter) -> Envelope:
        """A spool envelope for what arrived, with the receiver's own submitter."""
        return Envelope(
            self.return_path,
            self.recipients,
            self.arrival,
            submitter,
            self.body_type,
            self.smtputf8,
            self.env_id,
        )


@dataclass(frozen=True, slots=True)
class Propose:
    """A message offered as job ``job``: its id, text size, SHA-256 and envelope."""

    job: int
    message_id: str
    size: int
    digest: bytes
    envelope: MailEnvelope


@dataclass(frozen=True, slots=True)
class Answer:
    """The receiver's answer to a proposal.

    ``whole`` set: the message as a whole is refused or deferred (too big, over quota,
    not now) or already held (a success reply); no text follows.  Otherwise one reply per
    recipient, in order, and ``offset``: where the text is to start (a resumed message).
    """

    job: int
    recipients: tuple[Reply, ...] = ()
    offset: int = 0
    whole: Reply | None = None


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of job ``job``'s text, deflated when ``compressed`` (see compress.py)."""

    job: int
    compressed: bool
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FinalReply:
    """The receiver's final reply to a job; success only once the message is durable."""

    job: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Abandon:
    """The sender gives up a job whose text it cannot read; the receiver keeps its part."""

    job: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Done:
    """Hang-up: the sender will propose nothing more and has sent all its text."""


Record = Hello | Proof | Abort | Inventory | Propose | Answer | Text | FinalReply | Abandon | Done


class _Type(enum.IntEnum):
    HELLO = 0x01
    PROOF = 0x02
    ABORT = 0x03
    INVENTORY = 0x10
    PROPOSE = 0x11
    ANSWER = 0x12
    TEXT = 0x13
    TEXT_COMPRESSED = 0x14
    FINAL = 0x15
    ABANDON = 0x16
    DONE = 0x17
    DEFLATED = 0x18  # a proposal or the inventory, deflated (see compress.py)


# --- primitive writer and reader ------------------------------------------------------------


class _Writer:
    __slots__ = ("out",)

    def __init__(self, kind: _Type) -> None:
        self.out = bytearray((kind,))

    def u8(self, value: int) -> None:
        self.out.append(value)

    def varint(self, value: int) -> None:
        if not 0 <= value <= MAX_VARINT:
            raise ValueError(f"varint out of range: {value}")
        while value > 0x7F:
            self.out.append((value & 0x7F) | 0x80)
            value >>= 7
        self.out.append(value)

    def blob(self, data: bytes) -> None:
        self.varint(len(data))
        self.out += data

    def text(self, value: str) -> None:
        self.blob(value.encode("utf-8"))

    def optional_text(self, value: str | None) -> None:
        if value is None:
            self.u8(0)
        else:
            self.u8(1)
            self.text(value)

    def f64(self, value: float) -> None:
        self.out += struct.pack(">d", value)

    def reply(self, reply: Reply) -> None:
        self.u8(reply.code.value)
        self.text(reply.text[:MAX_REPLY_TEXT])


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 1

    def need(self, n: int) -> None:
        if n > len(self.data) - self.pos:
            raise RecordError("record truncated")

    def u8(self) -> int:
        self.need(1)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self, limit: int = MAX_VARINT) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise RecordError("number too long")
        if value > limit:
            raise RecordError(f"number {value} over the limit {limit}")
        return value

    def raw(self, n: int) -> bytes:
        self.need(n)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def blob(self, limit: int) -> bytes:
        return self.raw(self.varint(limit))

    def text(self, limit: int) -> str:
        try:
            return self.blob(limit * 4).decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("text is not UTF-8") from None

    def optional_text(self, limit: int) -> str | None:
        flag = self.u8()
        if flag > 1:
            raise RecordError("bad optional flag")
        return self.text(limit) if flag else None

    def boolean(self) -> bool:
        flag = self.u8()
        if flag > 1:
            raise RecordError("bad boolean")
        return flag == 1

    def f64(self) -> float:
        (value,) = struct.unpack(">d", self.raw(8))
        if value != value or value in (float("inf"), float("-inf")):
            raise RecordError("time is not a finite number")
        return float(value)

    def reply(self) -> Reply:
        code = self.u8()
        try:
            reply_code = ReplyCode(code)
        except ValueError:
            raise RecordError(f"unknown reply value 0{code:o}") from None
        text = self.text(MAX_REPLY_TEXT)
        try:
            return Reply(reply_code, _printable(text))
        except ValueError as e:
            raise RecordError(f"bad reply: {e}") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise RecordError("trailing bytes after the record")


def _printable(text: str) -> str:
    """A peer's reply text with its control characters replaced (it is logged and stored)."""
    return "".join(c if c.isprintable() else "?" for c in text)


# --- encoding ------------------------------------------------------------------------------

_CAP_FRAMES = 1
_CAP_WINDOW = 2
_CAP_MAX_RECORD = 3
_CAP_MAX_MESSAGE = 4
_CAP_FLAGS = 5
_FLAG_COMPRESSION = 1
_FLAG_ENCRYPTION = 2
_FLAG_RESUME = 4
_BODY_TYPES = tuple(BodyType)


def _encode_capabilities(w: _Writer, caps: Capabilities) -> None:
    def tlv(tag: int, body: _Writer) -> None:
        w.u8(tag)
        w.blob(bytes(body.out[1:]))

    frames = _Writer(_Type.HELLO)
    frames.varint(caps.min_frame_payload)
    frames.varint(caps.max_frame_payload)
    tlv(_CAP_FRAMES, frames)
    for tag, value in (
        (_CAP_WINDOW, caps.window),
        (_CAP_MAX_RECORD, caps.max_record),
        (_CAP_MAX_MESSAGE, caps.max_message_size),
    ):
        one = _Writer(_Type.HELLO)
        one.varint(value)
        tlv(tag, one)
    flags = _Writer(_Type.HELLO)
    flags.varint(
        (_FLAG_COMPRESSION if caps.compression else 0)
        | (_FLAG_ENCRYPTION if caps.encryption else 0)
        | (_FLAG_RESUME if caps.resume else 0)
    )
    tlv(_CAP_FLAGS, flags)


def _encode_envelope(w: _Writer, env: MailEnvelope) -> None:
    w.text("" if env.return_path is None else env.return_path.smtp_path())
    w.varint(len(env.recipients))
    for r in env.recipients:
        w.text(r.address.smtp_path())
        w.optional_text(r.original)
    w.f64(env.arrival)
    w.u8(_BODY_TYPES.index(env.body_type))
    w.u8(1 if env.smtputf8 else 0)
    w.optional_text(env.env_id)


def _enc_hello(r: Hello) -> bytes:
    w = _Writer(_Type.HELLO)
    w.u8(r.major)
    w.u8(r.minor)
    w.u8(r.role.value)
    w.text(r.name)
    w.out += r.nonce
    _encode_capabilities(w, r.capabilities)
    return bytes(w.out)


def _enc_proof(r: Proof) -> bytes:
    w = _Writer(_Type.PROOF)
    w.out += r.mac
    if r.capabilities is not None:
        _encode_capabilities(w, r.capabilities)
    return bytes(w.out)


def proof_terms(raw: bytes) -> bytes:
    """The part of an encoded proof after its MAC (the capabilities it carries, if any),
    which the MAC covers."""
    return raw[1 + MAC_SIZE :]


def _enc_abort(r: Abort) -> bytes:
    w = _Writer(_Type.ABORT)
    w.reply(r.reply)
    return bytes(w.out)


def _enc_inventory(r: Inventory) -> bytes:
    w = _Writer(_Type.INVENTORY)
    w.varint(len(r.items))
    for item in r.items:
        w.text(item.message_id)
        w.varint(item.size)
    return bytes(w.out)


def _enc_propose(r: Propose) -> bytes:
    w = _Writer(_Type.PROPOSE)
    w.varint(r.job)
    w.text(r.message_id)
    w.varint(r.size)
    w.out += r.digest
    _encode_envelope(w, r.envelope)
    return bytes(w.out)


def _enc_answer(r: Answer) -> bytes:
    w = _Writer(_Type.ANSWER)
    w.varint(r.job)
    if r.whole is not None:
        w.u8(1)
        w.reply(r.whole)
    else:
        w.u8(0)
        w.varint(r.offset)
        w.varint(len(r.recipients))
        for reply in r.recipients:
            w.reply(reply)
    return bytes(w.out)


def _enc_text(r: Text) -> bytes:
    w = _Writer(_Type.TEXT_COMPRESSED if r.compressed else _Type.TEXT)
    w.varint(r.job)
    w.out += r.data
    return bytes(w.out)


def _enc_final(r: FinalReply) -> bytes:
    w = _Writer(_Type.FINAL)
    w.varint(r.job)
    w.reply(r.reply)
    return bytes(w.out)


def _enc_abandon(r: Abandon) -> bytes:
    w = _Writer(_Type.ABANDON)
    w.varint(r.job)
    w.reply(r.reply)
    return bytes(w.out)


def _enc_done(r: Done) -> bytes:
    return bytes((_Type.DONE,))


_ENCODERS: Final[dict[type, Callable[[object], bytes]]] = {
    Hello: _enc_hello,  # type: ignore[dict-item]
    Proof: _enc_proof,  # type: ignore[dict-item]
    Abort: _enc_abort,  # type: ignore[dict-item]
    Inventory: _enc_inventory,  # type: ignore[dict-item]
    Propose: _enc_propose,  # type: ignore[dict-item]
    Answer: _enc_answer,  # type: ignore[dict-item]
    Text: _enc_text,  # type: ignore[dict-item]
    FinalReply: _enc_final,  # type: ignore[dict-item]
    Abandon: _enc_abandon,  # type: ignore[dict-item]
    Done: _enc_done,  # type: ignore[dict-item]
}


def encode(record: Record) -> bytes:
    """The bytes of one record."""
    return _ENCODERS[type(record)](record)


# --- decoding ------------------------------------------------------------------------------


def _dec_capabilities(r: _Reader) -> Capabilities:
    values: dict[int, bytes] = {}
    while r.pos < len(r.data):
        tag = r.u8()
        body = r.blob(1024)
        values.setdefault(tag, body)  # unknown tags: a later minor version's, skipped
    missing = {_CAP_FRAMES, _CAP_WINDOW, _CAP_MAX_RECORD, _CAP_MAX_MESSAGE, _CAP_FLAGS} - set(
        values
    )
    if missing:
        raise RecordError(f"hello lacks capabilities {sorted(missing)}")

    def numbers(tag: int, count: int) -> list[int]:
        sub = _Reader(b"\0" + values[tag])
        out = [sub.varint() for _ in range(count)]
        return out

    min_frame, max_frame = numbers(_CAP_FRAMES, 2)
    (flags,) = numbers(_CAP_FLAGS, 1)
    return Capabilities(
        min_frame_payload=min_frame,
        max_frame_payload=max_frame,
        window=numbers(_CAP_WINDOW, 1)[0],
        max_record=numbers(_CAP_MAX_RECORD, 1)[0],
        max_message_size=numbers(_CAP_MAX_MESSAGE, 1)[0],
        compression=bool(flags & _FLAG_COMPRESSION),
        encryption=bool(flags & _FLAG_ENCRYPTION),
        resume=bool(flags & _FLAG_RESUME),
    )


def _dec_hello(r: _Reader) -> Hello:
    major, minor, role = r.u8(), r.u8(), r.u8()
    try:
        peer_role = Role(role)
    except ValueError:
        raise RecordError(f"unknown role {role}") from None
    name = r.text(MAX_NAME)
    nonce = r.raw(NONCE_SIZE)
    caps = _dec_capabilities(r)
    try:
        return Hello(major, minor, peer_role, name, nonce, caps)
    except ValueError as e:
        raise RecordError(f"bad hello: {e}") from None


def _dec_proof(r: _Reader) -> Proof:
    mac = r.raw(MAC_SIZE)
    if r.pos == len(r.data):
        return Proof(mac)
    return Proof(mac, _dec_capabilities(r))


def _dec_abort(r: _Reader) -> Abort:
    reply = r.reply()
    r.end()
    return Abort(reply)


def _message_id(r: _Reader) -> str:
    text = r.text(MAX_MESSAGE_ID)
    if not valid_message_id(text):
        raise RecordError(f"bad message id {text!r}")
    return text


def _dec_inventory(r: _Reader) -> Inventory:
    count = r.varint(MAX_INVENTORY)
    items = []
    for _ in range(count):
        message_id = _message_id(r)
        items.append(InventoryItem(message_id, r.varint()))
    r.end()
    return Inventory(tuple(items))


def _dec_envelope(r: _Reader) -> MailEnvelope:
    try:
        rp_text = r.text(300)
        return_path = None if rp_text == "" else parse_reverse_path(rp_text, smtputf8=True)
        count = r.varint(MAX_RECIPIENTS)
        if count == 0:
            raise RecordError("an envelope has at least one recipient")
        recipients = []
        for _ in range(count):
            address = parse_forward_path(r.text(300), smtputf8=True)
            original = r.optional_text(1000)
            if original is not None:
                original = _printable(original)
            recipients.append(Recipient(address, None, original))
        arrival = r.f64()
        body = r.u8()
        if body >= len(_BODY_TYPES):
            raise RecordError(f"unknown body type {body}")
        smtputf8 = r.boolean()
        env_id = r.optional_text(100)
        if env_id is not None:
            env_id = _printable(env_id)
    except AddressError as e:
        raise RecordError(f"bad address: {e}") from None
    return MailEnvelope(
        return_path, tuple(recipients), arrival, _BODY_TYPES[body], smtputf8, env_id
    )


def _dec_propose(r: _Reader) -> Propose:
    job = r.varint()
    message_id = _message_id(r)
    size = r.varint()
    digest = r.raw(DIGEST_SIZE)
    envelope = _dec_envelope(r)
    r.end()
    return Propose(job, message_id, size, digest, envelope)


def _dec_answer(r: _Reader) -> Answer:
    job = r.varint()
    kind = r.u8()
    if kind == 1:
        whole = r.reply()
        r.end()
        return Answer(job, whole=whole)
    if kind != 0:
        raise RecordError("bad answer kind")
    offset = r.varint()
    count = r.varint(MAX_RECIPIENTS)
    replies = tuple(r.reply() for _ in range(count))
    r.end()
    return Answer(job, replies, offset)


def _dec_text(r: _Reader, compressed: bool) -> Text:
    job = r.varint()
    return Text(job, compressed, r.data[r.pos :])


def _dec_final(r: _Reader) -> FinalReply:
    job = r.varint()
    reply = r.reply()
    r.end()
    return FinalReply(job, reply)


def _dec_abandon(r: _Reader) -> Abandon:
    job = r.varint()
    reply = r.reply()
    r.end()
    return Abandon(job, reply)


def _dec_done(r: _Reader) -> Done:
    r.end()
    return Done()


_DECODERS: Final[dict[int, Callable[[_Reader], Record]]] = {
    _Type.HELLO: _dec_hello,
    _Type.PROOF: _dec_proof,
    _Type.ABORT: _dec_abort,
    _Type.INVENTORY: _dec_inventory,
    _Type.PROPOSE: _dec_propose,
    _Type.ANSWER: _dec_answer,
    _Type.TEXT: lambda r: _dec_text(r, False),
    _Type.TEXT_COMPRESSED: lambda r: _dec_text(r, True),
    _Type.FINAL: _dec_final,
    _Type.ABANDON: _dec_abandon,
    _Type.DONE: _dec_done,
}


def decode(data: bytes) -> Record:
    """The record in ``data``; :class:`RecordError` for anything that is not one."""
    if not data:
        raise RecordError("empty record")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise RecordError(f"unknown record type {data[0]:#04x}")
    return decoder(_Reader(bytes(data)))


DEFLATABLE: Final = (Inventory, Propose)
"""The records sent deflated: long and much alike from one to the next."""

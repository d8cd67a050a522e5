"""The envelope of a message, and the state of each of its recipients.

The envelope is everything the relay knows about a message apart from its text: who
sent it, to whom it goes and by which channel, when it arrived, how it was submitted and
which transport properties (8BITMIME, SMTPUTF8) the text needs.  It is what the spool
writes beside the text and what the deliverer reads without opening the text.

Values are small frozen dataclasses.  Serialisation lives here, in one place, as plain
JSON-compatible dicts: the spool chooses the framing (and the checksum), this module
chooses the field names, so a record written by one version is readable by the next.
Addresses are stored in their SMTP path form and parsed back with the same parser the
gateway uses, so nothing reaches the spool that the parser would not accept.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path
from relay.reply import Reply, ReplyCode

__all__ = [
    "BodyType",
    "Destination",
    "Envelope",
    "EnvelopeError",
    "Recipient",
    "RecipientState",
    "RecipientStatus",
    "Submitter",
]


class EnvelopeError(ValueError):
    """A serialised envelope or status that cannot be read back; names the field."""


class BodyType(enum.Enum):
    """What the text needs from the transport (RFC 6152 / RFC 3030 BODY=)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"
    BINARY_MIME = "BINARYMIME"


_BAD_CHANNEL = re.compile("[\0\r\n/ ]")
_BAD_HOST = re.compile("[\0\r\n]")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a recipient goes: the channel's name and, within it, the destination key.

    The key is what MMDF calls the host: the unit of sessions, concurrency and dead-host
    marking.  For SMTP it is the domain (looked up by MX) or the smarthost; for phone the
    site's name; for local the empty string (there is only one local "host").
    """

    channel: str
    host: str

    def __post_init__(self) -> None:
        if not self.channel or _BAD_CHANNEL.search(self.channel):
            raise ValueError(f"bad channel name: {self.channel!r}")
        if _BAD_HOST.search(self.host):
            raise ValueError(f"bad destination host: {self.host!r}")

    def __str__(self) -> str:
        return f"{self.channel}:{self.host}" if self.host else self.channel


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient of a message: the address, where it goes, and DSN details.

    ``destination`` is None when the recipient has not been routed yet (the deliverer
    routes it from the configuration); ``original`` is the address the sender wrote
    (RFC 3461 ORCPT), reported in a DSN when an alias rewrote it.
    """

    address: Address
    destination: Destination | None = None
    original: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form for the spool."""
        out: dict[str, Any] = {"address": self.address.smtp_path()}
        if self.destination is not None:
            out["channel"] = self.destination.channel
            out["host"] = self.destination.host
        if self.original is not None:
            out["original"] = self.original
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipient:
        """Read back what :meth:`to_dict` wrote; raises EnvelopeError naming the field."""
        get = data.get
        address, channel, host, original = get("address"), get("channel"), get("host"), None
        if (
            type(data) is dict
            and type(address) is str
            and (channel is None or (type(channel) is str and type(host) is str))
            and ((original := get("original")) is None or type(original) is str)
        ):  # the usual case, checked at once; anything else takes the way that names it
            path = _forward_path(address, "recipient address")  # first, as below
            destination = (
                None if channel is None else _build(Destination, "destination", channel, host)
            )
            return cls(path, destination, original)
        address = _forward_path(_get(data, "address", str), "recipient address")
        channel = _get_optional(data, "channel", str)
        destination = None
        if channel is not None:
            destination = _build(Destination, "destination", channel, _get(data, "host", str))
        return cls(address, destination, _get_optional(data, "original", str))


@dataclass(frozen=True, slots=True)
class Submitter:
    """How the message came in: for the Received: header, logs and policy."""

    protocol: str  # "ESMTP", "ESMTPS", "ESMTPSA", "local", "phone", …
    client_address: str | None = None
    client_name: str | None = None
    helo: str | None = None
    auth_user: str | None = None
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form for the spool (None fields left out)."""
        return {k: v for k in _SUBMITTER_FIELDS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Submitter:
        """Read back what :meth:`to_dict` wrote."""
        fast: list[Any] = [data.get(k) for k in _SUBMITTER_FIELDS]
        if (
            type(data) is dict
            and type(fast[0]) is str
            and all(v is None or type(v) is str for v in fast)
        ):
            return cls(*fast)  # the usual case; anything else takes the way that names it
        values = {k: _get_optional(data, k, str) for k in _SUBMITTER_FIELDS}
        if values["protocol"] is None:
            raise EnvelopeError("submitter.protocol: missing")
        return cls(**values)


_SUBMITTER_FIELDS = ("protocol", "client_address", "client_name", "helo", "auth_user", "tls")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message's envelope: return path, recipients, arrival and transport needs.

    ``return_path`` is None for the null reverse-path ``<>`` (bounces): such mail is
    never bounced itself.  ``arrival`` is seconds since the epoch.
    """

    return_path: Address | None
    recipients: tuple[Recipient, ...]
    arrival: float
    submitter: Submitter
    body_type: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    env_id: str | None = None  # RFC 3461 ENVID

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("an envelope has at least one recipient")

    @property
    def sender_text(self) -> str:
        """The return path as text for logs: ``<>`` for the null sender."""
        return "<>" if self.return_path is None else str(self.return_path)

    def with_recipients(self, recipients: tuple[Recipient, ...]) -> Envelope:
        """The same envelope for other recipients (used when aliases expand)."""
        return replace(self, recipients=recipients)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form for the spool."""
        out: dict[str, Any] = {
            "return_path": "<>" if self.return_path is None else self.return_path.smtp_path(),
            "recipients": [r.to_dict() for r in self.recipients],
            "arrival": self.arrival,
            "submitter": self.submitter.to_dict(),
            "body_type": self.body_type.value,
            "smtputf8": self.smtputf8,
        }
        if self.env_id is not None:
            out["env_id"] = self.env_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Envelope:
        """Read back what :meth:`to_dict` wrote; raises EnvelopeError naming the field."""
        if not isinstance(data, Mapping):
            raise EnvelopeError("envelope: expected an object")
        fast = _from_dict_fast(cls, data)
        if fast is not None:
            return fast
        return_path = _reverse_path(_get(data, "return_path", str))
        raw_recipients = _get(data, "recipients", list)
        recipients = tuple(
            Recipient.from_dict(_as_mapping(r, "recipients")) for r in raw_recipients
        )
        # Converted before the submitter is read, in the order the fast path checks them.
        arrival = _seconds(_get(data, "arrival", (int, float)))
        submitter = Submitter.from_dict(_as_mapping(_get(data, "submitter", dict), "submitter"))
        body = _get(data, "body_type", str)
        try:
            body_type = BodyType(body)
        except ValueError as e:
            raise EnvelopeError(f"body_type: unknown value {body!r}") from e
        envelope: Envelope = _build(
            cls,
            "envelope",
            return_path,
            recipients,
            arrival,
            submitter,
            body_type,
            _get(data, "smtputf8", bool),
            _get_optional(data, "env_id", str),
        )
        return envelope


def _from_dict_fast(cls: type[Envelope], data: Mapping[str, Any]) -> Envelope | None:
    """The usual envelope, its field types checked at once: the spool reads one per message
    and a gateway worker's link one per message handed over.  None for anything unusual,
    which :meth:`Envelope.from_dict` then reads field by field, naming what is wrong."""
    if type(data) is not dict:
        return None
    fields: list[Any] = [data.get(key) for key in _ENVELOPE_FIELDS]
    return_path, recipients, arrival, submitter, body, smtputf8, env_id = fields
    if not (
        type(return_path) is str
        and type(recipients) is list
        and recipients
        and all(type(r) is dict for r in recipients)
        and type(arrival) in (float, int)
        and type(submitter) is dict
        and type(body) is str
        and type(smtputf8) is bool
        and (env_id is None or type(env_id) is str)
    ):
        return None
    body_type = _BODY_TYPES.get(body)
    if body_type is None:
        return None
    envelope: Envelope = _build(
        cls,
        "envelope",
        _reverse_path(return_path),
        tuple(Recipient.from_dict(r) for r in recipients),
        _seconds(arrival),
        Submitter.from_dict(submitter),
        body_type,
        smtputf8,
        env_id,
    )
    return envelope


_ENVELOPE_FIELDS = (
    "return_path",
    "recipients",
    "arrival",
    "submitter",
    "body_type",
    "smtputf8",
    "env_id",
)
_BODY_TYPES = {member.value: member for member in BodyType}


class RecipientState(enum.Enum):
    """Where a recipient stands in the queue."""

    PENDING = "pending"  # never tried, or due now
    DEFERRED = "deferred"  # tried, failed temporarily, due again at next_attempt
    DELIVERED = "delivered"  # final: a channel said MOK (or AOK + final OK)
    FAILED = "failed"  # final: bounced (permanent failure or lifetime exceeded)
    HELD = "held"  # put on hold by the operator; not tried until released

    @property
    def is_final(self) -> bool:
        """Delivered and failed are final; a message whose recipients are all final is done."""
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """The per-recipient record the queue keeps: state, attempts, next try, last reply."""

    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_reply: Reply | None = None
    warned: bool = False  # a delay DSN has been sent for this recipient
    updated: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form for the spool."""
        out: dict[str, Any] = {"state": self.state.value, "attempts": self.attempts}
        if self.next_attempt is not None:
            out["next_attempt"] = self.next_attempt
        if self.last_reply is not None:
            out["reply"] = reply_to_dict(self.last_reply)
        if self.warned:
            out["warned"] = True
        if self.updated is not None:
            out["updated"] = self.updated
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipientStatus:
        """Read back what :meth:`to_dict` wrote; raises EnvelopeError naming the field."""
        state_name = _get(data, "state", str)
        try:
            state = RecipientState(state_name)
        except ValueError as e:
            raise EnvelopeError(f"state: unknown value {state_name!r}") from e
        reply_data = _get_optional(data, "reply", dict)
        next_attempt = _get_optional(data, "next_attempt", (int, float))
        updated = _get_optional(data, "updated", (int, float))
        return cls(
            state=state,
            attempts=_get(data, "attempts", int),
            next_attempt=None if next_attempt is None else float(next_attempt),
            last_reply=None if reply_data is None else reply_from_dict(reply_data),
            warned=bool(_get_optional(data, "warned", bool)),
            updated=None if updated is None else float(updated),
        )


def reply_to_dict(reply: Reply) -> dict[str, Any]:
    """A reply as a JSON-compatible dict: the MMDF name and whatever the peer said."""
    out: dict[str, Any] = {"code": reply.code.name, "text": reply.text}
    if reply.smtp_code is not None:
        out["smtp"] = reply.smtp_code
    if reply.enhanced is not None:
        out["enhanced"] = reply.enhanced
    return out


def reply_from_dict(data: Mapping[str, Any]) -> Reply:
    """Read back what :func:`reply_to_dict` wrote; raises EnvelopeError naming the field."""
    name = _get(data, "code", str)
    try:
        code = ReplyCode[name]
    except KeyError as e:
        raise EnvelopeError(f"reply.code: unknown value {name!r}") from e
    reply: Reply = _build(
        Reply,
        "reply",
        code,
        _get(data, "text", str),
        _get_optional(data, "smtp", int),
        _get_optional(data, "enhanced", str),
    )
    return reply


def _seconds(value: float) -> float:
    """A time from JSON as a float (an integer too big for one is an error, not a crash)."""
    try:
        return float(value)
    except OverflowError:
        raise EnvelopeError("arrival: out of range") from None


def _reverse_path(text: str) -> Address | None:
    try:
        return parse_reverse_path(text, smtputf8=True)
    except AddressError as e:
        raise EnvelopeError(f"return_path: {e}") from e


def _forward_path(text: str, what: str) -> Address:
    try:
        return parse_forward_path(text, smtputf8=True)
    except AddressError as e:
        raise EnvelopeError(f"{what}: {e}") from e


def _as_mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise EnvelopeError(f"{what}: expected an object")
    return value


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """A required field of the given JSON type (bool is not taken for int)."""
    if key not in data:
        raise EnvelopeError(f"{key}: missing")
    return _check(key, data[key], kind)


def _get_optional(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """An optional field: None when absent or null."""
    value = data.get(key)
    return None if value is None else _check(key, value, kind)


def _check(key: str, value: object, kind: type | tuple[type, ...]) -> object:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise EnvelopeError(f"{key}: expected {_kind_name(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise EnvelopeError(f"{key}: expected {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _build(cls: Any, what: str, *args: Any) -> Any:
    """Construct a value, turning its own validation errors into EnvelopeError."""
    try:
        return cls(*args)
    except (ValueError, TypeError) as e:
        raise EnvelopeError(f"{what}: {e}") from e

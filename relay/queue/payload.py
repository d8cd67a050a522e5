"""What the spool's records say: the payload of each record type, both ways.

:mod:`relay.queue.record` frames and checksums bytes; this module gives them meaning.
A MESSAGE payload is binary because the text is kept exactly as received and must be
readable later by offset, without parsing anything in front of it::

    u8 id length | queue id (ASCII) | u32 envelope length | envelope JSON | text

STATUS and DONE payloads are small JSON objects.  A STATUS record always carries the
state of *every* recipient of its message, never a delta: the newest STATUS record of a
message is then its whole state, which is what lets the spool delete an old segment
after copying forward only the newest record of each live message (see
:mod:`relay.queue.state`).  The envelope and statuses use the field names of
:mod:`relay.envelope`, so the spool does not define its own.

Decoding raises :class:`PayloadError` (and nothing else) for any payload it cannot read,
so recovery can quarantine the record and go on.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay.envelope import Envelope, EnvelopeError, RecipientStatus
from relay.queue.queueid import is_valid_queue_id

__all__ = [
    "DoneReason",
    "MessagePrefix",
    "PayloadError",
    "decode_done",
    "decode_envelope",
    "decode_message_prefix",
    "decode_status",
    "encode_done",
    "encode_envelope",
    "encode_message_prefix",
    "encode_status",
]

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")

Buffer = bytes | bytearray | memoryview


class PayloadError(ValueError):
    """A record whose checksum is sound but whose payload cannot be understood."""


@dataclass(frozen=True, slots=True)
class MessagePrefix:
    """The part of a MESSAGE payload before the text, and where the text starts."""

    queue_id: str
    envelope_json: bytes
    text_start: int  # offset of the text within the payload


class DoneReason:
    """Why a message left the queue (kept in the DONE record for the logs)."""

    FINAL = "final"  # every recipient delivered or failed
    REMOVED = "removed"  # the operator removed it


def encode_envelope(envelope: Envelope) -> bytes:
    """The envelope as compact UTF-8 JSON (SMTPUTF8 addresses stay readable)."""
    return _ENVELOPE_ENCODER.encode(envelope.to_dict()).encode()


# Made once: json.dumps with these options builds a new JSONEncoder on every call (it
# reuses its default one only for default options), a sizeable part of the cost for
# an envelope, and every message is encoded once on its way in.
_ENVELOPE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def decode_envelope(data: Buffer) -> Envelope:
    """Read back :func:`encode_envelope`."""
    try:
        return Envelope.from_dict(json.loads(bytes(data).decode()))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge numbers, EnvelopeError
        raise PayloadError(f"unreadable envelope: {e}") from e


def encode_message_prefix(queue_id: str, envelope_json: bytes) -> bytes:
    """Everything of a MESSAGE payload in front of the text."""
    qid = queue_id.encode("ascii")
    return _U8.pack(len(qid)) + qid + _U32.pack(len(envelope_json)) + envelope_json


def decode_message_prefix(payload: Buffer) -> MessagePrefix:
    """Split a MESSAGE payload's prefix off; the text is ``payload[text_start:]``."""
    size = len(payload)
    if size < 1:
        raise PayloadError("message payload: empty")
    (qid_len,) = _U8.unpack_from(payload, 0)
    env_at = 1 + qid_len + _U32.size
    if env_at > size:
        raise PayloadError("message payload: cut in the queue id")
    queue_id = _queue_id(bytes(payload[1 : 1 + qid_len]))
    (env_len,) = _U32.unpack_from(payload, 1 + qid_len)
    text_start = env_at + env_len
    if text_start > size:
        raise PayloadError("message payload: cut in the envelope")
    return MessagePrefix(queue_id, bytes(payload[env_at:text_start]), text_start)


def encode_status(queue_id: str, statuses: Sequence[RecipientStatus]) -> bytes:
    """A STATUS payload: the state of every recipient, by index."""
    body = {"id": queue_id, "recipients": [s.to_dict() for s in statuses]}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode_status(payload: Buffer) -> tuple[str, tuple[RecipientStatus, ...]]:
    """Read back :func:`encode_status`."""
    data = _json_object(payload, "status")
    raw = data.get("recipients")
    if not isinstance(raw, list) or not raw:
        raise PayloadError("status payload: recipients must be a non-empty list")
    try:
        statuses = tuple(RecipientStatus.from_dict(_as_object(r)) for r in raw)
    except (EnvelopeError, ValueError, TypeError) as e:
        raise PayloadError(f"status payload: {e}") from e
    return _id_of(data), statuses


def encode_done(queue_id: str, reason: str) -> bytes:
    """A DONE payload: the message with this id is gone."""
    return json.dumps({"id": queue_id, "why": reason}, separators=(",", ":")).encode()


def decode_done(payload: Buffer) -> tuple[str, str]:
    """Read back :func:`encode_done`: (queue id, reason)."""
    data = _json_object(payload, "done")
    why = data.get("why", "")
    return _id_of(data), why if isinstance(why, str) else ""


def _json_object(payload: Buffer, what: str) -> dict[str, Any]:
    try:
        data = json.loads(bytes(payload).decode())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5000-digit number
        raise PayloadError(f"{what} payload: {e}") from e
    return _as_object(data)


def _as_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError("expected a JSON object")
    return value


def _id_of(data: dict[str, Any]) -> str:
    qid = data.get("id")
    if not isinstance(qid, str):
        raise PayloadError("payload: id missing")
    return _queue_id(qid.encode("ascii", "replace"))


def _queue_id(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise PayloadError("queue id: not ASCII") from e
    if not is_valid_queue_id(text):
        raise PayloadError(f"queue id: malformed {text!r}")
    return text

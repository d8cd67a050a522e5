"""The frames between a gateway worker process and the spool's process (sans-I/O).

A worker runs SMTP sessions but owns no spool: each message it accepts travels to the
spool's process in a ``STORE`` frame, and the ``250`` goes to the client only when the
answer (``STORED`` with the queue id, after the fsync) comes back.  The spool's process
opens the conversation with ``HELLO``, which carries everything the worker needs to build
the same gateway as the spool's process runs (the configuration's text, among others).

Each frame is one string of Twisted's ``Int32StringReceiver`` (a 4-byte big-endian
length, then the payload; Twisted does that framing), or, for the STOREDs the spool's
writer thread sends early, one datagram holding one or more such framed frames (all of
one sync's answers to a worker at once: :func:`unframed` splits them).  The payload is
one kind byte, then

* ``H`` HELLO: UTF-8 JSON (:class:`Hello`);
* ``S`` STORE: request number (u32), envelope length (u32), the envelope as the spool
  encodes it (:func:`relay.queue.payload.encode_envelope`), then the message text;
* ``K`` STORED: request number (u32), the queue id (ASCII);
* ``F`` FAILED: request number (u32), a disk-full flag (u8), a UTF-8 reason;
* ``R`` READY: ``1`` (the worker takes new connections) or ``0`` (it does not: full or
  stopping);
* ``N`` SESSIONS: UTF-8 JSON ``{"open": n, "refused": {reason: count}}``, the worker's
  SMTP sessions open now and those it refused since it started (for the metrics; sent
  at most once a second, when they changed);
* ``A`` AUTH (worker → spool): request number (u32), then the client's address (UTF-8,
  1 to 255 bytes): may this client have a password checked now?  The spool's process
  holds the relay's one failed-AUTH count (:class:`relay.gateway.limits.AuthThrottle`);
* ``V`` VERDICT (spool → worker): request number (u32), allowed (u8), the client's
  failures in the window (u32), its attempts being checked (u32), the window in
  seconds (IEEE 754 double, finite and positive).  An allowed attempt is counted from
  then on, until the worker sends
* ``E`` ENDED (worker → spool): failed (u8), then the client's address (UTF-8, 1 to
  255 bytes).  If the link drops first, the spool's process counts the attempts it
  allowed on it as failed: a password may have been checked.

Anything else, or a frame whose parts do not add up, is a :class:`HandoffError`: both
ends then drop the connection (the worker exits and is started again), since a peer that
sends garbage on a private socket is a bug, not a client to argue with.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from relay.errors import RelayError
from relay.gateway.limits import AuthVerdict
from relay.queue.queueid import is_valid_queue_id

__all__ = [
    "MAX_ACK_DATAGRAM",
    "MAX_CLIENT",
    "AuthAnswer",
    "AuthBegin",
    "AuthEnd",
    "Frame",
    "HandoffError",
    "Hello",
    "Ready",
    "Sessions",
    "StoreFailed",
    "StoreRequest",
    "Stored",
    "decode",
    "encode",
    "framed",
    "unframed",
]

_U32 = struct.Struct(">I")
_STORE = struct.Struct(">II")
_FAILED = struct.Struct(">IB")
_VERDICT = struct.Struct(">IBIId")
MAX_CLIENT = 255  # bytes of a client's address in AUTH frames (an IPv6 one has ~45)
MAX_REQUEST = 0xFFFFFFFF
MAX_ACK_DATAGRAM = 8192  # the spool's side sends at most this much in one datagram


class HandoffError(RelayError):
    """A frame that is not one this protocol knows, or one whose parts do not add up."""


@dataclass(frozen=True, slots=True)
class Hello:
    """What the spool's process tells a new worker: enough to build its gateway.

    ``config_text`` and ``base_dir`` are the configuration as the spool's process read it
    (so a worker never reads a file changed since); ``channels`` are the channels that
    run there (the router refuses mail for the others at RCPT); ``index`` names the
    worker in the log; ``processes`` is how many processes share the listeners, each
    taking that share of the session and memory limits.
    """

    config_text: str
    base_dir: str
    channels: tuple[str, ...]
    index: int
    processes: int


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """A message to store: the envelope as JSON (the spool's encoding) and the text."""

    request: int
    envelope_json: bytes
    text: bytes


@dataclass(frozen=True, slots=True)
class Stored:
    """The message of ``request`` is on disk under ``queue_id``."""

    request: int
    queue_id: str


@dataclass(frozen=True, slots=True)
class StoreFailed:
    """The message of ``request`` was not kept; ``disk_full`` picks 452 over 451."""

    request: int
    disk_full: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """Whether the worker takes new connections: it accepts on its sockets and has room.

    A worker says ``accepting=True`` once its gateway listens, ``False`` when its sessions
    near its share of ``max_sessions`` or when it is stopping, and ``True`` again when
    room comes back: the spool's process leaves the sockets to it only while it does.
    """

    accepting: bool = True


@dataclass(frozen=True, slots=True)
class Sessions:
    """A worker's SMTP sessions: open now, and refused since it started (by reason)."""

    open: int
    refused: dict[str, int]


@dataclass(frozen=True, slots=True)
class AuthBegin:
    """May ``client`` have a password checked now (request ``request``)?"""

    request: int
    client: str


@dataclass(frozen=True, slots=True)
class AuthAnswer:
    """The spool's process's verdict on the AUTH of ``request``."""

    request: int
    verdict: AuthVerdict


@dataclass(frozen=True, slots=True)
class AuthEnd:
    """An attempt of ``client``'s the spool's process allowed is done."""

    client: str
    failed: bool


Frame = (
    Hello
    | StoreRequest
    | Stored
    | StoreFailed
    | Ready
    | Sessions
    | AuthBegin
    | AuthAnswer
    | AuthEnd
)


def encode(frame: Frame) -> bytes:
    """The payload for ``frame`` (without the length prefix Twisted adds)."""
    if isinstance(frame, StoreRequest):
        head = _STORE.pack(frame.request, len(frame.envelope_json))
        return b"".join((b"S", head, frame.envelope_json, frame.text))
    if isinstance(frame, Stored):
        return b"K" + _U32.pack(frame.request) + frame.queue_id.encode("ascii")
    if isinstance(frame, Ready):
        return b"R1" if frame.accepting else b"R0"
    if isinstance(frame, StoreFailed):
        return b"F" + _FAILED.pack(frame.request, frame.disk_full) + frame.reason.encode()
    if isinstance(frame, Sessions):
        return b"N" + json.dumps({"open": frame.open, "refused": frame.refused}).encode()
    if isinstance(frame, AuthBegin):
        return b"A" + _U32.pack(frame.request) + frame.client.encode()
    if isinstance(frame, AuthAnswer):
        v = frame.verdict
        return b"V" + _VERDICT.pack(frame.request, v.allowed, v.failures, v.pending, v.window)
    if isinstance(frame, AuthEnd):
        return b"E" + (b"\x01" if frame.failed else b"\x00") + frame.client.encode()
    body = {
        "config_text": frame.config_text,
        "base_dir": frame.base_dir,
        "channels": list(frame.channels),
        "index": frame.index,
        "processes": frame.processes,
    }
    return b"H" + json.dumps(body).encode()


def framed(payload: bytes) -> bytes:
    """``payload`` with the length prefix ``Int32StringReceiver`` reads (4 bytes, big-endian)."""
    return _U32.pack(len(payload)) + payload


def unframed(data: bytes) -> list[bytes]:
    """The payloads of the framed frames that make up ``data`` (a datagram of answers).

    HandoffError if ``data`` does not split exactly into frames: a datagram arrives whole
    or not at all, so a cut one is a bug.
    """
    payloads: list[bytes] = []
    at = 0
    while at < len(data):
        if len(data) - at < _U32.size:
            raise HandoffError("datagram: a frame's length cut off")
        (length,) = _U32.unpack_from(data, at)
        at += _U32.size
        if length > len(data) - at:
            raise HandoffError("datagram: a frame longer than what is left")
        payloads.append(data[at : at + length])
        at += length
    return payloads


def decode(payload: bytes) -> Frame:
    """The frame in ``payload``; HandoffError if it is not a well-formed one."""
    kind = payload[:1]
    if kind == b"S":
        if len(payload) < 1 + _STORE.size:
            raise HandoffError("STORE frame too short")
        request, envelope_length = _STORE.unpack_from(payload, 1)
        start = 1 + _STORE.size
        if envelope_length > len(payload) - start:
            raise HandoffError("STORE frame: envelope longer than the frame")
        end = start + envelope_length
        return StoreRequest(request, payload[start:end], payload[end:])
    if kind == b"K":
        if len(payload) < 1 + _U32.size:
            raise HandoffError("STORED frame too short")
        (request,) = _U32.unpack_from(payload, 1)
        queue_id = payload[1 + _U32.size :].decode("ascii", "replace")
        if not is_valid_queue_id(queue_id):
            raise HandoffError("STORED frame: not a queue id")
        return Stored(request, queue_id)
    if kind == b"F":
        if len(payload) < 1 + _FAILED.size:
            raise HandoffError("FAILED frame too short")
        request, disk_full = _FAILED.unpack_from(payload, 1)
        if disk_full > 1:
            raise HandoffError("FAILED frame: disk-full flag is neither 0 nor 1")
        reason = payload[1 + _FAILED.size :].decode("utf-8", "replace")
        return StoreFailed(request, bool(disk_full), reason)
    if kind == b"R":
        if payload not in (b"R0", b"R1"):
            raise HandoffError("READY frame: not 0 or 1")
        return Ready(payload == b"R1")
    if kind == b"N":
        return _sessions(payload[1:])
    if kind == b"H":
        return _hello(payload[1:])
    if kind == b"A":
        if len(payload) < 1 + _U32.size:
            raise HandoffError("AUTH frame too short")
        (request,) = _U32.unpack_from(payload, 1)
        return AuthBegin(request, _client(payload[1 + _U32.size :], "AUTH"))
    if kind == b"V":
        return _verdict(payload)
    if kind == b"E":
        if payload[1:2] not in (b"\x00", b"\x01"):
            raise HandoffError("ENDED frame: failed flag is neither 0 nor 1")
        return AuthEnd(_client(payload[2:], "ENDED"), payload[1:2] == b"\x01")
    raise HandoffError(f"unknown frame kind {kind!r}")


def _hello(body: bytes) -> Hello:
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, a 5000-digit number
        raise HandoffError(f"HELLO frame: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise HandoffError("HELLO frame: not a JSON object")
    config_text, base_dir = data.get("config_text"), data.get("base_dir")
    channels, index, processes = data.get("channels"), data.get("index"), data.get("processes")
    if not isinstance(config_text, str) or not isinstance(base_dir, str):
        raise HandoffError("HELLO frame: config_text and base_dir must be strings")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise HandoffError("HELLO frame: channels must be a list of strings")
    if not _count(index, 0) or not _count(processes, 1):
        raise HandoffError("HELLO frame: index and processes must be counts")
    assert isinstance(index, int) and isinstance(processes, int)
    return Hello(config_text, base_dir, tuple(channels), index, processes)


def _client(data: bytes, name: str) -> str:
    if not 0 < len(data) <= MAX_CLIENT:
        raise HandoffError(f"{name} frame: the client's address must be 1-{MAX_CLIENT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HandoffError(f"{name} frame: the client's address is not UTF-8") from None


def _verdict(payload: bytes) -> AuthAnswer:
    if len(payload) != 1 + _VERDICT.size:
        raise HandoffError("VERDICT frame: wrong length")
    request, allowed, failures, pending, window = _VERDICT.unpack_from(payload, 1)
    if allowed > 1:
        raise HandoffError("VERDICT frame: allowed flag is neither 0 nor 1")
    if not (math.isfinite(window) and window > 0):
        raise HandoffError("VERDICT frame: the window must be a positive number of seconds")
    return AuthAnswer(request, AuthVerdict(bool(allowed), failures, pending, window))


def _sessions(body: bytes) -> Sessions:
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise HandoffError(f"SESSIONS frame: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise HandoffError("SESSIONS frame: not a JSON object")
    open_, refused = data.get("open"), data.get("refused")
    if not _number(open_) or not isinstance(refused, dict) or len(refused) > 16:
        raise HandoffError("SESSIONS frame: open must be a count, refused an object")
    if not all(isinstance(k, str) and len(k) <= 64 and _number(v) for k, v in refused.items()):
        raise HandoffError("SESSIONS frame: refused must map reasons to counts")
    assert isinstance(open_, int)
    return Sessions(open_, dict(refused))


def _number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= 1024

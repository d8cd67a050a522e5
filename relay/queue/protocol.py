"""The control protocol: what ``relay queue`` asks and what it gets back, as JSON lines.

One request per line, one response per line, UTF-8 JSON objects::

    {"op": "list"}                                  -> {"ok": true, "messages": [...]}
    {"op": "status"}                                -> {"ok": true, "status": {...}}
    {"op": "show", "id": "0615E2A4C1B3F0"}          -> {"ok": true, "message": {...}}
    {"op": "rm" | "hold" | "release", "ids": [...]} -> {"ok": true, "results": [...]}
    {"op": "call", "site": "site-b"}                -> {"ok": true, "call": {...}}
    {"op": "flush", "ids": [...] | null, "channel": "smtp" | null}
                          ids given                 -> {"ok": true, "results": [...]}
                          ids null (all messages)   -> {"ok": true, "changed": 3}

Each result is ``{"id": ..., "ok": true, "changed": n}`` or ``{"id": ..., "ok": false,
"error": "...", "reason": ...}``; a request that cannot be carried out at all gets
``{"ok": false, "error": "...", "reason": ...}``.  ``reason`` is one of :data:`REASONS`,
so the command can choose its exit code without reading the text.  The messages are
:func:`relay.queue.view.summary` objects; a status is ``{"daemon": {...}, "queue":
{...}}``: the queue part from :func:`relay.queue.view.queue_status`, the daemon part
from the running relay (:mod:`relay.report`), or ``{"running": false}`` when a command
read the spool itself.

The daemon's socket server and the command's direct path both parse requests here, so
the two accept exactly the same things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relay.errors import SpoolError
from relay.queue.queueid import is_valid_queue_id
from relay.queue.state import NoSuchMessage

__all__ = [
    "MAX_LINE",
    "OPS",
    "READ_ONLY_OPS",
    "REASONS",
    "ProtocolError",
    "Request",
    "decode_line",
    "encode_line",
    "error_response",
    "failed_result",
    "parse_request",
    "reason_of",
    "result",
]

MAX_LINE = 4 * 1024 * 1024  # a request or response line; ``list`` of a big queue is long
OPS = ("list", "show", "rm", "hold", "release", "flush", "status", "call")
READ_ONLY_OPS = ("list", "show", "status")
REASONS = ("not-found", "spool", "bad-request", "failed")


class ProtocolError(ValueError):
    """A request (or response) that does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: the operation, the ids it is about, the channel for flush."""

    op: str
    ids: tuple[str, ...] | None = None
    channel: str | None = None
    site: str | None = None  # for call: the phone site to call

    def to_json(self) -> dict[str, Any]:
        """The request as it goes on the wire."""
        out: dict[str, Any] = {"op": self.op}
        if self.op == "show":
            out["id"] = self.ids[0] if self.ids else None
        elif self.op == "call":
            out["site"] = self.site
        elif self.op not in ("list", "status"):
            out["ids"] = None if self.ids is None else list(self.ids)
        if self.op == "flush":
            out["channel"] = self.channel
        return out


def parse_request(data: object) -> Request:
    """Check a decoded request; raise ProtocolError saying what is wrong."""
    if not isinstance(data, dict):
        raise ProtocolError("a request is a JSON object")
    op = data.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if op in ("list", "status"):
        return Request(op)
    if op == "show":
        return Request("show", (_queue_id(data.get("id")),))
    if op == "call":
        site = data.get("site")
        if not isinstance(site, str) or not 0 < len(site) <= 64 or not site.isprintable():
            raise ProtocolError("call: site must be a site name")
        return Request("call", site=site)
    raw_ids = data.get("ids")
    if raw_ids is None and op == "flush":
        ids = None
    elif isinstance(raw_ids, list) and raw_ids:
        ids = tuple(_queue_id(i) for i in raw_ids)
    else:
        raise ProtocolError(f"{op}: ids must be a non-empty list")
    channel = data.get("channel")
    if channel is not None and (op != "flush" or not isinstance(channel, str) or not channel):
        raise ProtocolError("channel: only flush takes a channel name")
    return Request(op, ids, channel)


def encode_line(data: dict[str, Any]) -> bytes:
    """One JSON object as a line."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> object:
    """One line back to JSON; raise ProtocolError if it is not JSON."""
    try:
        return json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"not a JSON line: {e}") from e


def error_response(message: str, reason: str = "failed") -> dict[str, Any]:
    """The response to a request that could not be carried out, and why (a REASONS word)."""
    return {"ok": False, "error": message, "reason": reason}


def result(queue_id: str, changed: int) -> dict[str, Any]:
    """One id's result in a ``results`` list: done, ``changed`` recipients (or messages)."""
    return {"id": queue_id, "ok": True, "changed": changed}


def failed_result(queue_id: str, error: Exception) -> dict[str, Any]:
    """One id's result in a ``results`` list: not done, and why."""
    return {"id": queue_id, "ok": False, "error": str(error), "reason": reason_of(error)}


def reason_of(error: Exception) -> str:
    """The REASONS word for an exception raised while carrying out a request."""
    if isinstance(error, NoSuchMessage):
        return "not-found"
    if isinstance(error, SpoolError | OSError):
        return "spool"
    if isinstance(error, ProtocolError):
        return "bad-request"
    return "failed"


def _queue_id(value: object) -> str:
    if not isinstance(value, str) or not is_valid_queue_id(value):
        raise ProtocolError(f"not a queue id: {value!r}")
    return value

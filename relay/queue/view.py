"""How the queue is shown to people and scripts: JSON summaries and the ``mailq`` listing.

Both paths of ``relay queue`` (through the daemon's control socket, or on the spool
directly) produce the same JSON objects here, and the command prints them either as
JSON (``--json``) or as text, so what an operator sees does not depend on whether the
daemon happens to run.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from relay.envelope import RecipientState, reply_to_dict
from relay.oneline import escape
from relay.queue.state import MessageEntry

__all__ = [
    "HEADER_READ_LIMIT",
    "details",
    "format_details",
    "format_listing",
    "headers_of",
    "queue_status",
    "summary",
]

HEADER_READ_LIMIT = 65536  # how much of the text ``show`` reads to find the header
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def summary(entry: MessageEntry) -> dict[str, Any]:
    """One message as ``relay queue --json`` lists it."""
    recipients = []
    for recipient, status in zip(entry.envelope.recipients, entry.statuses, strict=True):
        item: dict[str, Any] = {
            "address": str(recipient.address),
            "channel": None if recipient.destination is None else recipient.destination.channel,
            "host": None if recipient.destination is None else recipient.destination.host,
            "state": status.state.value,
            "attempts": status.attempts,
            "next_attempt": status.next_attempt,
            "last_reply": None,
        }
        if status.last_reply is not None:
            item["last_reply"] = reply_to_dict(status.last_reply) | {
                "line": status.last_reply.smtp_line()
            }
        recipients.append(item)
    return {
        "id": entry.queue_id,
        "size": entry.size,
        "arrival": entry.envelope.arrival,
        "sender": entry.envelope.sender_text,
        "recipients": recipients,
    }


def queue_status(entries: Iterable[MessageEntry], now: float) -> dict[str, Any]:
    """The queue part of ``relay status``: sizes by state and channel, the oldest message.

    ``recipients`` counts every recipient of a queued message by state (a message stays
    queued until all of its recipients are final, so delivered and failed ones show up
    beside those still waiting); ``channels`` splits the same counts by channel
    (``unrouted`` for recipients the deliverer has not routed yet).
    """
    messages = 0
    octets = 0
    by_state: Counter[str] = Counter()
    by_channel: dict[str, Counter[str]] = {}
    oldest: MessageEntry | None = None
    for entry in entries:
        messages += 1
        octets += entry.size
        if oldest is None or entry.envelope.arrival < oldest.envelope.arrival:
            oldest = entry
        for recipient, status in zip(entry.envelope.recipients, entry.statuses, strict=True):
            state = status.state.value
            by_state[state] += 1
            channel = "unrouted" if recipient.destination is None else recipient.destination.channel
            by_channel.setdefault(channel, Counter())[state] += 1
    return {
        "messages": messages,
        "octets": octets,
        "recipients": {state.value: by_state[state.value] for state in RecipientState},
        "channels": {
            channel: dict(sorted(counts.items())) for channel, counts in sorted(by_channel.items())
        },
        "oldest": None
        if oldest is None
        else {
            "id": oldest.queue_id,
            "arrival": oldest.envelope.arrival,
            "age": max(0.0, now - oldest.envelope.arrival),
        },
    }


def details(entry: MessageEntry, text_head: bytes) -> dict[str, Any]:
    """One message as ``relay queue show`` gives it: envelope, states and header."""
    out = summary(entry)
    out["envelope"] = entry.envelope.to_dict()
    out["headers"] = headers_of(text_head)
    return out


def headers_of(text_head: bytes) -> str:
    """The header section at the start of a text (up to the first empty line).

    Control characters other than tab and newline are shown escaped, so a hostile
    header cannot send escape sequences to the operator's terminal.
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = text_head.find(separator)
        if end != -1:
            text_head = text_head[: end + len(separator) // 2]
            break
    text = text_head.decode("utf-8", "replace").replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_listing(messages: Sequence[Mapping[str, Any]]) -> str:
    """The ``mailq``-style listing: one block per message, a total at the end."""
    if not messages:
        return "Mail queue is empty\n"
    lines = [f"{'-Queue ID-':<15}{'--Size--':>9} {'---Arrival Time---':<20} -Sender/Recipient-"]
    total = 0
    for message in messages:
        total += int(message["size"])
        lines.append(
            f"{message['id']:<15}{message['size']:>9} {_when(message['arrival']):<20} "
            f"{message['sender']}"
        )
        for recipient in message["recipients"]:
            lines.extend(_recipient_lines(recipient))
        lines.append("")
    count = len(messages)
    lines.append(f"-- {_kib(total)} KiB in {count} message{'s' if count != 1 else ''}.")
    for site, (site_messages, recipients) in sorted(waiting_by_site(messages).items()):
        lines.append(
            f"-- phone site {escape(site)}: {site_messages} message"
            f"{'s' if site_messages != 1 else ''} ({recipients} recipient"
            f"{'s' if recipients != 1 else ''}) waiting for a call."
        )
    return "\n".join(lines) + "\n"


def waiting_by_site(messages: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(messages, recipients) waiting per phone site, from ``relay queue``'s listing."""
    found: dict[str, tuple[int, int]] = {}
    for message in messages:
        sites: dict[str, int] = {}
        for recipient in message["recipients"]:
            if recipient.get("channel") == "phone" and recipient.get("state") not in (
                "delivered",
                "failed",
            ):
                host = str(recipient.get("host"))
                sites[host] = sites.get(host, 0) + 1
        for site, count in sites.items():
            held = found.get(site, (0, 0))
            found[site] = (held[0] + 1, held[1] + count)
    return found


def format_details(message: Mapping[str, Any]) -> str:
    """``relay queue show``: the envelope, each recipient's state, then the header."""
    envelope = message.get("envelope", {})
    submitter = envelope.get("submitter", {})
    lines = [
        f"Queue ID:   {message['id']}",
        f"Size:       {message['size']}",
        f"Arrival:    {_when(message['arrival'])}",
        f"Sender:     {message['sender']}",
        f"Body:       {envelope.get('body_type', '?')}"
        + ("  SMTPUTF8" if envelope.get("smtputf8") else ""),
        "Submitted:  " + ", ".join(f"{k}={v}" for k, v in submitter.items()),
    ]
    if envelope.get("env_id"):
        lines.append(f"Envelope id: {envelope['env_id']}")
    lines.append("Recipients:")
    for recipient in message["recipients"]:
        lines.extend(_recipient_lines(recipient))
    lines.append("")
    lines.append(message.get("headers", "").rstrip("\n"))
    return "\n".join(lines) + "\n"


def _recipient_lines(recipient: Mapping[str, Any]) -> list[str]:
    where = recipient["channel"] or "(not routed)"
    if recipient["channel"] and recipient["host"]:
        where = f"{recipient['channel']}:{recipient['host']}"
    line = f"    {recipient['state']:<10}{recipient['address']}  {where}"
    if recipient["attempts"]:
        line += f"  attempts {recipient['attempts']}"
    if recipient["next_attempt"] is not None and recipient["state"] in ("deferred", "held"):
        line += f", next {_when(recipient['next_attempt'])}"
    lines = [line]
    reply = recipient.get("last_reply")
    if reply:
        lines.append(f"{'':14}({_CONTROL.sub('?', reply['line'])})")
    return lines


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _kib(octets: int) -> int:
    return (octets + 1023) // 1024

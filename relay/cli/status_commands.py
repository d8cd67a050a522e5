"""``relay status``: is the relay up, what waits in its queue, how its channels fare.

The running relay answers over its control socket (``{"op": "status"}``): since when it
runs, the queue by state and by channel, the oldest message's age, and per channel the
last delivery and the last failure since it started (per phone site, the last call,
once the phone channel exists).  When no daemon holds the spool the command reads the
spool itself, prints what it holds, says the relay is down and exits 69
(EX_UNAVAILABLE), so a monitoring script can tell "down" from "up".

Exit codes: 0 up; 69 down (the queue still shown); 74 the spool could not be read;
75 the spool is locked but nobody answers; 78 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from relay.cli import exitcodes
from relay.cli.common import add_config_option
from relay.cli.queue_commands import ask
from relay.queue.protocol import Request

__all__ = ["format_status", "register", "status_command"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``."""
    status = subparsers.add_parser(
        "status", help="is the relay up; its queue and channels (exit 69 when down)"
    )
    add_config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(func=status_command)


def status_command(args: argparse.Namespace) -> int:
    """``relay status [--json]``."""
    response = ask(args, Request("status"))
    if isinstance(response, int):
        return response
    if not response.get("ok"):
        print(f"relay: status: {response.get('error', 'failed')}", file=sys.stderr)
        return exitcodes.IOERR
    status = response["status"]
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_status(status, time.time()))
    return exitcodes.OK if status["daemon"].get("running") else exitcodes.UNAVAILABLE


def format_status(status: Mapping[str, Any], now: float) -> str:
    """The text form: one line for the daemon, the queue, then one block per channel."""
    daemon, queue = status["daemon"], status["queue"]
    if daemon.get("running"):
        lines = [
            f"relay: running since {_when(daemon['started'])} "
            f"(up {_age(daemon['uptime'])}), pid {daemon['pid']}, version {daemon['version']}"
        ]
    else:
        lines = ["relay: not running (the queue below was read from the spool directly)"]
    recipients = {state: n for state, n in queue["recipients"].items() if n}
    counts = ", ".join(f"{n} {state}" for state, n in recipients.items()) or "none"
    lines.append(
        f"queue: {queue['messages']} message{'s' if queue['messages'] != 1 else ''}, "
        f"{queue['octets']} octets; recipients: {counts}"
    )
    oldest = queue["oldest"]
    if oldest is not None:
        lines.append(f"oldest: {oldest['id']}, {_age(oldest['age'])} old")
    for channel, states in queue["channels"].items():
        detail = ", ".join(f"{n} {state}" for state, n in states.items())
        lines.append(f"  {channel}: {detail}")
    deliveries = daemon.get("deliveries")
    if deliveries is not None:
        lines.append("channels since start:" if deliveries else "channels: no attempt yet")
        for channel, last in deliveries.items():
            lines.append(f"  {channel}:")
            for kind, label in (("last_delivery", "delivered"), ("last_failure", "failed")):
                lines.append(f"    last {label}: {_disposition(last[kind], now)}")
        sites = daemon.get("phone_sites") or {}
        lines.append(f"phone sites: {len(sites) or 'none'}")
        for name, site in sites.items():
            lines.append(f"  {_printable(name)}: {_phone_site(site, now)}")
    return "\n".join(lines) + "\n"


def _phone_site(site: Mapping[str, Any], now: float) -> str:
    """One phone site: its last call, and the next one for a site this relay calls."""
    last = site.get("last_call")
    parts = []
    if last is None:
        parts.append("no call since start")
    else:
        parts.append(
            f"last call {last['direction']} {_when(last['start'])} ({_age(now - last['start'])} "
            f"ago) {_printable(str(last['result']))}, sent {last['messages_sent']}, "
            f"received {last['messages_received']}"
        )
    if site.get("calls_out"):
        if site.get("down"):
            parts.append(f"down after {site.get('failures', 0)} failed calls")
        following = site.get("next_call")
        parts.append("next call: " + ("none planned" if following is None else _when(following)))
    else:
        parts.append("calls in")
    return "; ".join(parts)


def _disposition(last: Mapping[str, Any] | None, now: float) -> str:
    if last is None:
        return "never"
    return (
        f"{_when(last['time'])} ({_age(now - last['time'])} ago) {last['queue_id']} "
        f"to=<{last['recipient']}> status={last['status']} ({_printable(last['reply'])})"
    )


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"

"""``relay call SITE`` and ``relay calls``: the phone channel for operators.

``relay call`` asks the running daemon, over its control socket, to call a site now,
waits for the call to end and prints its summary.  Exit codes (sysexits): 0 the call
completed; 75 (TEMPFAIL) it did not (no connection, the line dropped, a timeout: the
mail stays queued for the next call); 77 (NOPERM) the site refused us or we it (unknown
site, wrong secret); 76 (PROTOCOL) a version or protocol mismatch; 67 (NOHOST) no such
site that this relay calls; 69 (UNAVAILABLE) the relay is not running; 78 a bad
configuration.

``relay slave --stdio`` answers one call on its standard input and output, as the login
shell of a calling site's account; it runs the relay (without SMTP) for that call, so
the spool must not be owned by a running daemon at the time.

``relay calls`` lists the recent calls from the call log the daemon keeps in the spool
(:mod:`relay.channels.phone.calllog`); it reads a file and needs no daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Final

from relay.channels.phone.calllog import CallRecord, read_calls
from relay.cli import exitcodes
from relay.cli.common import add_config_option, config_from_args, print_config_error
from relay.config import Config, ConfigError
from relay.oneline import escape
from relay.preflight import PreflightError, preflight
from relay.queue import client
from relay.queue.layout import SpoolLayout
from relay.queue.protocol import ProtocolError, Request

__all__ = ["format_call", "register"]

_REFUSED: Final = frozenset({"unknown-site", "auth-failed"})
_MISMATCH: Final = frozenset({"version-mismatch", "protocol-error", "peer-aborted"})


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call`` and ``calls``."""
    call = subparsers.add_parser("call", help="call a phone site now and wait for the call to end")
    add_config_option(call)
    call.add_argument("site", metavar="SITE")
    call.add_argument("--json", action="store_true", help="print the call record as JSON")
    call.set_defaults(func=call_command)

    calls = subparsers.add_parser("calls", help="list recent phone calls")
    add_config_option(calls)
    calls.add_argument("--json", action="store_true", help="print JSON instead of text")
    calls.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="the last N calls")
    calls.set_defaults(func=calls_command)

    slave = subparsers.add_parser(
        "slave", help="answer one phone call on stdin/stdout (a calling site's login shell)"
    )
    add_config_option(slave)
    slave.add_argument("--stdio", action="store_true", help="answer on standard input/output")
    slave.add_argument("--log", metavar="FILE", help="log here (default: standard error)")
    slave.set_defaults(func=slave_command)


def _config(args: argparse.Namespace) -> Config | None:
    """The configuration of ``args``, or None having said what is wrong with it."""
    try:
        return config_from_args(args)
    except ConfigError as e:
        print_config_error(e, args.config)
        return None


def call_command(args: argparse.Namespace) -> int:
    """``relay call SITE``."""
    config = _config(args)
    if config is None:
        return exitcodes.CONFIG
    site = config.phone.sites.get(args.site)
    if site is None or site.transport is None:
        print(
            f"relay: call: no phone site {escape(args.site)} that this relay calls", file=sys.stderr
        )
        return exitcodes.NOHOST
    layout = SpoolLayout(Path(config.relay.spool))
    try:
        response = client.request(
            layout.control_path,
            Request("call", site=args.site),
            timeout=site.max_call_time + 120.0,
        )
    except OSError as e:
        print(f"relay: call: the relay is not running ({e})", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    except ProtocolError as e:
        print(f"relay: call: {e}", file=sys.stderr)
        return exitcodes.IOERR
    if not response.get("ok"):
        print(f"relay: call: {response.get('error', 'failed')}", file=sys.stderr)
        return exitcodes.NOHOST if response.get("reason") == "not-found" else exitcodes.SOFTWARE
    record = CallRecord.from_dict(response["call"])
    if args.json:
        sys.stdout.write(json.dumps(record.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_call(record))
    return exit_code(record)


def exit_code(record: CallRecord) -> int:
    """The sysexits code of a call's result."""
    if record.completed:
        return exitcodes.OK
    if record.result in _REFUSED:
        return exitcodes.NOPERM
    if record.result in _MISMATCH:
        return os.EX_PROTOCOL
    return exitcodes.TEMPFAIL


def format_call(record: CallRecord) -> str:
    """A call's summary as ``relay call`` prints it."""
    efficiency = "-" if record.efficiency is None else f"{record.efficiency:.3f}"
    lines = [
        f"call {record.direction} {escape(record.site)}: {escape(record.result)}"
        + (f" ({escape(record.reason)})" if record.reason else ""),
        f"  duration   {record.seconds:.1f}s",
        f"  sent       {record.messages_sent} messages, {record.bytes_sent} bytes "
        f"({record.wire_bytes_sent} on the line)",
        f"  received   {record.messages_received} messages, {record.bytes_received} bytes "
        f"({record.wire_bytes_received} on the line)",
        f"  efficiency {efficiency}",
        f"  resent     {record.frames_resent} frames",
    ]
    return "\n".join(lines) + "\n"


def calls_command(args: argparse.Namespace) -> int:
    """``relay calls``."""
    config = _config(args)
    if config is None:
        return exitcodes.CONFIG
    if args.limit < 1:
        print("relay: calls: --limit must be at least 1", file=sys.stderr)
        return exitcodes.USAGE
    try:
        records = read_calls(Path(config.relay.spool), args.limit)
    except OSError as e:
        print(f"relay: calls: {e}", file=sys.stderr)
        return exitcodes.IOERR
    if args.json:
        sys.stdout.write(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
    else:
        sys.stdout.write(format_calls(records))
    return exitcodes.OK


def format_calls(records: list[CallRecord]) -> str:
    """The table ``relay calls`` prints."""
    if not records:
        return "No calls recorded\n"
    lines = [
        f"{'site':<16} {'dir':<3} {'start':<19} {'secs':>7} {'result':<16} "
        f"{'msgs out/in':>11} {'bytes out/in':>17} {'eff':>5} {'resent':>6}"
    ]
    for r in records:
        efficiency = "-" if r.efficiency is None else f"{r.efficiency:.2f}"
        lines.append(
            f"{escape(r.site):<16} {r.direction:<3} {_when(r.start):<19} {r.seconds:>7.1f} "
            f"{escape(r.result):<16} {f'{r.messages_sent}/{r.messages_received}':>11} "
            f"{f'{r.bytes_sent}/{r.bytes_received}':>17} {efficiency:>5} {r.frames_resent:>6}"
        )
    return "\n".join(lines) + "\n"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def slave_command(args: argparse.Namespace) -> int:
    """``relay slave --stdio``: answer one call on standard input and output."""
    if not args.stdio:
        print(
            "relay: slave: only --stdio is run this way (use twistd relay-slave)", file=sys.stderr
        )
        return exitcodes.USAGE
    from relay.slave_tap import slave_config  # the daemon's modules: only when needed
    from relay.tap import build_service

    try:
        config = slave_config(config_from_args(args), "stdio")
        recipients = preflight(config)
    except ConfigError as e:
        print_config_error(e, args.config)
        return exitcodes.CONFIG
    except (ValueError, PreflightError) as e:
        print(f"relay: slave: {e}", file=sys.stderr)
        return exitcodes.CONFIG
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    log_file = open(args.log, "a") if args.log else sys.stderr  # noqa: SIM115 (for the run)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    top = build_service(config, reactor, local_recipients=recipients, calls_out=False)
    phone = top.getServiceNamed("phone")  # type: ignore[no-untyped-call]
    answerer = phone.getServiceNamed("stdio")
    top.startService()  # type: ignore[no-untyped-call]
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    protocol = answerer.protocol
    summary = protocol.summary if protocol is not None else None
    if summary is None:
        return exitcodes.UNAVAILABLE
    return exitcodes.OK if summary.outcome.value == "completed" else exitcodes.TEMPFAIL

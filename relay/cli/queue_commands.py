"""``relay queue`` (list, show, rm, hold, release) and ``relay flush``: the mailq of the relay.

They work whether or not the daemon runs, and never behind its back: if the spool's lock
is held, the daemon owns the log, so the request goes over its control socket and the
daemon carries it out like any other change; otherwise the command takes the lock
itself and opens the spool directly (:mod:`relay.queue.offline`).  Both paths answer
with the same JSON objects, printed as text or, with ``--json``, as they are.

Exit codes: 0 done; 66 (NOINPUT) an id is not in the queue; 74 (IOERR) the spool could
not be read or written; 75 (TEMPFAIL) the spool is locked but nobody answers on its
socket (a daemon starting, or another command); 78 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.cli import exitcodes
from relay.cli.common import add_config_option, config_from_args, print_config_error
from relay.config import ConfigError
from relay.errors import SpoolError
from relay.queue import client
from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLock, SpoolLocked
from relay.queue.offline import OfflineSpool
from relay.queue.protocol import (
    READ_ONLY_OPS,
    ProtocolError,
    Request,
    error_response,
    failed_result,
    parse_request,
)
from relay.queue.state import NoSuchMessage
from relay.queue.view import format_details, format_listing, queue_status

__all__ = ["ask", "register", "run_request", "send"]

# How long to keep trying when the spool is locked but its socket does not answer yet.
DAEMON_WAIT = 10.0

_ACTIONS = {"hold": "held", "release": "released", "flush": "flushed"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` (with its actions) and ``flush``."""
    queue = subparsers.add_parser(
        "queue",
        help="list and manage the mail queue",
        description="Without an action, list the queue (like mailq).",
    )
    add_config_option(queue)
    queue.add_argument("--json", action="store_true", help="print JSON instead of text")
    queue.set_defaults(func=queue_command, action=None, ids=[])
    actions = queue.add_subparsers(dest="action", metavar="ACTION")

    show = actions.add_parser("show", help="a message's envelope, states and header")
    show.add_argument("ids", nargs=1, metavar="ID")
    for name, text in (
        ("rm", "remove messages from the queue (no notice to the sender)"),
        ("hold", "put messages on hold: not tried until released"),
        ("release", "release held messages"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("ids", nargs="+", metavar="ID")
    for action in (show, *(actions.choices[n] for n in ("rm", "hold", "release"))):
        _add_late_options(action)

    flush = subparsers.add_parser(
        "flush", help="try deferred mail now (all, some messages, or one channel)"
    )
    add_config_option(flush)
    flush.add_argument("--json", action="store_true", help="print JSON instead of text")
    flush.add_argument("ids", nargs="*", metavar="ID", help="only these messages")
    flush.add_argument("--channel", metavar="NAME", help="only recipients on this channel")
    flush.set_defaults(func=flush_command)


def _add_late_options(parser: argparse.ArgumentParser) -> None:
    """Accept ``-c`` and ``--json`` after the action too, without clobbering them if absent."""
    parser.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, metavar="FILE")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS)


def queue_command(args: argparse.Namespace) -> int:
    """``relay queue [ACTION]``."""
    action = args.action or "list"
    try:
        if action == "list":
            request = Request("list")
        elif action == "show":
            request = parse_request({"op": "show", "id": args.ids[0]})
        else:
            request = parse_request({"op": action, "ids": args.ids})
    except ProtocolError as e:
        print(f"relay: queue {action}: {e}", file=sys.stderr)
        return exitcodes.USAGE
    return run_request(args, request)


def flush_command(args: argparse.Namespace) -> int:
    """``relay flush [ID…] [--channel C]``."""
    try:
        request = parse_request({"op": "flush", "ids": args.ids or None, "channel": args.channel})
    except ProtocolError as e:
        print(f"relay: flush: {e}", file=sys.stderr)
        return exitcodes.USAGE
    return run_request(args, request)


def run_request(args: argparse.Namespace, request: Request) -> int:
    """Carry out ``request`` for ``args`` (``config``, ``json``); print it; the exit code."""
    response = ask(args, request)
    if isinstance(response, int):
        return response
    return _report(request, response, json_output=bool(getattr(args, "json", False)))


def ask(args: argparse.Namespace, request: Request) -> dict[str, Any] | int:
    """The response to ``request`` on the spool of ``args.config``; or, having said why
    on stderr, the exit code for not getting one."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print_config_error(e, args.config)
        return exitcodes.CONFIG
    try:
        return send(config.relay.spool, request)
    except SpoolLocked as e:
        print(f"relay: {e}", file=sys.stderr)
        return exitcodes.TEMPFAIL
    except (SpoolError, OSError, ProtocolError) as e:
        print(f"relay: {request.op}: {e}", file=sys.stderr)
        return exitcodes.IOERR


def send(spool: Path, request: Request, *, wait: float | None = None) -> dict[str, Any]:
    """Carry out ``request`` on the spool: through the daemon if it owns it, else directly.

    Raises SpoolLocked if the spool stays locked for ``wait`` seconds (default
    :data:`DAEMON_WAIT`) without a daemon answering on its socket.
    """
    layout = SpoolLayout(Path(spool))
    if not layout.root.is_dir():
        return _on_missing_spool(request)
    deadline = time.monotonic() + (DAEMON_WAIT if wait is None else wait)
    while True:
        lock = SpoolLock(layout.lock_path)
        try:
            lock.acquire()
        except SpoolLocked as locked:
            try:
                return client.request(layout.control_path, request)
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise SpoolLocked(f"{locked}; its control socket does not answer: {e}") from e
                time.sleep(0.1)  # a daemon starting up, or another command: try again
                continue
        try:
            writable = request.op not in READ_ONLY_OPS
            spool_ = OfflineSpool(layout, writable=writable, now=time.time)
            if spool_.quarantined:
                print(
                    f"relay: {spool_.quarantined} damaged region(s) of the spool were set "
                    f"aside in {layout.quarantine_dir}",
                    file=sys.stderr,
                )
            try:
                return spool_.execute(request)
            finally:
                spool_.close()
        finally:
            lock.release()


def _on_missing_spool(request: Request) -> dict[str, Any]:
    """The answers for a spool that was never created: nothing is queued."""
    if request.op == "list":
        return {"ok": True, "messages": []}
    if request.op == "status":
        queue = queue_status([], time.time())
        return {"ok": True, "status": {"daemon": {"running": False}, "queue": queue}}
    if request.ids is None:
        return {"ok": True, "changed": 0}
    missing = [failed_result(qid, NoSuchMessage(qid)) for qid in request.ids]
    if request.op == "show":
        return error_response(missing[0]["error"], "not-found")
    return {"ok": True, "results": missing}


def _report(request: Request, response: Mapping[str, Any], *, json_output: bool) -> int:
    """Print the response; the exit code it deserves."""
    if not response.get("ok"):
        print(f"relay: {request.op}: {response.get('error', 'failed')}", file=sys.stderr)
        return _exit_for(str(response.get("reason", "failed")))
    if request.op == "list":
        messages = response["messages"]
        sys.stdout.write(_json(messages) if json_output else format_listing(messages))
        return exitcodes.OK
    if request.op == "show":
        message = response["message"]
        sys.stdout.write(_json(message) if json_output else format_details(message))
        return exitcodes.OK
    if "results" not in response:
        changed = int(response.get("changed", 0))
        if json_output:
            sys.stdout.write(_json({"changed": changed}))
        else:
            print(f"relay: flushed {changed} recipient{'s' if changed != 1 else ''}")
        return exitcodes.OK
    results = response["results"]
    if json_output:
        sys.stdout.write(_json(results))
    worst = exitcodes.OK
    for result in results:
        if not result.get("ok"):
            print(f"relay: {result['id']}: {result.get('error')}", file=sys.stderr)
            worst = max(worst, _exit_for(str(result.get("reason", "failed"))))
        elif not json_output:
            print(f"{result['id']}: {_describe(request.op, int(result.get('changed', 0)))}")
    return worst


def _describe(op: str, changed: int) -> str:
    if op == "rm":
        return "removed"
    return f"{_ACTIONS[op]} {changed} recipient{'s' if changed != 1 else ''}"


def _exit_for(reason: str) -> int:
    return {
        "not-found": exitcodes.NOINPUT,
        "spool": exitcodes.IOERR,
        "bad-request": exitcodes.USAGE,
    }.get(reason, exitcodes.SOFTWARE)


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"

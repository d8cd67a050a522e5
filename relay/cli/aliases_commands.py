"""``relay aliases check`` and ``relay aliases expand``: the aliases file, before it bites.

``check`` is ``newaliases`` without a database: it reads the aliases file the
configuration names (or ``-f FILE``), and reports *every* problem with its line number
(exit 78, EX_CONFIG) or prints a summary (exit 0).  Beyond the syntax it checks what
would make deliveries fail later: local targets that name no user or alias, include
files that are missing or broken, directories of ``/file`` targets that do not exist,
and commands given by absolute path that are not executable.

``expand ADDRESS`` prints what mail to an address would be delivered to, one line per
target, the way the local channel would expand it now (like ``sendmail -bv``); it exits
67 (EX_NOUSER) if any part of the expansion fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from relay.address import Address, AddressError, parse_mailbox
from relay.channels.local.aliases import (
    Aliases,
    CommandDelivery,
    FailedTarget,
    FileDelivery,
    MailboxDelivery,
    Problem,
    RemoteDelivery,
    Target,
    TargetKind,
    decode_text,
    expand,
    parse_aliases,
    parse_include,
)
from relay.channels.local.users import LocalRecipients, build_local_recipients, local_domain_test
from relay.cli import exitcodes
from relay.cli.common import add_config_option, config_from_args, print_config_error
from relay.config import Config, ConfigError

__all__ = ["check_aliases", "expand_address", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``aliases`` with its actions ``check`` and ``expand``."""
    aliases = subparsers.add_parser("aliases", help="check the aliases file, expand an address")
    aliases.set_defaults(func=lambda args: _usage(aliases))
    actions = aliases.add_subparsers(dest="action", metavar="ACTION")

    check = actions.add_parser("check", help="validate the aliases file, every problem at once")
    add_config_option(check)
    _add_file_option(check)
    check.set_defaults(func=check_aliases)

    show = actions.add_parser("expand", help="show where mail to an address would go")
    add_config_option(show)
    _add_file_option(show)
    show.add_argument("address", help="a local part or local@domain")
    show.set_defaults(func=expand_address)


def _add_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        metavar="ALIASES",
        type=Path,
        default=None,
        help="the aliases file (default: local.aliases of the configuration)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exitcodes.USAGE


# --------------------------------------------------------------------------- check


def check_aliases(args: argparse.Namespace) -> int:
    """Print every problem of the aliases file (exit 78) or a one-line summary (exit 0)."""
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print_config_error(error, args.config)
        return exitcodes.CONFIG
    path: Path | None = args.file or config.local.aliases
    if path is None:
        print("relay: no aliases file configured (local.aliases): nothing to check")
        return exitcodes.OK
    aliases, problems = _read(path)
    if aliases is not None:
        problems += _semantic_problems(aliases, config, path)
    if problems:
        for where, problem in problems:
            print(f"relay: {where}:{problem}", file=sys.stderr)
        count = len(problems)
        print(f"relay: {path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return exitcodes.CONFIG
    assert aliases is not None
    print(f"relay: aliases ok: {path}: {_summary(aliases)}")
    return exitcodes.OK


def _read(path: Path) -> tuple[Aliases | None, list[tuple[Path, Problem]]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, [(path, Problem(0, f"cannot read: {error.strerror}"))]
    text, problem = decode_text(data)
    if problem is not None:
        return None, [(path, problem)]
    aliases = parse_aliases(text)
    return aliases, [(path, p) for p in aliases.problems]


def _semantic_problems(
    aliases: Aliases, config: Config, source: Path
) -> list[tuple[Path, Problem]]:
    """What parses but would fail at delivery time, with the line that says it."""
    recipients = LocalRecipients(config.local, aliases)
    is_local = local_domain_test(config)
    found: list[tuple[Path, Problem]] = []
    seen_includes: set[str] = set()

    def check(target: Target, where: Path, alias: str) -> None:
        problem = _target_problem(target, alias, recipients, is_local)
        if problem:
            found.append((where, Problem(target.line, problem)))
        if target.kind is TargetKind.INCLUDE and target.value not in seen_includes:
            seen_includes.add(target.value)
            for inner, inner_where in _include_targets(target, where, found):
                check(inner, inner_where, alias)

    for entry in aliases.entries.values():
        for target in entry.targets:
            check(target, source, entry.name)
    found.extend((source, p) for p in _loop_problems(aliases, recipients, is_local, config))
    return found


def _loop_problems(
    aliases: Aliases,
    recipients: LocalRecipients,
    is_local: Callable[[str], bool],
    config: Config,
) -> list[Problem]:
    """Aliases whose expansion runs into a loop with no mailbox to end it."""
    domain = (config.relay.local_domains or (config.relay.hostname,))[0]
    context = recipients.expansion_context(is_local_domain=is_local, read_include=_read_include)
    problems = []
    for entry in aliases.entries.values():
        for item in expand(Address(entry.name, domain), context):
            if isinstance(item, FailedTarget) and item.reply.enhanced == "5.4.6":
                problems.append(Problem(entry.line, f"alias {entry.name!r}: {item.reply.text}"))
    return problems


def _include_targets(
    target: Target, where: Path, found: list[tuple[Path, Problem]]
) -> list[tuple[Target, Path]]:
    include = Path(target.value)
    try:
        data = include.read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        found.append((where, Problem(target.line, f"include file {include}: {reason}")))
        return []
    text, problem = decode_text(data)
    if problem is not None:
        found.append((include, problem))
        return []
    targets, problems = parse_include(text)
    found.extend((include, p) for p in problems)
    return [(t, include) for t in targets]


def _target_problem(
    target: Target, alias: str, recipients: LocalRecipients, is_local: Callable[[str], bool]
) -> str:
    if target.kind is TargetKind.ADDRESS:
        if target.domain is not None and not is_local(target.domain):
            return ""
        try:
            address = Address(target.value, target.domain or "localhost")
        except AddressError as error:
            return f"alias {alias!r}: bad address {target.value!r}: {error}"
        if address.local_part.casefold() == alias.casefold():
            if recipients.find_user(alias) is None:
                return f"alias {alias!r} names itself but {alias!r} is not a local user"
            return ""
        if not recipients.exists(address):
            return f"alias {alias!r}: no local user or alias {str(target)!r}"
        return ""
    if target.kind is TargetKind.FILE:
        directory = Path(target.value.rstrip("/")).parent
        if not directory.is_dir():
            return f"alias {alias!r}: directory {directory} of {target.value} does not exist"
        return ""
    if target.kind is TargetKind.COMMAND:
        try:
            program = shlex.split(target.value)[0]
        except (ValueError, IndexError):
            return ""
        if program.startswith("/") and not os.access(program, os.X_OK):
            return f"alias {alias!r}: command {program} is not an executable file"
    return ""


def _summary(aliases: Aliases) -> str:
    kinds = Counter(t.kind for e in aliases.entries.values() for t in e.targets)
    names = len(aliases.entries)
    parts = [
        f"{kinds[TargetKind.ADDRESS]} addresses",
        f"{kinds[TargetKind.FILE]} files",
        f"{kinds[TargetKind.COMMAND]} commands",
        f"{kinds[TargetKind.INCLUDE]} includes",
    ]
    return f"{names} alias{'es' if names != 1 else ''} ({', '.join(parts)})"


# --------------------------------------------------------------------------- expand


def expand_address(args: argparse.Namespace) -> int:
    """Print where mail to the address goes now; exit 67 (NOUSER) if any of it fails."""
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print_config_error(error, args.config)
        return exitcodes.CONFIG
    path: Path | None = args.file or config.local.aliases
    aliases = Aliases()
    if path is not None:
        parsed, problems = _read(path)
        if problems or parsed is None:
            for where, problem in problems:
                print(f"relay: {where}:{problem}", file=sys.stderr)
            return exitcodes.CONFIG
        aliases = parsed
    text: str = args.address
    if "@" not in text:
        text = f"{text}@{(config.relay.local_domains or (config.relay.hostname,))[0]}"
    try:
        address = parse_mailbox(text)
    except AddressError as error:
        print(f"relay: bad address {args.address!r}: {error}", file=sys.stderr)
        return exitcodes.DATAERR
    recipients = build_local_recipients(config, aliases)  # postmaster@ included
    context = recipients.expansion_context(
        is_local_domain=local_domain_test(config), read_include=_read_include
    )
    failed = 0
    for item in expand(address, context):
        if isinstance(item, MailboxDelivery):
            user = recipients.find_user(item.user)
            mailbox = "" if user is None else f" {user.format.value} {user.mailbox}"
            print(f"{item.address}: mailbox of {item.user}{mailbox}")
        elif isinstance(item, FileDelivery):
            kind = "maildir" if item.path.endswith("/") else "file"
            print(f"{item.address}: {kind} {item.path}")
        elif isinstance(item, CommandDelivery):
            print(f"{item.address}: command |{item.command}")
        elif isinstance(item, RemoteDelivery):
            print(f"{item.address}: forwarded (remote)")
        else:
            assert isinstance(item, FailedTarget)
            failed += 1
            print(f"{item.what}: fails: {item.reply.smtp_line()}")
    return exitcodes.NOUSER if failed else exitcodes.OK


def _read_include(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()

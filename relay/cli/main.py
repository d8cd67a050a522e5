"""The ``relay`` command: one entry point, one module per subcommand.

Each subcommand module has ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code from
:mod:`relay.cli.exitcodes`.  ``main`` only parses and dispatches, so a subcommand is
tested by calling ``main([...])`` and reading its exit code and output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from relay.cli import (
    aliases_commands,
    config_commands,
    exitcodes,
    passwd_commands,
    phone_commands,
    queue_commands,
    sendmail,
    status_commands,
)

# The subcommand modules, in the order ``relay --help`` lists them.
SUBCOMMANDS: tuple[ModuleType, ...] = (
    config_commands,
    status_commands,
    queue_commands,
    aliases_commands,
    passwd_commands,
    phone_commands,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Check the configuration, manage the queue, aliases and AUTH users.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    subparsers.add_parser(
        "sendmail",
        help="submit mail as /usr/sbin/sendmail does (its options: -t, -i, -f, -bs, ...)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit code (sysexits.h)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["sendmail"]:  # sendmail's own option syntax, not argparse's
        return sendmail.main(argv[1:], program="sendmail")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on a usage error; sysexits says 64
        return exitcodes.OK if e.code in (0, None) else exitcodes.USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        code: int = args.func(args)
    except BrokenPipeError:  # `relay queue | head`: not an error worth a traceback
        return exitcodes.OK
    except KeyboardInterrupt:
        return exitcodes.TEMPFAIL
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

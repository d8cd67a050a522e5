"""``relay check-config``, ``relay config --default`` and ``relay version``.

``check-config`` is what an operator runs before a restart: exit 0 with a one-line
summary, or exit 78 (EX_CONFIG) with every problem on its own line, so one run finds
them all instead of one per restart.  It runs the same preflight checks as
``twistd relay`` (aliases file, TLS certificate and key), so "ok" means it will start;
and a little more (:func:`relay.preflight.advise`): a local ``[relay] postmaster``
that is neither a user nor an alias fails it too, and notes (``relay: note: ...``,
exit 0) point at what runs but may not be what was meant.
"""

from __future__ import annotations

import argparse
import sys

from relay import __version__
from relay.cli import exitcodes
from relay.cli.common import add_config_option, config_from_args, print_config_error
from relay.config import DEFAULT_TOML, ConfigError
from relay.preflight import PreflightError, advise, preflight


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check-config``, ``config`` and ``version``."""
    check = subparsers.add_parser(
        "check-config", help="validate a configuration file and summarise it"
    )
    add_config_option(check)
    check.set_defaults(func=check_config)

    config = subparsers.add_parser("config", help="print configuration")
    config.add_argument(
        "--default",
        action="store_true",
        required=True,
        help="print the embedded default configuration (a starting point for relay.toml)",
    )
    config.set_defaults(func=print_default)

    version = subparsers.add_parser("version", help="print the relay's version")
    version.set_defaults(func=print_version)


def check_config(args: argparse.Namespace) -> int:
    """Load the configuration; print a summary (exit 0) or every problem (exit 78)."""
    try:
        config = config_from_args(args)
        advice = advise(config, preflight(config))
    except ConfigError as e:
        print_config_error(e, args.config)
        return exitcodes.CONFIG
    except PreflightError as e:
        print_config_error(ConfigError(list(e.problems)), args.config)
        return exitcodes.CONFIG
    for note in advice.notes:
        print(f"relay: note: {note}")
    if advice.problems:
        print_config_error(ConfigError(list(advice.problems)), args.config)
        return exitcodes.CONFIG
    print(f"relay: configuration ok: {config.summary()}")
    return exitcodes.OK


def print_default(args: argparse.Namespace) -> int:
    """Print the embedded default configuration's TOML text."""
    sys.stdout.write(DEFAULT_TOML)
    return exitcodes.OK


def print_version(args: argparse.Namespace) -> int:
    """Print ``relay <version>`` and the versions that matter for bug reports."""
    import twisted

    print(f"relay {__version__} (Twisted {twisted.__version__}, Python {sys.version.split()[0]})")
    return exitcodes.OK

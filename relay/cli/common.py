"""What several subcommands share: the ``-c/--config`` option and loading it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relay.config import Config, ConfigError, default_config, load_config

__all__ = ["CommandError", "add_config_option", "config_from_args"]


class CommandError(Exception):
    """A subcommand cannot go on: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c FILE``: the configuration; without it, the embedded default."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help="configuration file (default: the embedded default in the current directory)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the configuration named by ``-c``; raise ConfigError listing every problem."""
    path: Path | None = args.config
    return default_config() if path is None else load_config(path)


def print_config_error(error: ConfigError, path: Path | None) -> None:
    """Every problem on its own line, prefixed with the file, on stderr."""
    where = str(path) if path is not None else "<default>"
    for problem in error.problems:
        # A problem about the file itself ("…: file not found") already names it.
        prefix = "relay: " if problem.startswith(f"{where}:") else f"relay: {where}: "
        print(f"{prefix}{problem}", file=sys.stderr)

"""``relay passwd USER``: add or change a user in the SMTP AUTH users file.

The file is the one ``[smtp] auth_users_file`` names (or ``-f FILE``): one
``user:$scrypt$…`` line per user.  The password is read from standard input (one line),
or asked for twice at a terminal, never taken from the command line where ``ps`` would
show it.  The file is rewritten whole: written to a temporary name in the same directory,
fsynced, renamed over the old one and the directory fsynced, so a crash leaves either the
old file or the new one; other users' lines and comments are kept as they were.  The
gateway re-reads the file on each AUTH, so no restart is needed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path

from relay.cli import exitcodes
from relay.cli.common import add_config_option, config_from_args, print_config_error
from relay.config import ConfigError
from relay.fileio import fsync_directory
from relay.gateway.auth import UsersFileError, make_user_line, parse_users, valid_user_name

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``passwd``."""
    parser = subparsers.add_parser(
        "passwd", help="set a user's SMTP AUTH password (reads it from standard input)"
    )
    add_config_option(parser)
    parser.add_argument("user", help="the user name clients give to AUTH")
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=None,
        help="the users file (default: [smtp] auth_users_file of the configuration)",
    )
    parser.add_argument(
        "--delete", action="store_true", help="remove the user instead of setting a password"
    )
    parser.set_defaults(func=run_passwd)


def run_passwd(args: argparse.Namespace) -> int:
    """Set (or delete) one user's line in the users file."""
    user: str = args.user
    if not valid_user_name(user):
        print(f"relay passwd: bad user name {user!r}", file=sys.stderr)
        return exitcodes.USAGE
    path = _users_file(args)
    if path is None:
        return exitcodes.CONFIG
    try:
        old_lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:
        print(f"relay passwd: {path}: cannot read: {e}", file=sys.stderr)
        return exitcodes.NOINPUT
    kept = [line for line in old_lines if line.strip().partition(":")[0] != user]
    if args.delete:
        if len(kept) == len(old_lines):
            print(f"relay passwd: {path}: no user {user!r}", file=sys.stderr)
            return exitcodes.NOUSER
        new_lines = kept
    else:
        password = _read_password()
        if password is None:
            return exitcodes.DATAERR
        try:
            new_lines = [*kept, make_user_line(user, password)]
        except ValueError as e:
            print(f"relay passwd: {e}", file=sys.stderr)
            return exitcodes.USAGE
    text = "".join(f"{line}\n" for line in new_lines)
    try:
        parse_users(text)  # the gateway must be able to read what we write
    except UsersFileError as e:
        print(f"relay passwd: {path}: {e}", file=sys.stderr)
        return exitcodes.DATAERR
    try:
        _replace_durably(path, text)
    except OSError as e:
        print(f"relay passwd: {path}: cannot write: {e}", file=sys.stderr)
        return exitcodes.CANTCREAT
    action = "removed" if args.delete else "set"
    print(f"relay passwd: {user}: password {action} in {path}")
    return exitcodes.OK


def _users_file(args: argparse.Namespace) -> Path | None:
    """The file from -f, else from the configuration; None (reported) if neither."""
    if args.file is not None:
        return Path(args.file)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print_config_error(e, args.config)
        return None
    if config.smtp.auth_users_file is None:
        print("relay passwd: no [smtp] auth_users_file configured; give -f FILE", file=sys.stderr)
        return None
    return config.smtp.auth_users_file


def _read_password() -> str | None:
    """One line from stdin, or asked twice at a terminal; None (reported) if unusable."""
    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            print("relay passwd: the passwords differ", file=sys.stderr)
            return None
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay passwd: empty password refused", file=sys.stderr)
        return None
    return password


def _replace_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (tmp, fsync, rename, fsync dir)."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fchmod(tmp.fileno(), 0o600)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_directory(directory)

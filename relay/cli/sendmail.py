"""``relay sendmail`` / ``relay-sendmail``: the ``/usr/sbin/sendmail`` that programs call.

Options are read the way Postfix's sendmail reads them (the same ``getopt`` letters, so
anything a program passes to Postfix parses here): recipients as arguments; ``-t`` adds
those of ``To:``, ``Cc:`` and ``Bcc:`` and removes ``Bcc:``; ``-i`` / ``-oi`` (a lone dot
does not end the text); ``-f``/``-r`` sender; ``-F`` full name; ``-bs`` an SMTP dialogue
on standard input and output (:mod:`relay.cli.sendmail_smtp`); ``-bp`` = ``relay queue``;
``-q`` = ``relay flush``; ``-bi``/``-I`` = ``relay aliases check``; ``-C FILE``.  Options
without meaning here (``-oem``, ``-odb``, ``-oQ…``, ``-v``, ``-N``, ``-B``, ``-h``…) are
accepted and ignored, as Postfix does.  Called as ``mailq`` or ``newaliases`` (a link
named so), it does what ``-bp`` or ``-bi`` do.

The configuration is ``-C FILE``, else ``$RELAY_CONFIG``, else ``/etc/relay/relay.toml``
if it exists, else the embedded default.

Mail goes into the maildrop (:mod:`relay.maildrop`), which works whether the relay runs
or not; exit 0 only once the file is durable.  Exit codes (sysexits): 64 bad usage,
65 bad input (an address, a message over the size limit), 75 the message could not be
made durable (try again), 78 a broken configuration; each with one line on stderr.
"""

from __future__ import annotations

import argparse
import getopt
import os
import pwd
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path
from relay.cli import exitcodes
from relay.cli.common import print_config_error
from relay.config import Config, ConfigError, default_config, load_config
from relay.maildrop.compose import (
    MessageTooLarge,
    assemble,
    header_recipients,
    missing_fields,
    read_text,
    split_header,
    to_crlf,
    without_fields,
)
from relay.maildrop.dropfile import encode_drop_file
from relay.maildrop.layout import MaildropLayout
from relay.maildrop.submit import drop

__all__ = ["SYSTEM_CONFIG", "Invocation", "main", "parse_invocation", "run"]

SYSTEM_CONFIG = Path("/etc/relay/relay.toml")
# Postfix's sendmail getopt letters: every option a program may pass parses.
_OPTIONS = "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"
_MODES = {"m": "send", "s": "smtp", "p": "list", "i": "aliases"}


class UsageError(Exception):
    """A command line sendmail cannot carry out (exit 64)."""


@dataclass(slots=True)
class Invocation:
    """What the command line asks for."""

    mode: str = "send"  # send, smtp, list, flush, aliases
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False  # -t
    dot_ends: bool = True  # without -i
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: Path | None = None  # -C


def parse_invocation(argv: Sequence[str], program: str = "sendmail") -> Invocation:
    """Read a sendmail command line; UsageError if it cannot be carried out."""
    inv = Invocation()
    if program == "mailq":
        inv.mode = "list"
    elif program == "newaliases":
        inv.mode = "aliases"
    # A bare -q (flush now) has no value; getopt would take the next argument for one.
    args = ["-q0" if a == "-q" else a for a in argv]
    try:
        options, inv.recipients = getopt.getopt(args, _OPTIONS)
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    for option, value in options:
        if option == "-b":
            if value not in _MODES:
                raise UsageError(f"-b{value} is not supported (-bm, -bs, -bp, -bi are)")
            inv.mode = _MODES[value]
        elif option == "-I":
            inv.mode = "aliases"
        elif option == "-q":
            inv.mode = "flush"
        elif option == "-t":
            inv.from_headers = True
        elif option == "-i" or (option == "-o" and value == "i"):
            inv.dot_ends = False
        elif option in ("-f", "-r"):
            inv.sender = value
        elif option == "-F":
            inv.full_name = value
        elif option == "-C":
            inv.config = Path(value)
        # everything else (-o?, -v, -N, -B, -h, -V, -X, -O, -L, -R, -U, ...) is ignored
    return inv


def config_path(inv: Invocation) -> Path | None:
    """``-C``, else ``$RELAY_CONFIG``, else the system file if present; None: the default."""
    if inv.config is not None:
        return inv.config
    from_env = os.environ.get("RELAY_CONFIG")
    if from_env:
        return Path(from_env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def main(argv: Sequence[str] | None = None, program: str | None = None) -> int:
    """Run sendmail; the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    if program is None:
        program = os.path.basename(sys.argv[0])
    try:
        inv = parse_invocation(argv, program)
    except UsageError as e:
        return _fail(exitcodes.USAGE, str(e))
    path = config_path(inv)
    try:
        config = default_config() if path is None else load_config(path)
    except ConfigError as e:
        print_config_error(e, path)
        return exitcodes.CONFIG
    if inv.mode in ("list", "flush", "aliases"):
        return _delegate(inv, path)
    if inv.mode == "smtp":
        from relay.cli.sendmail_smtp import serve_stdio

        return serve_stdio(config)
    return submit(inv, config, sys.stdin.buffer)


def _delegate(inv: Invocation, path: Path | None) -> int:
    """``-bp``, ``-q`` and ``-bi``: the ``relay`` subcommands that do them."""
    from relay.cli.aliases_commands import check_aliases
    from relay.cli.queue_commands import run_request
    from relay.queue.protocol import Request

    if inv.mode == "aliases":
        return check_aliases(argparse.Namespace(config=path, file=None))
    args = argparse.Namespace(config=path, json=False)
    if inv.mode == "list":
        return run_request(args, Request("list"))
    return run_request(args, Request("flush"))


def submit(inv: Invocation, config: Config, stdin: BinaryIO) -> int:
    """Read the message, fix its header, drop it; the exit code."""
    hostname = config.relay.hostname
    origin = origin_domain(config)
    try:
        sender = sender_address(inv.sender, origin)
        text = to_crlf(read_text(stdin, dot_ends=inv.dot_ends, limit=config.smtp.max_message_size))
        fields, body = split_header(text)
        wanted = list(inv.recipients)
        if inv.from_headers:
            wanted += header_recipients(fields)
            fields = without_fields(fields, ["bcc"])
        if not wanted:
            return _fail(
                exitcodes.DATAERR if inv.from_headers else exitcodes.USAGE,
                "no recipients: give them as arguments, or use -t",
            )
        recipients = [recipient_address(r, origin) for r in wanted]
    except MessageTooLarge as e:
        return _fail(exitcodes.DATAERR, str(e))
    except AddressError as e:
        return _fail(exitcodes.DATAERR, str(e))
    header_sender = str(sender) if sender is not None else f"MAILER-DAEMON@{origin}"
    fields += missing_fields(
        fields, sender=header_sender, full_name=inv.full_name, hostname=hostname, now=time.time()
    )
    text = assemble(fields, body)
    if len(text) > config.smtp.max_message_size:
        return _fail(
            exitcodes.DATAERR, f"message larger than {config.smtp.max_message_size} octets"
        )
    return drop_message(config, encode_drop_file(sender, recipients, text))


def drop_message(config: Config, data: bytes) -> int:
    """Write a drop file; 0 once it is durable, 75 if it cannot be."""
    layout = MaildropLayout(config.relay.maildrop)
    try:
        drop(layout, data)
    except OSError as e:
        where = e.filename or layout.drop_dir
        return _fail(exitcodes.TEMPFAIL, f"cannot queue the message in {where}: {e.strerror}")
    return exitcodes.OK


def origin_domain(config: Config) -> str:
    """The domain an unqualified name gets (Postfix's myorigin): the first local domain."""
    return (config.relay.local_domains or (config.relay.hostname,))[0]


def user_name() -> str:
    """The login name of the user running this (the default sender's local part)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def sender_address(given: str | None, origin: str) -> Address | None:
    """``-f``'s address (``<>`` or empty: the null sender), else the user's; AddressError."""
    text = user_name() if given is None else given.strip()
    if text in ("", "<>"):
        return None
    return parse_reverse_path(_path(text, origin), smtputf8=True)


def recipient_address(given: str, origin: str) -> Address:
    """A recipient as a program writes it (``bob``, ``bob@x``, ``<bob@x>``); AddressError."""
    return parse_forward_path(_path(given.strip(), origin), smtputf8=True)


def _path(text: str, origin: str) -> str:
    inner = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if "@" not in inner:
        inner = f"{inner}@{origin}"  # an unqualified name is local, as in Postfix
    return f"<{inner}>"


def _fail(code: int, message: str) -> int:
    print(f"sendmail: {message}", file=sys.stderr)
    return code


def run() -> None:
    """Console-script entry point (``relay-sendmail``, or a link named mailq/newaliases)."""
    sys.exit(main())

"""Command lines into command events: syntax only, given what it depends on explicitly.

The server engine calls :func:`parse_command` with a :class:`ParseContext`: the few
facts of the session that change what a line means (whether EHLO was said, whether the
transaction asked for SMTPUTF8, the size limit, what ``<postmaster>`` stands for).
Whether the command is allowed now, and what the answer is, are the engine's business
(:mod:`relay.sansio.smtp.state`), so a parser never looks at a session.

A malformed line raises :class:`~.wire.CommandSyntaxError` carrying the reply to send.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from relay.address import Address, AddressError, parse_forward_path, parse_reverse_path
from relay.envelope import BodyType
from relay.sansio.smtp.events import (
    Auth,
    AuthResponse,
    Bdat,
    CommandEvent,
    Data,
    Ehlo,
    Helo,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
)
from relay.sansio.smtp.wire import (
    CommandLine,
    CommandSyntaxError,
    parse_parameters,
    split_path_argument,
    xtext_decode,
)

__all__ = [
    "BAD_SASL",
    "MalformedInitialResponse",
    "ParseContext",
    "decode_sasl",
    "parse_command",
    "parse_sasl_response",
]


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What a command line's meaning depends on, besides its own text.

    :meth:`of` gives the one shared instance for each combination: a session changes its
    context twice or so and allocates nothing for it.
    """

    max_message_size: int
    esmtp: bool = False  # EHLO was said: MAIL may carry parameters
    smtputf8: bool = False  # the transaction's MAIL asked for SMTPUTF8
    postmaster: Address | None = None  # what the domain-less <postmaster> means

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(
        max_message_size: int, esmtp: bool, smtputf8: bool, postmaster: Address | None
    ) -> ParseContext:
        """The shared context for these values."""
        return ParseContext(max_message_size, esmtp, smtputf8, postmaster)


class MalformedInitialResponse(CommandSyntaxError):
    """``AUTH`` with an initial response that is not base64: ``command`` is the rest.

    Not answered at once: the engine first checks, as for any AUTH, that the command is
    in sequence and AUTH is available, and answers ``501 5.5.2`` only for a mechanism
    it knows.
    """

    def __init__(self, command: Auth) -> None:
        super().__init__(501, "5.5.2", f"Malformed {command.mechanism} response")
        self.command = command


_HELO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[A-Za-z0-9.:]{1,60}\]")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
_BDAT_ARGUMENT = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.IGNORECASE)

BAD_SASL: Final = object()
"""What :func:`decode_sasl` returns for a response that is not base64 of UTF-8."""


def parse_command(line: CommandLine, context: ParseContext) -> CommandEvent | None:
    """The event for ``line``; None for a verb we do not know (the engine answers it)."""
    parse = _PARSERS.get(line.verb)
    if parse is None:
        return None
    return parse(line, context)


def _parse_hello(line: CommandLine, context: ParseContext) -> CommandEvent:
    name = line.argument
    if not line.ascii or not _HELO_NAME.fullmatch(name):
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: {line.verb} hostname")
    return Ehlo(name) if line.verb == "EHLO" else Helo(name)


def _parse_mail(line: CommandLine, context: ParseContext) -> CommandEvent:
    path, params_text = split_path_argument(line.argument, "FROM")
    params = parse_parameters(params_text)
    if params and not context.esmtp:
        raise CommandSyntaxError(555, "5.5.4", "MAIL parameters need EHLO")
    smtputf8 = "SMTPUTF8" in params
    if smtputf8 and params["SMTPUTF8"] is not None:
        raise CommandSyntaxError(501, "5.5.4", "SMTPUTF8 takes no value")
    if not line.ascii and not smtputf8:
        raise CommandSyntaxError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
    size = _size_parameter(params.get("SIZE"), "SIZE" in params, context.max_message_size)
    body = _body_parameter(params.get("BODY"), "BODY" in params)
    auth = None
    if "AUTH" in params:
        value = params["AUTH"]
        if value is None:
            raise CommandSyntaxError(501, "5.5.4", "AUTH= needs a value")
        auth = xtext_decode(value)
    unknown = set(params) - {"SIZE", "BODY", "SMTPUTF8", "AUTH"}
    if unknown:
        raise CommandSyntaxError(555, "5.5.4", f"Unsupported parameter {sorted(unknown)[0]}")
    try:
        reverse_path = parse_reverse_path(path, smtputf8=smtputf8)
    except AddressError as e:
        raise CommandSyntaxError(501, "5.1.7", f"Bad sender address syntax: {e}") from None
    return MailFrom(reverse_path, size, body, smtputf8, auth)


def _size_parameter(value: str | None, given: bool, limit: int) -> int | None:
    if not given:
        return None
    if value is None or not _SIZE_VALUE.fullmatch(value):
        raise CommandSyntaxError(501, "5.5.4", "SIZE needs a number")
    size = int(value)
    if size > limit:
        raise CommandSyntaxError(552, "5.3.4", "Message size exceeds fixed maximum message size")
    return size


def _body_parameter(value: str | None, given: bool) -> BodyType:
    if not given:
        return BodyType.SEVEN_BIT
    upper = (value or "").upper()
    if upper == "7BIT":
        return BodyType.SEVEN_BIT
    if upper == "8BITMIME":
        return BodyType.EIGHT_BIT_MIME
    raise CommandSyntaxError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")


def _parse_rcpt(line: CommandLine, context: ParseContext) -> CommandEvent:
    path, params_text = split_path_argument(line.argument, "TO")
    params = parse_parameters(params_text)
    if params:
        raise CommandSyntaxError(555, "5.5.4", f"Unsupported parameter {next(iter(params))}")
    smtputf8 = context.smtputf8
    if not line.ascii and not smtputf8:
        raise CommandSyntaxError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
    if path.lower() == "<postmaster>" and context.postmaster is not None:
        return RcptTo(context.postmaster)
    try:
        return RcptTo(parse_forward_path(path, smtputf8=smtputf8))
    except AddressError as e:
        raise CommandSyntaxError(501, "5.1.3", f"Bad recipient address syntax: {e}") from None


_NO_ARGUMENT: Final[dict[str, Callable[[], CommandEvent]]] = {
    "DATA": Data,
    "RSET": Rset,
    "QUIT": Quit,
    "STARTTLS": StartTls,
}


def _parse_no_argument(line: CommandLine, context: ParseContext) -> CommandEvent:
    if line.argument:
        raise CommandSyntaxError(501, "5.5.4", f"Syntax: {line.verb} takes no argument")
    return _NO_ARGUMENT[line.verb]()


def _parse_noop(line: CommandLine, context: ParseContext) -> CommandEvent:
    return Noop()


def _parse_help(line: CommandLine, context: ParseContext) -> CommandEvent:
    return Help()


def _parse_vrfy(line: CommandLine, context: ParseContext) -> CommandEvent:
    if not line.argument:
        raise CommandSyntaxError(501, "5.5.4", "Syntax: VRFY address")
    return Vrfy(line.argument)


def _parse_auth(line: CommandLine, context: ParseContext) -> CommandEvent:
    mechanism, _, initial = line.argument.partition(" ")
    initial = initial.strip(" ")
    if not mechanism or " " in initial:
        raise CommandSyntaxError(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
    mechanism = mechanism.upper()
    if not initial:
        return Auth(mechanism)
    decoded = decode_sasl(initial)
    if not isinstance(decoded, bytes):
        raise MalformedInitialResponse(Auth(mechanism))
    return Auth(mechanism, decoded)


def _parse_bdat(line: CommandLine, context: ParseContext) -> CommandEvent:
    match = _BDAT_ARGUMENT.fullmatch(line.argument)
    if match is None:
        raise CommandSyntaxError(501, "5.5.4", "Syntax: BDAT size [LAST]")
    return Bdat(int(match.group(1)), match.group(2) is not None)


def decode_sasl(text: str) -> bytes | object:
    """A SASL response: strict base64 whose content is UTF-8, ``=`` for empty.

    :data:`BAD_SASL` if it is neither (the caller answers ``501 5.5.2``).
    """
    if text == "=":
        return b""
    try:
        decoded = base64.b64decode(text.encode("ascii"), validate=True)
        decoded.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return BAD_SASL
    return decoded


def parse_sasl_response(raw: bytes) -> AuthResponse | None:
    """A line during a SASL exchange: ``*`` cancels; None if it is not base64 of UTF-8."""
    text = raw.strip(b" ").decode("ascii", errors="replace")
    if text == "*":
        return AuthResponse(None)
    decoded = decode_sasl(text)
    return AuthResponse(decoded) if isinstance(decoded, bytes) else None


_Parser = Callable[[CommandLine, ParseContext], CommandEvent]
_PARSERS: Final[dict[str, _Parser]] = {
    "HELO": _parse_hello,
    "EHLO": _parse_hello,
    "MAIL": _parse_mail,
    "RCPT": _parse_rcpt,
    "DATA": _parse_no_argument,
    "RSET": _parse_no_argument,
    "QUIT": _parse_no_argument,
    "STARTTLS": _parse_no_argument,
    "NOOP": _parse_noop,
    "HELP": _parse_help,
    "VRFY": _parse_vrfy,
    "AUTH": _parse_auth,
    "BDAT": _parse_bdat,
}

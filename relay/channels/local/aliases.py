"""The aliases file: parsing (pure, every problem with its line) and expansion.

Format (aliases(5), as Sendmail and Postfix read it)::

    # a comment: a line whose first non-blank character is '#'
    postmaster: alice
    team:       alice, bob,
                carol@partner.test
    archive:    /var/mail/archive
    shared:     /srv/mail/shared/
    tickets:    "|/usr/local/bin/ticket --queue=mail"
    staff:      :include:/etc/relay/staff
    "odd name": alice

A line that starts with a space or tab continues the previous entry.  ``#`` starts a
comment only at the beginning of a line (it is a legal character in a local part).
Targets are separated by commas and are: a local name or an address (a remote one is
forwarded), ``/path`` (append to an mbox file; ``/path/`` with a trailing slash is a
Maildir; ``/dev/null`` discards), ``|command`` (piped to ``/bin/sh -c``) or
``:include:/path`` (a file of more targets, read at each delivery).  A target or a name
containing a comma, a colon or spaces is written in double quotes (a backslash escapes
the next character inside them).  Names are local parts, matched without regard to
case; ``user+tag`` uses the alias ``user+tag`` if there is one, else ``user``.

Why it is built this way:

* **Pure parser, every problem at once.**  :func:`parse_aliases` takes text and returns
  the entries *and* a list of problems, each with its line number, and never raises
  (hypothesis checks that).  The relay refuses to start with a broken file and
  ``relay aliases check`` lists everything wrong in one run, like the configuration.
* **Expansion is separate and I/O-free except for include files**, which it reads
  through a callable it is given (the channel reads them in its thread pool).  It
  returns a plan: mailboxes, files, commands, remote addresses, and failures, each at
  most once (the same mailbox reached twice gets one copy).
* **Loops.**  A name is expanded once on any path.  A name met again below itself
  (``bob: bob, other``, or ``a: b`` + ``b: a``) is not expanded again: it is delivered
  to that user's mailbox if there is such a user, and fails as a loop otherwise.  Any
  address the message already carries a ``Delivered-To:`` for fails as a forwarding
  loop (5.4.6), as in Postfix.
* **Include files are lists of addresses** (and further includes): ``|command`` and
  ``/file`` targets are refused in them, as Postfix does by default, because whoever
  can edit a list must not thereby run commands or write files as the relay.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from relay.address import Address, AddressError, parse_mailbox
from relay.errors import RelayError
from relay.reply import Reply, ReplyCode

__all__ = [
    "Aliases",
    "AliasesError",
    "CommandDelivery",
    "ExpansionContext",
    "FailedTarget",
    "FileDelivery",
    "MailboxDelivery",
    "PlannedDelivery",
    "Problem",
    "RemoteDelivery",
    "Target",
    "TargetKind",
    "expand",
    "load_aliases",
    "parse_aliases",
    "parse_include",
]

MAX_DEPTH = 100
_CHECK_DOMAIN = "example.test"  # any valid domain, to check a local part on its own


class AliasesError(RelayError):
    """An aliases file that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: Iterable[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{source}:{p}" for p in self.problems))


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an aliases (or include) file, at a line (counting from 1)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.line}: {self.message}"


class TargetKind(enum.Enum):
    """What a target names."""

    ADDRESS = "address"
    FILE = "file"
    COMMAND = "command"
    INCLUDE = "include"


@dataclass(frozen=True, slots=True)
class Target:
    """One target of an alias: an address (``domain`` None for a bare local part), a
    file path, a command, or an include file path."""

    kind: TargetKind
    value: str
    domain: str | None = None
    line: int = 0

    def __str__(self) -> str:
        if self.kind is TargetKind.ADDRESS:
            local = Address(self.value, self.domain or _CHECK_DOMAIN).quoted_local_part()
            return local if self.domain is None else f"{local}@{self.domain}"
        prefix = {TargetKind.FILE: "", TargetKind.COMMAND: "|", TargetKind.INCLUDE: ":include:"}
        return f"{prefix[self.kind]}{self.value}"


@dataclass(frozen=True, slots=True)
class AliasEntry:
    """One alias: its name as written, and its targets in order."""

    name: str
    targets: tuple[Target, ...]
    line: int


@dataclass(frozen=True, slots=True)
class Aliases:
    """A parsed aliases file: entries by casefolded name, plus the problems found."""

    entries: Mapping[str, AliasEntry] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[Problem, ...] = ()

    def get(self, name: str) -> AliasEntry | None:
        """The alias called ``name`` (any case), if there is one."""
        return self.entries.get(name.casefold())

    @property
    def has_includes(self) -> bool:
        """Whether expanding may read include files (so must not run in the reactor)."""
        return any(t.kind is TargetKind.INCLUDE for e in self.entries.values() for t in e.targets)


# --------------------------------------------------------------------------- parsing


def parse_aliases(text: str) -> Aliases:
    """Parse an aliases file's text; never raises: problems are returned with line numbers."""
    entries: dict[str, AliasEntry] = {}
    problems: list[Problem] = []
    current: tuple[str, int, list[Target]] | None = None
    problems_before = 0  # problems found before the current entry began

    def close() -> None:
        if current is None:
            return
        name, line, targets = current
        if not targets:
            if len(problems) == problems_before:  # else its bad targets are reported
                problems.append(Problem(line, f"alias {name!r} has no targets"))
            return
        key = name.casefold()
        if key in entries:
            first = entries[key].line
            problems.append(Problem(line, f"duplicate alias {name!r} (first at line {first})"))
            return
        entries[key] = AliasEntry(name, tuple(targets), line)

    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        if _bad_character(line):
            problems.append(Problem(number, f"control character {_bad_character(line)!r}"))
            if line[0] not in " \t":
                close()
                current = None
            continue
        if line[0] in " \t":
            if current is None:
                problems.append(Problem(number, "continuation line with no alias before it"))
                continue
            current[2].extend(_targets(stripped, number, problems, in_include=False))
            continue
        close()
        current = None
        split = _split_name(line, number, problems)
        if split is None:
            continue
        name, rest = split
        problems_before = len(problems)
        current = (name, number, _targets(rest, number, problems, in_include=False))
    close()
    return Aliases(MappingProxyType(entries), tuple(problems))


def parse_include(text: str) -> tuple[tuple[Target, ...], tuple[Problem, ...]]:
    """Parse an ``:include:`` file: targets, comma- or line-separated; ``#`` comments."""
    targets: list[Target] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        bad = _bad_character(line)
        if bad:
            problems.append(Problem(number, f"control character {bad!r}"))
            continue
        targets.extend(_targets(line, number, problems, in_include=True))
    return tuple(targets), tuple(problems)


def load_aliases(path: str | os.PathLike[str]) -> Aliases:
    """Read and parse the file at ``path``; AliasesError if unreadable or with problems."""
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise AliasesError(source, [Problem(0, f"cannot read: {error.strerror}")]) from None
    text, problem = decode_text(data)
    if problem is not None:
        raise AliasesError(source, [problem])
    aliases = parse_aliases(text)
    if aliases.problems:
        raise AliasesError(source, aliases.problems)
    return aliases


def decode_text(data: bytes) -> tuple[str, Problem | None]:
    """The file's text as UTF-8, or a problem naming the line of the first bad byte."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return "", Problem(line, f"not UTF-8 text (byte {error.start})")


def _bad_character(line: str) -> str:
    for char in line:
        if (char < " " and char != "\t") or char == "\x7f" or "\ud800" <= char <= "\udfff":
            return char
    return ""


def _split_name(line: str, number: int, problems: list[Problem]) -> tuple[str, str] | None:
    """Split ``name: rest`` (the name possibly quoted); record a problem and give None if not."""
    if line.startswith('"'):
        scanned = _scan_quoted(line, 0)
        if scanned is None:
            problems.append(Problem(number, "unbalanced quote in alias name"))
            return None
        name, end = scanned
        rest = line[end:].lstrip(" \t")
        if not rest.startswith(":"):
            problems.append(Problem(number, "expected ':' after the quoted alias name"))
            return None
        rest = rest[1:]
    else:
        name, colon, rest = line.partition(":")
        name = name.rstrip(" \t")
        if not colon:
            problems.append(Problem(number, "expected 'name: target, ...' (no ':' found)"))
            return None
        if '"' in name:
            problems.append(Problem(number, "a quote inside an alias name (quote the whole name)"))
            return None
        if any(c in name for c in " \t"):
            problems.append(Problem(number, f"space in alias name {name!r} (quote it)"))
            return None
    problem = _check_name(name)
    if problem:
        problems.append(Problem(number, problem))
        return None
    return name, rest


def _check_name(name: str) -> str:
    if not name:
        return "empty alias name"
    if "@" in name:
        return f"alias name {name!r} has an '@': names are local parts, without a domain"
    try:
        Address(name, _CHECK_DOMAIN)
    except AddressError as error:
        return f"bad alias name {name!r}: {error}"
    return ""


def _scan_quoted(text: str, start: int) -> tuple[str, int] | None:
    """The content of the quoted string at ``text[start]`` and the index after it."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(out), i + 1
        out.append(char)
        i += 1
    return None


def _split_targets(text: str) -> tuple[list[tuple[str, bool]], str]:
    """Split at commas outside quotes: (piece, was wholly quoted) pairs, or an error."""
    pieces: list[tuple[str, bool]] = []
    current: list[str] = []
    quoted_whole = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            pieces.append(("".join(current).strip(" \t"), quoted_whole))
            current, quoted_whole = [], False
            i += 1
            continue
        if char == '"':
            scanned = _scan_quoted(text, i)
            if scanned is None:
                return pieces, "unbalanced quote"
            content, end = scanned
            whole = not "".join(current).strip(" \t") and not _rest_of_piece(text, end)
            if whole:
                current, quoted_whole = [content], True
            else:
                current.append(text[i:end])  # a quoted local part: the address parser decodes it
            i = end
            continue
        current.append(char)
        i += 1
    pieces.append(("".join(current).strip(" \t"), quoted_whole))
    return pieces, ""


def _rest_of_piece(text: str, start: int) -> str:
    """What follows ``start`` up to the next comma, stripped (after a closing quote)."""
    end = text.find(",", start)
    return text[start : None if end == -1 else end].strip(" \t")


def _targets(text: str, number: int, problems: list[Problem], *, in_include: bool) -> list[Target]:
    pieces, error = _split_targets(text)
    if error:
        problems.append(Problem(number, error))
        return []
    targets: list[Target] = []
    last = len(pieces) - 1
    empty_reported = False
    for index, (piece, quoted) in enumerate(pieces):
        if not piece:
            # A trailing comma is fine (the entry may go on); an empty one elsewhere is not.
            if index < last and not empty_reported:
                problems.append(Problem(number, "empty target between commas"))
                empty_reported = True
            continue
        target = _target(piece, quoted, number, problems, in_include)
        if target is not None:
            targets.append(target)
    return targets


def _target(
    piece: str, quoted: bool, number: int, problems: list[Problem], in_include: bool
) -> Target | None:
    where = "in an :include: file " if in_include else ""
    if piece.startswith("|"):
        command = piece[1:].strip(" \t")
        if in_include:
            problems.append(Problem(number, f"mail to a command is not allowed {where}({piece})"))
            return None
        if not command:
            problems.append(Problem(number, "empty command after '|'"))
            return None
        return Target(TargetKind.COMMAND, command, line=number)
    if piece.startswith("/"):
        if in_include:
            problems.append(Problem(number, f"mail to a file is not allowed {where}({piece})"))
            return None
        return Target(TargetKind.FILE, piece, line=number)
    if piece[:9].lower() == ":include:":
        path = piece[9:].strip(" \t")
        if not path.startswith("/"):
            problems.append(Problem(number, f"include file must be an absolute path: {piece!r}"))
            return None
        return Target(TargetKind.INCLUDE, path, line=number)
    return _address_target(piece, quoted, number, problems)


def _address_target(
    piece: str, quoted: bool, number: int, problems: list[Problem]
) -> Target | None:
    try:
        if quoted:
            Address(piece, _CHECK_DOMAIN)
            return Target(TargetKind.ADDRESS, piece, None, number)
        if "@" in piece.rsplit('"', 1)[-1]:
            address = parse_mailbox(piece)
            return Target(TargetKind.ADDRESS, address.local_part, address.domain, number)
        local = parse_mailbox(f"{piece}@{_CHECK_DOMAIN}").local_part
        return Target(TargetKind.ADDRESS, local, None, number)
    except AddressError as error:
        hint = " (separate targets with commas)" if " " in piece and not quoted else ""
        problems.append(Problem(number, f"bad address {piece!r}: {error}{hint}"))
        return None


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True, slots=True)
class MailboxDelivery:
    """Deliver to a local user's mailbox; ``address`` is what ``Delivered-To`` says."""

    user: str
    address: str

    @property
    def key(self) -> str:
        """Identifies the delivery, to deliver once and remember it across retries."""
        return f"mailbox:{self.user}"

    @property
    def label(self) -> str:
        """How replies and logs name it."""
        return self.address


@dataclass(frozen=True, slots=True)
class FileDelivery:
    """Append to a file (an mbox), or a Maildir if ``path`` ends with ``/``; ``address``
    is the alias address that named it (what ``Delivered-To`` says)."""

    path: str
    address: str

    @property
    def key(self) -> str:
        """Identifies the delivery."""
        return f"file:{self.path}"

    @property
    def label(self) -> str:
        """How replies and logs name it."""
        return self.path


@dataclass(frozen=True, slots=True)
class CommandDelivery:
    """Pipe to a command; ``address`` is the alias address that named it."""

    command: str
    address: Address
    extension: str | None = None

    @property
    def key(self) -> str:
        """Identifies the delivery."""
        return f"command:{self.command}"

    @property
    def label(self) -> str:
        """How replies and logs name it."""
        return f"|{self.command}"


@dataclass(frozen=True, slots=True)
class RemoteDelivery:
    """An address that is not local: forwarded through the queue."""

    address: Address

    @property
    def key(self) -> str:
        """Identifies the delivery."""
        return f"remote:{self.address}"

    @property
    def label(self) -> str:
        """How replies and logs name it."""
        return str(self.address)


@dataclass(frozen=True, slots=True)
class FailedTarget:
    """A branch of the expansion that cannot be delivered, and why."""

    what: str
    reply: Reply

    @property
    def key(self) -> str:
        """Identifies the failure (two branches failing alike count once)."""
        return f"failed:{self.what}:{self.reply.code.name}"

    @property
    def label(self) -> str:
        """How replies and logs name it."""
        return self.what


PlannedDelivery = MailboxDelivery | FileDelivery | CommandDelivery | RemoteDelivery | FailedTarget


@dataclass(frozen=True, slots=True)
class ExpansionContext:
    """What expansion needs to know about the host, as callables (no I/O of its own).

    ``find_user`` gives a local part's user name (canonical spelling) or None;
    ``split_extension`` splits ``user+ext``; ``is_local_domain`` says whether an
    address target stays here; ``read_include`` returns an include file's text (and
    raises OSError); ``delivered_to`` holds the casefolded addresses of the message's
    ``Delivered-To`` headers.
    """

    aliases: Aliases
    find_user: Callable[[str], str | None]
    split_extension: Callable[[str], tuple[str, str | None]]
    is_local_domain: Callable[[str], bool]
    read_include: Callable[[str], str]
    delivered_to: frozenset[str] = frozenset()


def loop_reply(address: str) -> Reply:
    """Postfix's answer to a message that already went through this address."""
    return Reply(ReplyCode.NDEL, f"mail forwarding loop for {address}", 550, "5.4.6")


def expand(address: Address, context: ExpansionContext) -> list[PlannedDelivery]:
    """Everything mail to ``address`` (a local address) must be delivered to, once each."""
    return _Expansion(context).run(address)


class _Expansion:
    def __init__(self, context: ExpansionContext) -> None:
        self.context = context
        self.plan: dict[str, PlannedDelivery] = {}

    def run(self, address: Address) -> list[PlannedDelivery]:
        self.local(address.local_part, address.domain, (), (), 0)
        return list(self.plan.values())

    def add(self, item: PlannedDelivery) -> None:
        self.plan.setdefault(item.key, item)

    def fail(self, what: str, reply: Reply) -> None:
        self.add(FailedTarget(what, reply))

    def local(
        self,
        local_part: str,
        domain: str,
        chain: tuple[str, ...],
        includes: tuple[str, ...],
        depth: int,
    ) -> None:
        context = self.context
        name = local_part.casefold()
        shown = str(Address(name, domain))
        if shown.casefold() in context.delivered_to:
            self.fail(shown, loop_reply(shown))
            return
        if depth > MAX_DEPTH:
            self.fail(
                shown, Reply(ReplyCode.NDEL, f"alias expansion too deep at {shown}", 550, "5.4.6")
            )
            return
        base, extension = context.split_extension(name)
        entry = context.aliases.get(name) or (
            context.aliases.get(base) if extension is not None else None
        )
        if entry is not None and entry.name.casefold() not in chain:
            inner = (*chain, entry.name.casefold())
            for target in entry.targets:
                self.target(target, entry.name, domain, inner, includes, depth + 1, extension)
            return
        user = context.find_user(name) or (
            context.find_user(base) if extension is not None else None
        )
        if user is not None:
            self.add(MailboxDelivery(user, shown))
            return
        if entry is not None:
            path = " -> ".join((*chain, entry.name.casefold()))
            self.fail(shown, Reply(ReplyCode.NDEL, f"alias loop: {path}", 550, "5.4.6"))
            return
        self.fail(shown, Reply(ReplyCode.USER, f"unknown user: {shown}"))

    def target(
        self,
        target: Target,
        alias: str,
        domain: str,
        chain: tuple[str, ...],
        includes: tuple[str, ...],
        depth: int,
        extension: str | None,
    ) -> None:
        if target.kind is TargetKind.ADDRESS:
            target_domain = target.domain or domain
            try:
                address = Address(target.value, target_domain)
            except AddressError as error:
                self.fail(str(target), Reply(ReplyCode.NDEL, f"bad alias target: {error}"))
                return
            if self.context.is_local_domain(address.domain):
                self.local(address.local_part, address.domain, chain, includes, depth)
            else:
                self.add(RemoteDelivery(address))
        elif target.kind is TargetKind.FILE:
            self.add(FileDelivery(target.value, str(Address(alias, domain))))
        elif target.kind is TargetKind.COMMAND:
            self.add(CommandDelivery(target.value, Address(alias, domain), extension))
        else:
            self.include(target.value, alias, domain, chain, includes, depth, extension)

    def include(
        self,
        path: str,
        alias: str,
        domain: str,
        chain: tuple[str, ...],
        includes: tuple[str, ...],
        depth: int,
        extension: str | None,
    ) -> None:
        what = f":include:{path}"
        if path in includes:
            self.fail(what, Reply(ReplyCode.NDEL, f"include loop: {what}", 550, "5.4.6"))
            return
        try:
            text = self.context.read_include(path)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            self.fail(what, Reply(ReplyCode.FOPN, f"cannot read include file {path}: {reason}"))
            return
        except UnicodeDecodeError as error:
            self.fail(
                what, Reply(ReplyCode.FIO, f"include file {path}: not UTF-8 ({error.reason})")
            )
            return
        targets, problems = parse_include(text)
        if problems:
            self.fail(what, Reply(ReplyCode.FIO, f"include file {path}:{problems[0]}"))
            return
        for target in targets:
            self.target(target, alias, domain, chain, (*includes, path), depth + 1, extension)

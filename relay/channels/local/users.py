"""Who can receive mail here: configured users, system accounts, and aliases.

One object answers for the SMTP gateway at RCPT time (:meth:`LocalRecipients.exists`)
and for the local channel at delivery time (:meth:`LocalRecipients.find_user`,
:meth:`LocalRecipients.expansion_context`), so the two can never disagree about
whether ``Alice+lists@`` is somebody.

Matching follows Postfix's local(8): the local part is compared without regard to case;
with a recipient delimiter, ``user+tag`` is looked up as itself first (an alias may be
called ``owner-list+bounces``) and then as ``user``; aliases come before users.

Users are, in order: the names in ``[local] users`` and ``[local.mailboxes]`` (virtual
mailboxes owned by the relay, under ``mail_root`` or at their explicit path), then, if
``system_users`` is on, the accounts of the passwd database, whose mail is written as
the account when the relay runs as root.  Passwd lookups are cached for a minute: the
gateway asks in the reactor thread, and a name service can be slow.

``postmaster`` exists in every local domain (RFC 5321 section 4.5.1 requires it): unless
the aliases file says where it goes, :func:`build_local_recipients` adds the alias
``postmaster: <[relay] postmaster>``, so mail to ``Postmaster@`` any local domain is
accepted and delivered where double bounces go.  When ``[relay] postmaster`` is itself
``postmaster@`` a local domain there is nothing to add: it must then be a user (or an
alias in the file), which ``relay check-config`` insists on (:func:`postmaster_problem`).
"""

from __future__ import annotations

import pwd
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from zope.interface import implementer

from relay.address import POSTMASTER, Address, AddressError, parse_mailbox
from relay.channels.local.aliases import (
    AliasEntry,
    Aliases,
    ExpansionContext,
    Target,
    TargetKind,
    load_aliases,
)
from relay.config import Config, LocalSection, MailboxFormat
from relay.interfaces import ILocalRecipients
from relay.mailbox.identity import Identity
from relay.policy.routing import LOCAL, NoRoute, Router

__all__ = [
    "POSTMASTER",
    "LocalRecipients",
    "LocalUser",
    "build_local_recipients",
    "local_domain_test",
    "postmaster_problem",
    "with_postmaster",
]


# The configuration's rule for user names: one safe path component, usable as a local part.
_SAFE_NAME = re.compile(r"[^\s/@:\x00-\x1f\x7f]+")
_CACHE_SECONDS = 60.0
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class LocalUser:
    """A user who has a mailbox here: where it is, its format, and whose files they are.

    ``identity`` is None for the configuration's (virtual) users, whose mailboxes belong
    to the relay, and the passwd account for system users.
    """

    name: str
    mailbox: Path
    format: MailboxFormat
    identity: Identity | None = None


@implementer(ILocalRecipients)
class LocalRecipients:
    """The users and aliases of the local channel (see the module docstring)."""

    def __init__(
        self,
        local: LocalSection,
        aliases: Aliases | None = None,
        *,
        getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.aliases = aliases if aliases is not None else Aliases()
        self._getpwnam = getpwnam
        self._clock = clock
        self._names: dict[str, str] = {}
        for name in (*local.users, *local.mailboxes):
            self._names.setdefault(name.casefold(), name)
        self._system_cache: dict[str, tuple[float, LocalUser | None]] = {}

    # --- ILocalRecipients --------------------------------------------------------------

    def exists(self, address: Address) -> bool:
        """True when the local part names an alias or a user (with or without its tag)."""
        name = address.local_part.casefold()
        base, extension = self.split_extension(name)
        candidates = (name,) if extension is None else (name, base)
        return any(
            self.aliases.get(candidate) is not None or self._is_user(candidate)
            for candidate in candidates
        )

    # --- for the channel ---------------------------------------------------------------

    def split_extension(self, local_part: str) -> tuple[str, str | None]:
        """``("user", "tag")`` for ``user+tag``; ``(local_part, None)`` without a delimiter.

        Split at the first delimiter, and only if something comes before it (``+x`` is
        a name of its own).
        """
        delimiter = self.local.recipient_delimiter
        if not delimiter:
            return local_part, None
        base, found, extension = local_part.partition(delimiter)
        if not found or not base:
            return local_part, None
        return base, extension

    def find_user(self, name: str) -> LocalUser | None:
        """The user called ``name`` (any case), or None."""
        folded = name.casefold()
        configured = self._names.get(folded)
        if configured is not None:
            return LocalUser(configured, self.local.mailbox_path(configured), self.local.format)
        if self.local.system_users:
            return self._system_user(folded)
        return None

    def _is_user(self, name: str) -> bool:
        """As ``find_user(name) is not None``, without making the user's mailbox path
        (RCPT asks this for every local recipient)."""
        folded = name.casefold()
        if folded in self._names:
            return True
        return self.local.system_users and self._system_user(folded) is not None

    def find_user_name(self, name: str) -> str | None:
        """The canonical name of the user called ``name``, for alias expansion."""
        user = self.find_user(name)
        return None if user is None else user.name

    def expansion_context(
        self,
        *,
        is_local_domain: Callable[[str], bool],
        read_include: Callable[[str], str],
        delivered_to: frozenset[str] = frozenset(),
    ) -> ExpansionContext:
        """What :func:`.aliases.expand` needs, bound to these users and aliases."""
        return ExpansionContext(
            aliases=self.aliases,
            find_user=self.find_user_name,
            split_extension=self.split_extension,
            is_local_domain=is_local_domain,
            read_include=read_include,
            delivered_to=delivered_to,
        )

    # --- passwd ------------------------------------------------------------------------

    def _system_user(self, name: str) -> LocalUser | None:
        now = self._clock()
        cached = self._system_cache.get(name)
        if cached is not None and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        user = self._lookup_passwd(name)
        if len(self._system_cache) >= _CACHE_LIMIT:
            self._system_cache.clear()
        self._system_cache[name] = (now, user)
        return user

    def _lookup_passwd(self, name: str) -> LocalUser | None:
        if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
            return None
        try:
            entry = self._getpwnam(name)
        except (KeyError, OSError, ValueError):
            return None
        if entry.pw_name != name or not _SAFE_NAME.fullmatch(entry.pw_name):
            return None
        identity = Identity(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir or "/")
        return LocalUser(
            entry.pw_name, self.local.mailbox_path(entry.pw_name), self.local.format, identity
        )


def build_local_recipients(config: Config, aliases: Aliases | None = None) -> LocalRecipients:
    """The local users and aliases of ``config``, ``postmaster`` included (for the SMTP
    gateway's RCPT checks, the local channel and ``relay aliases expand``).

    Reads the aliases file now unless ``aliases`` are given; raises
    :class:`.aliases.AliasesError` listing every problem if it cannot be used, so
    the relay does not start with half its aliases.
    """
    if aliases is None:
        path = config.local.aliases
        aliases = load_aliases(path) if path is not None else Aliases()
    postmaster = parse_mailbox(config.relay.postmaster)
    return LocalRecipients(
        config.local, with_postmaster(aliases, postmaster, local_domain_test(config))
    )


def with_postmaster(
    aliases: Aliases, postmaster: Address, is_local_domain: Callable[[str], bool]
) -> Aliases:
    """``aliases`` plus ``postmaster: <postmaster>``, unless the file has a postmaster
    alias of its own or ``postmaster`` is ``postmaster@`` a local domain (itself)."""
    if aliases.get(POSTMASTER) is not None:
        return aliases
    if postmaster.local_part.casefold() == POSTMASTER and is_local_domain(postmaster.domain):
        return aliases
    target = Target(TargetKind.ADDRESS, postmaster.local_part, postmaster.domain)
    entry = AliasEntry(POSTMASTER, (target,), 0)
    return replace(aliases, entries=MappingProxyType({**aliases.entries, POSTMASTER: entry}))


def postmaster_problem(config: Config, recipients: LocalRecipients) -> str | None:
    """Why ``[relay] postmaster`` cannot receive mail, or None: a local address must be a
    user or an alias, or double bounces and mail to postmaster@ would be lost."""
    postmaster = parse_mailbox(config.relay.postmaster)
    if not local_domain_test(config)(postmaster.domain) or recipients.exists(postmaster):
        return None
    return (
        f"relay.postmaster: {postmaster} is a local address but neither a user nor an alias "
        "(mail to postmaster@ and double bounces would be lost): add it to local.users or "
        "the aliases file, or name another address"
    )


def local_domain_test(config: Config) -> Callable[[str], bool]:
    """Whether mail for a domain stays here: what the deliverer's router says.

    Asking :class:`~relay.policy.routing.Router` itself (rather than re-deciding from
    ``local_domains`` and the routes) keeps aliases, ``relay aliases`` and delivery in
    agreement: local domains first, then the first matching ``[[route]]``, and a
    loopback address literal is this host.
    """
    router = Router(config)

    def is_local_domain(domain: str) -> bool:
        try:
            return router.route(Address("postmaster", domain)) == LOCAL
        except (NoRoute, AddressError):
            return False

    return is_local_domain

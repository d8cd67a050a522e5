"""``[local]`` and ``[local.mailboxes]``: the local mailboxes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from relay.config.model import LocalSection
from relay.config.reader import _Paths, _Table
from relay.config.values import (
    _USER_RULE,
    _boolean,
    _delimiter,
    _is_user_name,
    _mailbox_format,
    _user_name,
)


def _read_local(t: _Table, paths: _Paths) -> LocalSection:
    d = LocalSection()
    return LocalSection(
        mail_root=t.get("mail_root", paths.path, paths.base / d.mail_root),
        format=t.get("format", _mailbox_format, d.format),
        users=t.get_list("users", _user_name, d.users, "user names", unique=True),
        mailboxes=_read_mailboxes(t.table("mailboxes"), paths),
        aliases=t.get("aliases", paths.file, d.aliases),
        recipient_delimiter=t.get("recipient_delimiter", _delimiter, d.recipient_delimiter),
        system_users=t.get("system_users", _boolean, d.system_users),
    )


def _read_mailboxes(t: _Table, paths: _Paths) -> Mapping[str, Path]:
    """``[local.mailboxes]``: user name → mailbox path; every key is a name, none unknown."""
    mailboxes: dict[str, Path] = {}
    for name in t.data:
        t.known.add(name)
        if not _is_user_name(name):
            t.problem(name, f"not a valid user name ({_USER_RULE})")
            continue
        mailboxes[name] = t.get(name, paths.path, paths.base)
    return MappingProxyType(mailboxes)

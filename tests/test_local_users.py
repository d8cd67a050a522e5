"""ILocalRecipients: who exists here, as the gateway asks at RCPT time."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from relay.channels.local.aliases import (
    AliasesError,
    MailboxDelivery,
    RemoteDelivery,
    expand,
    parse_aliases,
)
from relay.channels.local.users import LocalRecipients, build_local_recipients, local_domain_test
from relay.config import MailboxFormat, parse_config
from relay.interfaces import ILocalRecipients
from relay.mailbox.identity import Identity

from support.local_channel import address, make_config


def _recipients(tmp_path: Path, local: str = "", aliases: str | None = None) -> LocalRecipients:
    return build_local_recipients(make_config(tmp_path, local, aliases=aliases))


def test_provides_ilocalrecipients(tmp_path: Path) -> None:
    """The implementation verifies against ILocalRecipients."""
    assert verifyObject(ILocalRecipients, _recipients(tmp_path))


def test_configured_users_in_any_case_and_with_tags(tmp_path: Path) -> None:
    """users and [local.mailboxes] names exist, matched without case, with a +tag too."""
    recipients = _recipients(
        tmp_path, 'users = ["Alice"]\n[local.mailboxes]\narchive = "/srv/archive"'
    )
    for text in ("alice@example.test", "ALICE@example.test", "alice+lists@example.test"):
        assert recipients.exists(address(text)), text
    assert recipients.exists(address("Archive+2024@example.test"))
    assert not recipients.exists(address("bob@example.test"))
    assert not recipients.exists(address("+alice@example.test"))
    alice = recipients.find_user("ALICE")
    assert alice is not None
    assert (alice.name, alice.mailbox, alice.format, alice.identity) == (
        "Alice",
        tmp_path / "var/mail/Alice",
        MailboxFormat.MAILDIR,
        None,
    )
    archive = recipients.find_user("archive")
    assert archive is not None and archive.mailbox == Path("/srv/archive")


def test_the_delimiter_is_configurable(tmp_path: Path) -> None:
    """With '-' as delimiter alice-x is alice; with '' nothing is split."""
    dash = _recipients(tmp_path, 'users = ["alice"]\nrecipient_delimiter = "-"')
    assert dash.exists(address("alice-x@example.test"))
    assert not dash.exists(address("alice+x@example.test"))
    assert dash.split_extension("alice-x-y") == ("alice", "x-y")
    off = _recipients(tmp_path, 'users = ["alice"]\nrecipient_delimiter = ""')
    assert not off.exists(address("alice+x@example.test"))
    assert off.split_extension("alice+x") == ("alice+x", None)


def test_aliases_exist_and_postmaster_only_with_one(tmp_path: Path) -> None:
    """An alias name exists (with tags too); postmaster exists when an alias or user says so."""
    plain = _recipients(tmp_path, 'users = ["alice"]')
    assert not plain.exists(address("postmaster@example.test"))
    aliased = _recipients(tmp_path, 'users = ["alice"]', aliases="PostMaster: alice\nlist: alice\n")
    assert aliased.exists(address("postmaster@example.test"))
    assert aliased.exists(address("POSTMASTER@example.test"))
    assert aliased.exists(address("list+bounces@example.test"))
    as_user = _recipients(tmp_path, 'users = ["postmaster"]')
    assert as_user.exists(address("Postmaster@example.test"))


def test_system_users_only_when_enabled(tmp_path: Path) -> None:
    """Accounts of the passwd database are users only with system_users = true."""
    assert not _recipients(tmp_path).exists(address("daemon@example.test"))
    recipients = _recipients(tmp_path, "system_users = true")
    assert recipients.exists(address("Daemon@example.test"))
    user = recipients.find_user("daemon")
    entry = pwd.getpwnam("daemon")
    assert user is not None
    assert user.identity == Identity(entry.pw_uid, entry.pw_gid, "daemon", entry.pw_dir)
    assert user.mailbox == tmp_path / "var/mail/daemon"
    assert not recipients.exists(address("no-such-account-here@example.test"))


def test_passwd_lookups_are_cached_and_names_checked(tmp_path: Path) -> None:
    """Lookups are cached for a minute; unsafe names never reach the passwd database."""
    asked: list[str] = []
    now = [0.0]

    def getpwnam(name: str) -> pwd.struct_passwd:
        asked.append(name)
        if name == "eve":
            return pwd.struct_passwd(("eve", "x", 1000, 1000, "", "/home/eve", "/bin/sh"))
        raise KeyError(name)

    config = make_config(tmp_path, "system_users = true")
    recipients = LocalRecipients(config.local, getpwnam=getpwnam, clock=lambda: now[0])
    assert recipients.find_user("eve") is not None
    assert recipients.find_user("EVE") is not None
    assert recipients.find_user("ghost") is None
    assert recipients.find_user("ghost") is None
    assert asked == ["eve", "ghost"]
    now[0] = 61.0
    assert recipients.find_user("eve") is not None
    assert asked == ["eve", "ghost", "eve"]
    for unsafe in ("..", "a/b", "a b", "x:y"):
        assert recipients.find_user(unsafe) is None
    assert asked == ["eve", "ghost", "eve"]


def test_a_broken_aliases_file_stops_the_build(tmp_path: Path) -> None:
    """build_local_recipients refuses an aliases file with problems, listing all of them."""
    with pytest.raises(AliasesError) as caught:
        _recipients(tmp_path, aliases="ok: alice\nbad line\nx: ,,\n")
    assert [p.line for p in caught.value.problems] == [2, 3]
    assert str(caught.value).startswith(f"{tmp_path / 'aliases'}:2: ")


def test_recipients_can_be_made_from_parsed_aliases(tmp_path: Path) -> None:
    """LocalRecipients takes an Aliases directly (the CLI and tests use this)."""
    config = make_config(tmp_path)
    recipients = LocalRecipients(config.local, parse_aliases("team: a@elsewhere.test\n"))
    assert recipients.exists(address("team@example.test"))


def test_local_domain_test_agrees_with_the_router(tmp_path: Path) -> None:
    """A local domain that also has an smtp route, and a loopback literal, stay local."""
    config = parse_config(
        '[relay]\nhostname = "h.example.test"\nlocal_domains = ["example.test"]\n'
        '[[route]]\ndomain = "example.test"\nchannel = "smtp"\nsmarthost = "127.0.0.1:2526"\n'
        '[[route]]\ndomain = "away.test"\nchannel = "smtp"\n',
        tmp_path,
    )
    is_local = local_domain_test(config)
    assert is_local("example.test")
    assert is_local("[127.0.0.1]")
    assert not is_local("away.test")
    assert not is_local("elsewhere.test")


def _with_postmaster(tmp_path: Path, postmaster: str, local: str) -> LocalRecipients:
    text = (
        f'[relay]\nhostname = "mx.example.test"\npostmaster = "{postmaster}"\n'
        f'local_domains = ["example.test", "other.example.test"]\n[local]\n{local}\n'
    )
    return build_local_recipients(parse_config(text, tmp_path))


def _expanded(recipients: LocalRecipients, tmp_path: Path, text: str) -> list[object]:
    config = make_config(tmp_path)
    context = recipients.expansion_context(
        is_local_domain=local_domain_test(config), read_include=lambda path: ""
    )
    return expand(address(text), context)


def test_postmaster_of_every_local_domain_is_the_configured_postmaster(tmp_path: Path) -> None:
    """postmaster@ any local domain, in any case, exists and expands to [relay] postmaster."""
    recipients = _with_postmaster(tmp_path, "alice@example.test", 'users = ["alice"]')
    for text in (
        "postmaster@example.test",
        "PostMaster@other.example.test",
        "POSTMASTER@[127.0.0.1]",
    ):
        assert recipients.exists(address(text)), text
        assert _expanded(recipients, tmp_path, text) == [
            MailboxDelivery("alice", "alice@example.test")
        ]


def test_a_remote_postmaster_is_forwarded(tmp_path: Path) -> None:
    """With [relay] postmaster at another domain, postmaster@ here is forwarded there."""
    recipients = _with_postmaster(tmp_path, "hostmaster@corp.test", "users = []")
    assert recipients.exists(address("postmaster@example.test"))
    assert _expanded(recipients, tmp_path, "postmaster@example.test") == [
        RemoteDelivery(address("hostmaster@corp.test"))
    ]


def test_the_aliases_file_and_a_postmaster_user_come_first(tmp_path: Path) -> None:
    """An alias postmaster in the file wins; postmaster@ itself is the user postmaster."""
    (tmp_path / "aliases").write_text("Postmaster: bob\n")
    filed = _with_postmaster(
        tmp_path, "alice@example.test", 'users = ["alice", "bob"]\naliases = "aliases"'
    )
    assert _expanded(filed, tmp_path, "postmaster@example.test") == [
        MailboxDelivery("bob", "bob@example.test")
    ]
    itself = _with_postmaster(tmp_path, "postmaster@example.test", 'users = ["postmaster"]')
    assert _expanded(itself, tmp_path, "postmaster@other.example.test") == [
        MailboxDelivery("postmaster", "postmaster@other.example.test")
    ]
    nobody = _with_postmaster(tmp_path, "postmaster@example.test", 'users = ["alice"]')
    assert not nobody.exists(address("postmaster@example.test"))

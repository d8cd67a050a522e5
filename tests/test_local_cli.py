"""``relay aliases check`` and ``relay aliases expand``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from relay.cli import aliases_commands, exitcodes

CONFIG = """\
[relay]
hostname = "mx.example.test"
local_domains = ["example.test"]
[local]
users = ["alice", "bob"]
aliases = "aliases"
"""


def _run(argv: list[str]) -> int:
    """Parse and run like ``relay`` does, with this module's subcommand registered."""
    parser = argparse.ArgumentParser(prog="relay")
    aliases_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _setup(tmp_path: Path, aliases: str) -> Path:
    (tmp_path / "aliases").write_text(aliases)
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    return config


def test_check_ok_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A good file: exit 0 and one summary line."""
    config = _setup(tmp_path, "postmaster: alice\nteam: alice, bob, far@remote.test\n")
    assert _run(["aliases", "check", "-c", str(config)]) == exitcodes.OK
    out = capsys.readouterr().out
    assert out == (
        f"relay: aliases ok: {tmp_path / 'aliases'}: "
        "2 aliases (4 addresses, 0 files, 0 commands, 0 includes)\n"
    )


def test_check_lists_every_problem_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Syntax and delivery problems all come out, each with file and line; exit 78."""
    include = tmp_path / "members"
    include.write_text("alice\n/etc/passwd\n")
    text = (
        "ok: alice\n"  # 1
        "no colon\n"  # 2
        "typo: alcie\n"  # 3
        f"list: :include:{include}\n"  # 4
        f"gone: :include:{tmp_path}/missing\n"  # 5
        "loop1: loop2\n"  # 6
        "loop2: loop1\n"  # 7
        f"box: {tmp_path}/nodir/box\n"  # 8
        '"cmd": "|/nonexistent/prog --x"\n'  # 9
    )
    config = _setup(tmp_path, text)
    assert _run(["aliases", "check", "-c", str(config)]) == exitcodes.CONFIG
    aliases = tmp_path / "aliases"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"relay: {aliases}:2: expected 'name: target, ...' (no ':' found)",
        f"relay: {aliases}:3: alias 'typo': no local user or alias 'alcie'",
        f"relay: {include}:2: mail to a file is not allowed in an :include: file (/etc/passwd)",
        f"relay: {aliases}:5: include file {tmp_path}/missing: No such file or directory",
        f"relay: {aliases}:8: alias 'box': directory {tmp_path}/nodir of "
        f"{tmp_path}/nodir/box does not exist",
        f"relay: {aliases}:9: alias 'cmd': command /nonexistent/prog is not an executable file",
        f"relay: {aliases}:6: alias 'loop1': alias loop: loop1 -> loop2 -> loop1",
        f"relay: {aliases}:7: alias 'loop2': alias loop: loop2 -> loop1 -> loop2",
        f"relay: {aliases}: 8 problems",
    ]


def test_check_another_file_and_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-f checks a file of one's choice; without any aliases file there is nothing to do."""
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG.replace('aliases = "aliases"\n', ""))
    assert _run(["aliases", "check", "-c", str(config)]) == exitcodes.OK
    assert "nothing to check" in capsys.readouterr().out
    other = tmp_path / "other"
    other.write_text("x: alice\ny\n")
    assert _run(["aliases", "check", "-c", str(config), "-f", str(other)]) == exitcodes.CONFIG
    assert f"relay: {other}:2: " in capsys.readouterr().err


def test_check_a_bad_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration that does not load: its problems, exit 78."""
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)  # names an aliases file that does not exist
    assert _run(["aliases", "check", "-c", str(config)]) == exitcodes.CONFIG
    assert "local.aliases: file not found" in capsys.readouterr().err


def test_expand_shows_each_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """expand prints one line per delivery; a failing part makes it exit 67."""
    config = _setup(tmp_path, 'team: alice, bob, far@remote.test, "|/bin/cat", /tmp/box, ghost\n')
    assert _run(["aliases", "expand", "-c", str(config), "Team+x"]) == exitcodes.NOUSER
    assert capsys.readouterr().out.splitlines() == [
        f"alice@example.test: mailbox of alice maildir {tmp_path}/var/mail/alice",
        f"bob@example.test: mailbox of bob maildir {tmp_path}/var/mail/bob",
        "far@remote.test: forwarded (remote)",
        "team@example.test: command |/bin/cat",
        "team@example.test: file /tmp/box",
        "ghost@example.test: fails: 550 5.1.1 unknown user: ghost@example.test",
    ]
    assert _run(["aliases", "expand", "-c", str(config), "alice@example.test"]) == exitcodes.OK
    assert _run(["aliases", "expand", "-c", str(config), "a b@"]) == exitcodes.DATAERR


def test_aliases_without_action_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay aliases`` alone is a usage error (64) with help on stderr."""
    assert _run(["aliases"]) == exitcodes.USAGE
    assert "check" in capsys.readouterr().err


def test_expand_postmaster_shows_where_it_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a postmaster alias, expand PostMaster shows [relay] postmaster's mailbox."""
    config = _setup(tmp_path, "team: alice\n")
    config.write_text(CONFIG.replace("[local]", 'postmaster = "bob@example.test"\n[local]'))
    assert _run(["aliases", "expand", "-c", str(config), "PostMaster"]) == exitcodes.OK
    assert capsys.readouterr().out.splitlines() == [
        f"bob@example.test: mailbox of bob maildir {tmp_path}/var/mail/bob"
    ]

"""sendmail's command line as Postfix reads it: every option a program passes parses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.cli.sendmail import Invocation, UsageError, parse_invocation


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bob"], Invocation(recipients=["bob"])),
        (["-t", "-i"], Invocation(from_headers=True, dot_ends=False)),
        (["-oi", "-f", "a@b", "x"], Invocation(recipients=["x"], sender="a@b", dot_ends=False)),
        (["-ti", "-fa@b"], Invocation(from_headers=True, dot_ends=False, sender="a@b")),
        (["-r", "a@b", "-F", "Ann Example", "x"], Invocation(recipients=["x"], sender="a@b")),
        (["-bs"], Invocation(mode="smtp")),
        (["-bp"], Invocation(mode="list")),
        (["-q"], Invocation(mode="flush")),
        (["-q30m"], Invocation(mode="flush")),
        (["-bi"], Invocation(mode="aliases")),
        (["-I"], Invocation(mode="aliases")),
        (["-C", "/etc/x.toml", "y"], Invocation(recipients=["y"], config=Path("/etc/x.toml"))),
        (["-oem", "-odi", "-odb", "-oQ/q", "-v", "-N", "never", "-B", "8BITMIME", "z"], None),
    ],
)
def test_options_mean_what_they_mean_for_postfix(
    argv: list[str], expected: Invocation | None
) -> None:
    """Each option sets what it should; the no-op ones set nothing."""
    got = parse_invocation(argv)
    if expected is None:
        expected = Invocation(recipients=["z"])
    if "-F" in argv:
        expected.full_name = "Ann Example"
    assert got == expected


@pytest.mark.parametrize("program", ["mailq", "newaliases"])
def test_the_program_name_picks_the_mode(program: str) -> None:
    """Linked as mailq or newaliases, it lists the queue or checks the aliases."""
    assert parse_invocation([], program).mode == {"mailq": "list", "newaliases": "aliases"}[program]


@pytest.mark.parametrize("argv", [["-Z"], ["-bd"], ["-bv", "x"], ["-f"], ["--help"]])
def test_what_cannot_be_done_is_a_usage_error(argv: list[str]) -> None:
    """Unknown options, daemon and verify modes, a missing value: UsageError (exit 64)."""
    with pytest.raises(UsageError):
        parse_invocation(argv)


@given(st.lists(st.text(max_size=12), max_size=8))
def test_any_command_line_parses_or_is_a_usage_error(argv: list[str]) -> None:
    """Whatever a program passes, the parser answers an Invocation or a UsageError."""
    try:
        inv = parse_invocation(argv)
    except UsageError:
        return
    assert inv.mode in ("send", "smtp", "list", "flush", "aliases")

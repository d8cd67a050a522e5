"""The aliases file: the pure parser (problems with line numbers) and expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.address import Address
from relay.channels.local.aliases import (
    MAX_DEPTH,
    Aliases,
    AliasesError,
    CommandDelivery,
    ExpansionContext,
    FailedTarget,
    FileDelivery,
    MailboxDelivery,
    PlannedDelivery,
    RemoteDelivery,
    Target,
    TargetKind,
    expand,
    load_aliases,
    parse_aliases,
    parse_include,
)
from relay.reply import ReplyCode

SAMPLE = """\
# comment
postmaster: alice
Team:   alice, bob,
        carol@partner.test
  # an indented comment inside an entry

archive: /var/mail/archive, /srv/shared/
tickets: "|/usr/local/bin/ticket --queue=mail, now"
staff: :include:/etc/relay/staff
"odd name": "john doe", "x y"@partner.test
"""


def _problems(text: str) -> list[str]:
    return [str(p) for p in parse_aliases(text).problems]


# --------------------------------------------------------------------------- parsing


def test_a_sample_file_parses() -> None:
    """Every form of aliases(5) parses into typed targets; lookups ignore case."""
    aliases = parse_aliases(SAMPLE)
    assert aliases.problems == ()
    team = aliases.get("TEAM")
    assert team is not None and team.name == "Team" and team.line == 3
    assert [str(t) for t in team.targets] == ["alice", "bob", "carol@partner.test"]
    assert [t.line for t in team.targets] == [3, 3, 4]
    archive = aliases.get("archive")
    assert archive is not None
    assert [(t.kind, t.value) for t in archive.targets] == [
        (TargetKind.FILE, "/var/mail/archive"),
        (TargetKind.FILE, "/srv/shared/"),
    ]
    tickets = aliases.get("tickets")
    assert tickets is not None
    assert tickets.targets == (
        Target(TargetKind.COMMAND, "/usr/local/bin/ticket --queue=mail, now", line=8),
    )
    staff = aliases.get("staff")
    assert staff is not None
    assert staff.targets == (Target(TargetKind.INCLUDE, "/etc/relay/staff", line=9),)
    odd = aliases.get("Odd Name")
    assert odd is not None
    assert [(t.value, t.domain) for t in odd.targets] == [
        ("john doe", None),
        ("x y", "partner.test"),
    ]
    assert aliases.has_includes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: b\nno colon here\n", ["2: expected 'name: target, ...' (no ':' found)"]),
        (" b\n", ["1: continuation line with no alias before it"]),
        ("a: b\n\na: c\n", ["3: duplicate alias 'a' (first at line 1)"]),
        ("A: b\na: c\n", ["2: duplicate alias 'a' (first at line 1)"]),
        (": b\n", ["1: empty alias name"]),
        ("a:\n", ["1: alias 'a' has no targets"]),
        ('a: "|unterminated\n', ["1: unbalanced quote"]),
        ('"a: b\n', ["1: unbalanced quote in alias name"]),
        ("a: b,,c\n", ["1: empty target between commas"]),
        ("a: |\n", ["1: empty command after '|'"]),
        (
            "a: :include:relative\n",
            ["1: include file must be an absolute path: ':include:relative'"],
        ),
        (
            "a@b.test: c\n",
            ["1: alias name 'a@b.test' has an '@': names are local parts, without a domain"],
        ),
        ("a b: c\n", ["1: space in alias name 'a b' (quote it)"]),
        ("a: b\x00c\n", ["1: control character '\\x00'"]),
    ],
)
def test_problems_are_reported_with_their_line(text: str, expected: list[str]) -> None:
    """Each kind of mistake is reported once, with the line it is on."""
    assert _problems(text) == expected


def test_bad_addresses_say_why_and_hint_at_commas() -> None:
    """An address that does not parse names itself, the reason, and the comma hint."""
    [problem] = _problems("a: b c\n")
    assert problem.startswith("1: bad address 'b c': ")
    assert problem.endswith("(separate targets with commas)")


def test_every_problem_of_a_file_at_once() -> None:
    """A file with several mistakes reports all of them, in line order, and keeps the rest."""
    aliases = parse_aliases("ok: alice\nbad\nalso: b,,c\n x y\nfine: bob\n")
    assert [p.line for p in aliases.problems] == [2, 3, 4]
    assert sorted(aliases.entries) == ["also", "fine", "ok"]


def test_include_files() -> None:
    """Include files hold addresses, comma or line separated; commands and files are refused."""
    targets, problems = parse_include("# members\nalice, bob\ncarol@partner.test\n")
    assert [str(t) for t in targets] == ["alice", "bob", "carol@partner.test"]
    assert problems == ()
    targets, problems = parse_include('alice\n"|/bin/sh"\n/etc/passwd\n')
    assert [str(t) for t in targets] == ["alice"]
    assert [str(p) for p in problems] == [
        "2: mail to a command is not allowed in an :include: file (|/bin/sh)",
        "3: mail to a file is not allowed in an :include: file (/etc/passwd)",
    ]


def test_loading_reports_undecodable_bytes_by_line(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused naming the line of the bad byte."""
    path = tmp_path / "aliases"
    path.write_bytes(b"a: b\nc: \xff\n")
    with pytest.raises(AliasesError) as caught:
        load_aliases(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte 8)"
    with pytest.raises(AliasesError) as caught:
        load_aliases(tmp_path / "missing")
    assert "cannot read: No such file or directory" in str(caught.value)
    path.write_text("a: b\nbad\n")
    with pytest.raises(AliasesError) as caught:
        load_aliases(path)
    assert caught.value.problems[0].line == 2


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([*'ab :,"\\|/#@\t\n\r\x00é', ":include:", "\u2028"]), max_size=60).map(
        "".join
    )
)
def test_any_text_parses_or_gives_numbered_problems(text: str) -> None:
    """Arbitrary text never raises: it parses, and every problem names a real line."""
    aliases = parse_aliases(text)
    lines = len(text.split("\n"))
    assert all(1 <= p.line <= lines for p in aliases.problems)
    for entry in aliases.entries.values():
        assert entry.targets
        assert all(1 <= t.line <= lines for t in entry.targets)
    _, problems = parse_include(text)
    assert all(1 <= p.line <= lines for p in problems)


@given(st.text(max_size=200))
def test_any_unicode_parses_or_gives_numbered_problems(text: str) -> None:
    """Even arbitrary Unicode (surrogates, controls) never raises."""
    aliases = parse_aliases(text)
    assert all(1 <= p.line <= len(text.split("\n")) for p in aliases.problems)


NAMES = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcxyz"),
    st.text(alphabet="abz09_-.", max_size=8),
).filter(lambda n: ".." not in n and not n.endswith("."))
TARGETS = st.one_of(
    NAMES.map(lambda n: Target(TargetKind.ADDRESS, n)),
    st.tuples(NAMES, st.sampled_from(["partner.test", "example.test"])).map(
        lambda p: Target(TargetKind.ADDRESS, p[0], p[1])
    ),
    NAMES.map(lambda n: Target(TargetKind.FILE, f"/var/mail/{n}")),
    NAMES.map(lambda n: Target(TargetKind.COMMAND, f"/usr/bin/{n} --x, y")),
    NAMES.map(lambda n: Target(TargetKind.INCLUDE, f"/etc/{n}")),
)


def _write_target(target: Target) -> str:
    if target.kind is TargetKind.COMMAND:
        return f'"|{target.value}"'
    return str(target)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(NAMES, st.lists(TARGETS, min_size=1, max_size=5), max_size=8),
    st.booleans(),
)
def test_written_entries_parse_back(entries: dict[str, list[Target]], split: bool) -> None:
    """Entries written out (on one line or with continuation lines) parse back unchanged."""
    lines = []
    for name, targets in entries.items():
        written = [_write_target(t) for t in targets]
        if split:
            lines.append(f"{name}: {written[0]},")
            lines.extend(f"    {w}," for w in written[1:])
        else:
            lines.append(f"{name}: {', '.join(written)}")
    aliases = parse_aliases("\n".join(lines) + "\n")
    assert aliases.problems == ()
    got = {
        name: [(t.kind, t.value, t.domain) for t in entry.targets]
        for name, entry in aliases.entries.items()
    }
    assert got == {n: [(t.kind, t.value, t.domain) for t in ts] for n, ts in entries.items()}


# --------------------------------------------------------------------------- expansion


def _context(
    text: str,
    users: tuple[str, ...] = ("alice", "bob", "carol"),
    includes: dict[str, str] | None = None,
    delivered_to: frozenset[str] = frozenset(),
) -> ExpansionContext:
    aliases = parse_aliases(text)
    assert aliases.problems == ()
    known = {u.casefold(): u for u in users}

    def split(local: str) -> tuple[str, str | None]:
        base, found, extension = local.partition("+")
        return (base, extension) if found and base else (local, None)

    def read_include(path: str) -> str:
        if includes is None or path not in includes:
            raise FileNotFoundError(2, "No such file or directory", path)
        return includes[path]

    return ExpansionContext(
        aliases=aliases,
        find_user=lambda name: known.get(name.casefold()),
        split_extension=split,
        is_local_domain=lambda domain: domain in ("example.test", "other.example.test"),
        read_include=read_include,
        delivered_to=delivered_to,
    )


def _plan(context: ExpansionContext, to: str = "x@example.test") -> list[str]:
    local, _, domain = to.partition("@")
    return [_show(item) for item in expand(Address(local, domain), context)]


def _show(item: PlannedDelivery) -> str:
    if isinstance(item, MailboxDelivery):
        return f"mailbox {item.user} as {item.address}"
    if isinstance(item, FileDelivery):
        return f"file {item.path} for {item.address}"
    if isinstance(item, CommandDelivery):
        return f"command {item.command} for {item.address} ext {item.extension}"
    if isinstance(item, RemoteDelivery):
        return f"remote {item.address}"
    assert isinstance(item, FailedTarget)
    return f"fail {item.what}: {item.reply.code.name} {item.reply.text}"


def test_a_user_without_alias_is_its_mailbox() -> None:
    """No alias: the user's own mailbox; an unknown name fails with USER."""
    context = _context("")
    assert _plan(context, "Alice@example.test") == ["mailbox alice as alice@example.test"]
    assert _plan(context, "zed@example.test") == [
        "fail zed@example.test: USER unknown user: zed@example.test"
    ]


def test_recursion_duplicates_and_every_target_kind() -> None:
    """Aliases expand recursively; each target once; bare names take the current domain."""
    text = (
        'x: team, alice, /var/box, "|prog", far@partner.test, bob@other.example.test\n'
        "team: alice, bob, carol\n"
    )
    assert _plan(_context(text), "x+tag@example.test") == [
        "mailbox alice as alice@example.test",
        "mailbox bob as bob@example.test",
        "mailbox carol as carol@example.test",
        "file /var/box for x@example.test",
        "command prog for x@example.test ext tag",
        "remote far@partner.test",
    ]


def test_an_alias_naming_itself_delivers_to_its_mailbox() -> None:
    """bob: bob, carol — bob's own mailbox and carol's, no loop."""
    assert _plan(_context("bob: bob, carol\n"), "bob@example.test") == [
        "mailbox bob as bob@example.test",
        "mailbox carol as carol@example.test",
    ]


def test_a_loop_ends_at_a_mailbox_or_fails() -> None:
    """A loop through a user ends at their mailbox; a loop through no user fails (5.4.6)."""
    through_user = _context("alice: team\nteam: alice, bob\n")
    assert _plan(through_user, "alice@example.test") == [
        "mailbox alice as alice@example.test",
        "mailbox bob as bob@example.test",
    ]
    [failed] = expand(Address("a", "example.test"), _context("a: b\nb: c\nc: a\n"))
    assert isinstance(failed, FailedTarget)
    assert failed.reply.code is ReplyCode.NDEL and failed.reply.enhanced == "5.4.6"
    assert failed.reply.text == "alias loop: a -> b -> c -> a"


def test_depth_is_bounded() -> None:
    """A chain longer than the limit fails instead of recursing without end."""
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(MAX_DEPTH + 5))
    [failed] = expand(Address("a0", "example.test"), _context(chain))
    assert isinstance(failed, FailedTarget)
    assert "too deep" in failed.reply.text


def test_the_full_name_with_a_tag_wins_over_the_base_name() -> None:
    """owner-list+bounces may have its own alias; otherwise the base name's applies."""
    context = _context("list+bounces: carol\nlist: alice\n")
    assert _plan(context, "list+bounces@example.test") == ["mailbox carol as carol@example.test"]
    assert _plan(context, "list+other@example.test") == ["mailbox alice as alice@example.test"]
    assert _plan(context, "alice+x@example.test") == ["mailbox alice as alice+x@example.test"]


def test_delivered_to_marks_a_forwarding_loop_at_any_level() -> None:
    """An address the message already went through fails as a loop, also below an alias."""
    context = _context("team: alice, bob\n", delivered_to=frozenset({"bob@example.test"}))
    assert _plan(context, "team@example.test") == [
        "mailbox alice as alice@example.test",
        "fail bob@example.test: NDEL mail forwarding loop for bob@example.test",
    ]


def test_includes_expand_and_their_loops_and_errors_fail() -> None:
    """Include files expand to their members; a self-including file and a missing one fail."""
    includes = {"/l/one": "alice, :include:/l/two\n", "/l/two": "bob\n:include:/l/one\n"}
    context = _context("list: :include:/l/one\ngone: :include:/l/none\n", includes=includes)
    assert _plan(context, "list@example.test") == [
        "mailbox alice as alice@example.test",
        "mailbox bob as bob@example.test",
        "fail :include:/l/one: NDEL include loop: :include:/l/one",
    ]
    assert _plan(context, "gone@example.test") == [
        "fail :include:/l/none: FOPN cannot read include file /l/none: No such file or directory"
    ]
    broken = _context("b: :include:/l/bad\n", includes={"/l/bad": "ok\n/etc/passwd\n"})
    [failed] = expand(Address("b", "example.test"), broken)
    assert isinstance(failed, FailedTarget) and failed.reply.code.is_temporary
    assert "2: mail to a file is not allowed" in failed.reply.text


GRAPH_NAMES = st.sampled_from(["a", "b", "c", "d", "alice", "bob"])


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "alice"]),
        st.lists(GRAPH_NAMES, min_size=1, max_size=4),
    )
)
def test_expansion_of_any_alias_graph_terminates(graph: dict[str, list[str]]) -> None:
    """Any alias graph, loops and all, expands to a finite plan with each delivery once."""
    text = "".join(f"{name}: {', '.join(targets)}\n" for name, targets in graph.items())
    context = _context(text, users=("alice", "bob"))
    for start in ["a", "b", "c", "d", "alice", "bob"]:
        plan = expand(Address(start, "example.test"), context)
        keys = [item.key for item in plan]
        assert len(keys) == len(set(keys))
        assert plan


def test_an_empty_aliases_has_no_entries() -> None:
    """The default Aliases is empty and has no include files."""
    assert Aliases().get("x") is None
    assert not Aliases().has_includes

"""relay.oneline: text from outside, made one printable line before it is logged or replied."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.oneline import escape, one_line
from relay.reply import Reply, ReplyCode


def test_escape_shows_what_would_break_a_log_line() -> None:
    """CR, LF, ESC, C1 controls and Unicode line separators come out as Python escapes."""
    assert escape("bob\r\nsmtp: authenticated as root") == "bob\\r\\nsmtp: authenticated as root"
    assert escape("a\x1b[2Jb\x9bc\u2028d\u0085e\x00") == "a\\x1b[2Jb\\x9bc\\u2028d\\x85e\\x00"
    assert escape("caf\u00e9 \u00fcber \u6f22\u5b57 \\r") == "caf\u00e9 \u00fcber \u6f22\u5b57 \\r"


def test_one_line_folds_white_space_and_cuts() -> None:
    """A multi-line text becomes one line; a long one ends in ``...`` at the limit."""
    assert one_line("550-first\r\n550 second\t end  ") == "550-first 550 second end"
    assert one_line("a\r\nb\x00c" + "x" * 1000, 300).startswith("a b\\x00c")
    assert len(one_line("y" * 1000, 300)) == 300 and one_line("y" * 1000, 300).endswith("...")
    assert Reply(ReplyCode.AGN, one_line("a\r\nb\x00c" + "x" * 1000, 300)).text


@given(st.text())
def test_escape_is_always_one_printable_line(text: str) -> None:
    """Whatever comes in, what goes out is printable: no line break, no control."""
    out = escape(text)
    assert out.isprintable()
    assert len(out.splitlines()) <= 1


@given(st.text().filter(str.isprintable))
def test_escape_keeps_printable_text(text: str) -> None:
    """Printable text is logged exactly as it came."""
    assert escape(text) == text


@given(st.text(), st.integers(min_value=3, max_value=500))
def test_one_line_is_printable_single_spaced_and_within_the_limit(text: str, limit: int) -> None:
    """one_line gives printable text, no white space but single spaces, at most limit long."""
    out = one_line(text, limit)
    assert out.isprintable() and len(out) <= limit
    assert "  " not in out and out == out.strip()

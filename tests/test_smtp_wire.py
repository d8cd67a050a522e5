"""The SMTP wire format: replies, command lines, ESMTP parameters, xtext, dot-stuffing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.sansio.smtp.wire import (
    MAX_REPLY_LINE,
    MAX_TEXT_LINE,
    CommandSyntaxError,
    DataDecoder,
    DataProblem,
    DotStuffer,
    ReplyParser,
    ReplySyntaxError,
    SmtpReply,
    _has_line_longer,
    dot_stuff,
    format_command,
    format_parameters,
    parse_command_line,
    parse_ehlo_reply,
    parse_parameters,
    split_path_argument,
    xtext_decode,
    xtext_encode,
)

# --------------------------------------------------------------------------- replies


def test_multiline_reply_carries_the_enhanced_code_on_every_line() -> None:
    """A multi-line reply uses '-' continuations and repeats the enhanced status."""
    reply = SmtpReply(550, "5.1.1", ("no such user", "try again"))
    assert reply.to_bytes() == b"550-5.1.1 no such user\r\n550 5.1.1 try again\r\n"


def test_reply_without_text_is_the_bare_code_and_334_keeps_its_space() -> None:
    """An empty reply is just the code; RFC 4954's empty challenge is '334 '."""
    assert SmtpReply(250).to_bytes() == b"250\r\n"
    assert SmtpReply(334).to_bytes() == b"334 \r\n"


@pytest.mark.parametrize(
    ("code", "enhanced", "lines"),
    [
        (199, None, ("x",)),
        (600, None, ("x",)),
        (250, "5.0.0", ("x",)),
        (250, "2.0", ("x",)),
        (250, None, ("a\r\n250 injected",)),
        (250, None, ("nul\x00",)),
        (250, None, ()),
    ],
)
def test_invalid_replies_cannot_be_made(
    code: int, enhanced: str | None, lines: tuple[str, ...]
) -> None:
    """Bad codes, mismatched enhanced classes and control characters are refused."""
    with pytest.raises(ValueError):
        SmtpReply(code, enhanced, lines)


def test_overlong_reply_line_is_refused() -> None:
    """A reply line over 512 octets is never written."""
    with pytest.raises(ValueError):
        SmtpReply(250, None, ("x" * MAX_REPLY_LINE,)).to_bytes()


def test_parser_reads_pipelined_replies_split_anywhere() -> None:
    """Several replies in one stream come out in order, wherever the stream is split."""
    stream = b"250-mx Hello\r\n250-SIZE 100\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n354 go\r\n"
    for cut in range(len(stream) + 1):
        parser = ReplyParser()
        replies = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [r.code for r in replies] == [250, 250, 354]
        assert replies[0].lines == ("mx Hello", "SIZE 100", "PIPELINING")
        assert replies[1].enhanced == "2.1.0" and replies[1].lines == ("Ok",)
        parser.close()


def test_parser_splits_enhanced_codes_only_of_the_right_class() -> None:
    """'5.1.1' on a 550 is an enhanced status; '2.0.0' on a 550 is text."""
    (r1, r2) = ReplyParser().feed(b"550 5.1.1 unknown\r\n550 2.0.0 odd\r\n")
    assert (r1.enhanced, r1.lines) == ("5.1.1", ("unknown",))
    assert (r2.enhanced, r2.lines) == (None, ("2.0.0 odd",))


@pytest.mark.parametrize(
    "stream",
    [
        b"250 ok\n",  # bare LF
        b"25 ok\r\n",  # short code
        b"650 ok\r\n",  # class 6
        b"2x0 ok\r\n",
        b"250_ok\r\n",
        b"250-a\r\n251 b\r\n",  # code changes inside a reply
        b"250 a\x00b\r\n",
        b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n",
        b"250 " + b"x" * MAX_REPLY_LINE,  # too long even before the CRLF
    ],
)
def test_parser_rejects_malformed_replies_and_stays_broken(stream: bytes) -> None:
    """A malformed reply raises ReplySyntaxError, and so does every later feed."""
    parser = ReplyParser()
    with pytest.raises(ReplySyntaxError):
        parser.feed(stream)
    with pytest.raises(ReplySyntaxError):
        parser.feed(b"250 ok\r\n")


def test_parser_close_inside_a_reply_is_an_error() -> None:
    """A stream that ends in the middle of a multi-line reply is malformed."""
    parser = ReplyParser()
    assert parser.feed(b"250-first\r\n") == []
    with pytest.raises(ReplySyntaxError):
        parser.close()


def test_parse_ehlo_reply_gives_domain_and_keywords() -> None:
    """The EHLO reply becomes the server name and upper-cased extension keywords."""
    (reply,) = ReplyParser().feed(b"250-mx.test Hello\r\n250-size 1000\r\n250 AUTH PLAIN LOGIN\r\n")
    assert parse_ehlo_reply(reply) == ("mx.test", {"SIZE": ("1000",), "AUTH": ("PLAIN", "LOGIN")})


_reply_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\té€"), max_size=60
)


@given(
    code=st.integers(200, 559).filter(lambda c: c % 100 < 60),
    enhanced=st.booleans(),
    lines=st.lists(_reply_text, min_size=1, max_size=5),
    cut=st.integers(0, 2000),
)
def test_reply_round_trip(code: int, enhanced: bool, lines: list[str], cut: int) -> None:
    """Any reply written and parsed back (split anywhere) is the same reply."""
    status = f"{code // 100}.1.2" if enhanced and code // 100 != 3 else None
    lines = [line.strip(" ") for line in lines]
    # a line that starts like an enhanced code is ambiguous: RFC 2034 readers take it as one
    lines = [f"x{line}" if line[:1].isdigit() else line for line in lines]
    reply = SmtpReply(code, status, tuple(lines))
    data = reply.to_bytes()
    parser = ReplyParser()
    parsed = parser.feed(data[:cut]) + parser.feed(data[cut:])
    assert len(parsed) == 1
    got = parsed[0]
    assert got.code == code and got.enhanced == status
    assert tuple(x.strip(" ") for x in got.lines) == tuple(lines)


@given(st.binary(max_size=300), st.integers(0, 300))
def test_reply_parser_never_fails_other_than_cleanly(data: bytes, cut: int) -> None:
    """Arbitrary bytes give replies or ReplySyntaxError, nothing else."""
    parser = ReplyParser()
    try:
        for reply in parser.feed(data[:cut]) + parser.feed(data[cut:]):
            assert 200 <= reply.code <= 559
    except ReplySyntaxError:
        pass


# --------------------------------------------------------------------------- commands


def test_command_line_is_split_into_verb_and_argument() -> None:
    """The verb is upper-cased; surrounding spaces of the argument are dropped."""
    line = parse_command_line(b"mail FROM:<a@b.test>  SIZE=10  ")
    assert (line.verb, line.argument, line.ascii) == ("MAIL", "FROM:<a@b.test>  SIZE=10", True)
    assert parse_command_line("RCPT TO:<é@b.test>".encode()).ascii is False


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"NO\x00OP", 500),
        (b"NOOP\rx", 500),
        (b"NOOP\nx", 500),
        (b"\xff\xfe", 500),
        (b"", 500),
        (b"N0OP", 500),
        ("VÉRB x".encode(), 500),
    ],
)
def test_bad_command_lines_are_refused_with_a_reply(raw: bytes, code: int) -> None:
    """NUL, control characters, bad UTF-8 and non-letter verbs are 500 5.5.2."""
    with pytest.raises(CommandSyntaxError) as info:
        parse_command_line(raw)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, "5.5.2")


def test_format_command_refuses_injection_and_length() -> None:
    """A command with CR/LF inside, or over 512 octets, is never written."""
    assert format_command("MAIL", "FROM:<a@b>") == b"MAIL FROM:<a@b>\r\n"
    with pytest.raises(ValueError):
        format_command("MAIL", "FROM:<a@b>\r\nRCPT TO:<c@d>")
    with pytest.raises(ValueError):
        format_command("NOOP", "x" * 510)


@pytest.mark.parametrize(
    ("argument", "path", "params"),
    [
        ("FROM:<a@b.test>", "<a@b.test>", ""),
        ("from: <a@b.test> SIZE=1", "<a@b.test>", "SIZE=1"),
        ('FROM:<"a> b"@x.test> BODY=8BITMIME', '<"a> b"@x.test>', "BODY=8BITMIME"),
        ('FROM:<"a\\"> b"@x.test>', '<"a\\"> b"@x.test>', ""),
        ("FROM:<>", "<>", ""),
    ],
)
def test_split_path_argument(argument: str, path: str, params: str) -> None:
    """The path ends at the first '>' outside quotes; parameters follow a space."""
    assert split_path_argument(argument, "FROM") == (path, params)


@pytest.mark.parametrize(
    "argument", ["TO:<a@b>", "FROM:a@b", "FROM:<a@b", 'FROM:<"a@b>', "FROM:<a@b>SIZE=1"]
)
def test_split_path_argument_rejects(argument: str) -> None:
    """Wrong keyword, missing or unbalanced brackets, or no space before params: 501."""
    with pytest.raises(CommandSyntaxError) as info:
        split_path_argument(argument, "FROM")
    assert info.value.reply.code == 501


def test_parameters_are_parsed_case_insensitively_and_checked() -> None:
    """Keywords are upper-cased; repeats, empty values and bad keywords are 501 5.5.4."""
    assert parse_parameters("size=10 Body=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ["SIZE=1 size=2", "SIZE=", "-X=1", "A=b=c", "K\x00=1"]:
        with pytest.raises(CommandSyntaxError) as info:
            parse_parameters(bad)
        assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


_keyword = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}", fullmatch=True)
_value = st.text(
    st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c != "="),
    min_size=1,
    max_size=20,
)


@given(st.dictionaries(_keyword.map(str.upper), st.none() | _value, max_size=6))
def test_parameters_round_trip(params: dict[str, str | None]) -> None:
    """Parameters written by format_parameters parse back to the same mapping."""
    assert parse_parameters(format_parameters(params)) == params


@given(st.text(max_size=40))
def test_xtext_round_trip(text: str) -> None:
    """Any text (as UTF-8) survives xtext encoding, and the encoding is plain xchars."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    encoded = xtext_encode(text)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


@pytest.mark.parametrize("bad", ["a+2b", "a+2", "a=b", "a b", "+G0", "é", "+FF"])
def test_xtext_decode_is_strict(bad: str) -> None:
    """Lower-case or short hex, raw '=' or space, non-ASCII, non-UTF-8 octets: 501."""
    with pytest.raises(CommandSyntaxError):
        xtext_decode(bad)


@given(st.binary(max_size=200))
def test_command_parsers_never_raise_anything_else(raw: bytes) -> None:
    """Any bytes give a CommandLine or CommandSyntaxError; so do the argument parsers."""
    try:
        line = parse_command_line(raw)
    except CommandSyntaxError:
        return
    for parse in (
        lambda: split_path_argument(line.argument, "FROM"),
        lambda: parse_parameters(line.argument),
        lambda: xtext_decode(line.argument),
    ):
        with contextlib.suppress(CommandSyntaxError):
            parse()


# --------------------------------------------------------------------------- message text


def test_dot_stuffing_normalises_line_ends_and_doubles_leading_dots() -> None:
    """Bare LF/CR become CRLF, leading dots are doubled, the terminator is added."""
    assert dot_stuff(b".a\n.b\rc\r\n.") == b"..a\r\n..b\r\nc\r\n..\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"x\r\n") == b"x\r\n.\r\n"


def test_dot_stuffer_handles_crlf_split_across_chunks() -> None:
    """A CR at the end of one chunk and LF at the start of the next make one line end."""
    stuffer = DotStuffer()
    out = stuffer.feed(b"a\r") + stuffer.feed(b"\n") + stuffer.feed(b".b") + stuffer.finish()
    assert out == b"a\r\n..b\r\n.\r\n"


def _decode_all(wire: bytes, cut_points: list[int]) -> tuple[bytes, bytes | None, DataDecoder]:
    decoder = DataDecoder()
    text = b""
    rest = None
    start = 0
    for cut in [*sorted(cut_points), len(wire)]:
        piece = wire[start:cut]
        start = max(start, cut)
        if rest is not None:
            rest += piece
            continue
        got, rest = decoder.feed(piece)
        text += got
    return text, rest, decoder


_crlf_text = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=12
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(_crlf_text, st.lists(st.integers(0, 600), max_size=6), st.binary(max_size=20))
def test_stuff_then_unstuff_is_identity(text: bytes, cuts: list[int], after: bytes) -> None:
    """For any CRLF text, stuffing then decoding (split anywhere) gives it back exactly."""
    stuffer = DotStuffer()
    half = len(text) // 2
    wire = stuffer.feed(text[:half]) + stuffer.feed(text[half:]) + stuffer.finish()
    got, rest, decoder = _decode_all(wire + after, cuts)
    assert got == text
    assert rest == after
    assert decoder.problem is None
    assert decoder.size == len(text)


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n", DataProblem.BARE_LF),  # LF.LF
        (b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n", DataProblem.BARE_CR),  # CR.CR
        (b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n", DataProblem.BARE_LF),  # LF.CRLF
        (b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n", DataProblem.BARE_LF),  # CRLF.LF
        (b"a\r\n.\rMAIL FROM:<x@y>\r\n.\r\n", DataProblem.BARE_CR),  # CRLF.CR
    ],
)
def test_smuggled_end_of_data_is_text_not_an_end(wire: bytes, problem: DataProblem) -> None:
    """Only CRLF.CRLF ends the text: the smuggled command stays inside it, flagged."""
    for cut in range(len(wire) + 1):
        text, rest, decoder = _decode_all(wire + b"QUIT\r\n", [cut])
        assert rest == b"QUIT\r\n"
        assert decoder.problem is problem
        assert text == b"" or b"MAIL" not in text


def test_lines_of_any_length_are_decoded_as_they_came() -> None:
    """998, 999, 4 000 and 100 000-octet lines (one with a leading dot) decode exactly."""
    for length in (MAX_TEXT_LINE, MAX_TEXT_LINE + 1, 4000, 100_000):
        line = b"." + b"y" * (length - 1)
        wire = dot_stuff(line + b"\r\n" + line + b"\r\n")
        for cut in range(0, len(wire), 997):
            text, rest, decoder = _decode_all(wire, [cut])
            assert (text, rest, decoder.problem) == (line + b"\r\n" + line + b"\r\n", b"", None)


def test_a_long_line_comes_out_as_it_arrives() -> None:
    """Each piece of an unfinished 100 000-octet line is returned whole as it is fed."""
    decoder = DataDecoder()
    out = b""
    for _ in range(100):
        got, rest = decoder.feed(b"v" * 1000)
        assert rest is None and got == b"v" * 1000 and not decoder._carry
        out += got
    got, rest = decoder.feed(b"\r\n.\r\n")
    assert (rest, decoder.problem, decoder.size) == (b"", None, 100_002)
    assert out + got == b"v" * 100_000 + b"\r\n"


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_an_empty_text_ends_however_its_dot_is_split(cut: int) -> None:
    """``. CRLF`` straight after 354 ends the text even when split after the dot or CR."""
    text, rest, decoder = _decode_all(b".\r\nNOOP\r\n", [cut])
    assert (text, rest, decoder.size) == (b"", b"NOOP\r\n", 0)


def test_decoder_discard_keeps_finding_the_end() -> None:
    """After discard() no text comes out, but the end and the size are still found."""
    decoder = DataDecoder()
    assert decoder.feed(b"abc\r\n") == (b"abc", None)
    decoder.discard()
    assert decoder.feed(b"def\r\n.\r\nNOOP") == (b"", b"NOOP")
    assert decoder.size == 10


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=5))
def test_decoder_never_raises_and_holds_little(data: bytes, cuts: list[int]) -> None:
    """Any byte stream is decoded without an exception, holding at most 4 bytes back."""
    decoder = DataDecoder()
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        _, rest = decoder.feed(data[start:cut])
        start = max(start, cut)
        if rest is not None:
            break
        assert len(decoder._carry) <= 4


@given(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=45),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_the_line_length_jump_agrees_with_splitting(
    lengths: list[int], limit: int, eol: bytes
) -> None:
    """The jumping search finds a line over the limit exactly when splitting would."""
    text = b"".join(b"x" * n + eol for n in lengths)
    stop = len(text) - len(eol)  # the last line's end
    longest = max(map(len, text[:stop].split(eol)))
    assert _has_line_longer(text, 0, stop, limit, eol) == (longest > limit)


# --------------------------------------------------------------------------- line breaking


def _postfix_breaks(text: bytes, limit: int) -> bytes:
    """Postfix's smtp_text_out, line by line: after ``limit`` octets of output, if the line
    goes on, CRLF SP, the space counting towards the next piece (an independent model)."""
    out = []
    for line in text.split(b"\r\n")[:-1]:
        pieces = [line[:limit]]
        rest = line[limit:]
        while rest:
            pieces.append(b" " + rest[: limit - 1])
            rest = rest[limit - 1 :]
        if pieces[0].startswith(b"."):
            pieces[0] = b"." + pieces[0]
        out.append(b"\r\n".join(pieces) + b"\r\n")
    return b"".join(out) + b".\r\n"


def test_a_4000_octet_line_is_broken_as_postfix_breaks_it() -> None:
    """At 998: 998 octets, then CRLF SP and 997 more, three times, then SP and the last 11."""
    line = bytes(range(33, 127)) * 42 + b"abcd"
    assert len(line) == 3952
    line = line + b"0123456789" * 4 + b"ABCDEFGH"
    assert len(line) == 4000
    wire = dot_stuff(line + b"\r\nshort\r\n", MAX_TEXT_LINE)
    lines = wire.split(b"\r\n")
    assert [len(x) for x in lines] == [998, 998, 998, 998, 12, 5, 1, 0]
    assert lines[0] == line[:998] and lines[1] == b" " + line[998:1995]
    assert lines[4] == b" " + line[-11:]
    assert wire == _postfix_breaks(line + b"\r\nshort\r\n", MAX_TEXT_LINE)


def test_a_line_of_exactly_the_limit_is_not_broken() -> None:
    """998 octets go whole; 999 become 998, CRLF, SP and one octet; 0 never breaks."""
    assert dot_stuff(b"x" * 998 + b"\r\n", 998) == b"x" * 998 + b"\r\n.\r\n"
    assert dot_stuff(b"x" * 999 + b"\r\n", 998) == b"x" * 998 + b"\r\n x\r\n.\r\n"
    assert dot_stuff(b"x" * 5000 + b"\r\n", 0) == b"x" * 5000 + b"\r\n.\r\n"


def test_the_stuffing_dot_is_not_counted() -> None:
    """A leading dot is doubled on top of the limit; a continuation starts with SP, never a dot."""
    assert dot_stuff(b"." * 7 + b"\r\n", 4) == b"....." + b"\r\n ...\r\n.\r\n"


@pytest.mark.parametrize("limit", [-1, 1])
def test_a_limit_that_cannot_break_is_refused(limit: int) -> None:
    """A negative limit, or 1 (no room beside the space), is a ValueError."""
    with pytest.raises(ValueError, match="line length limit"):
        DotStuffer(limit)


_breaking_text = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.builds(lambda n, dot: b"." * dot + b"k" * n, st.integers(0, 60), st.integers(0, 2)),
    ).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=10,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(_breaking_text, st.integers(2, 20), st.lists(st.integers(0, 700), max_size=6))
def test_breaking_matches_postfix_however_the_text_is_chunked(
    text: bytes, limit: int, cuts: list[int]
) -> None:
    """Fed in any chunks, the stuffer's output equals the Postfix model; no line is over."""
    stuffer = DotStuffer(limit)
    wire = b""
    start = 0
    for cut in [*sorted(cuts), len(text)]:
        wire += stuffer.feed(text[start:cut])
        start = max(start, cut)
    wire += stuffer.finish()
    assert wire == _postfix_breaks(text, limit)
    assert all(len(line.removeprefix(b".")) <= limit for line in wire.split(b"\r\n"))
    _, rest, decoder = _decode_all(wire, [])
    assert rest == b"" and decoder.problem is None

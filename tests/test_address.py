"""Tests for relay.address: RFC 5321 path parsing, canonical forms and hostile input."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.address import (
    Address,
    AddressError,
    RoutingTrick,
    parse_forward_path,
    parse_mailbox,
    parse_reverse_path,
)

Parser = Callable[..., Address | None]
PARSERS: list[Parser] = [parse_mailbox, parse_forward_path, parse_reverse_path]

# --- valid forms ----------------------------------------------------------------------

VALID = [
    # (path, local_part, domain, route, tricks)
    ("<user@example.com>", "user", "example.com", (), RoutingTrick.NONE),
    ("<first.last+tag@Example.COM>", "first.last+tag", "example.com", (), RoutingTrick.NONE),
    ("<User@localhost>", "User", "localhost", (), RoutingTrick.NONE),
    ('<"john doe"@x.test>', "john doe", "x.test", (), RoutingTrick.NONE),
    ('<"a\\"b\\\\c"@x.test>', 'a"b\\c', "x.test", (), RoutingTrick.NONE),
    ('<"plain"@x.test>', "plain", "x.test", (), RoutingTrick.NONE),
    ('<""@x>', "", "x", (), RoutingTrick.NONE),
    ("<a@[192.0.2.1]>", "a", "[192.0.2.1]", (), RoutingTrick.NONE),
    ("<a@[192.000.002.001]>", "a", "[192.0.2.1]", (), RoutingTrick.NONE),
    ("<a@[IPv6:2001:DB8:0:0:0:0:0:1]>", "a", "[IPv6:2001:db8::1]", (), RoutingTrick.NONE),
    ("<a@[ipv6:::1]>", "a", "[IPv6:::1]", (), RoutingTrick.NONE),
    ("<a@1.2.3.4.example>", "a", "1.2.3.4.example", (), RoutingTrick.NONE),
    ("<a@x-y.Z9>", "a", "x-y.z9", (), RoutingTrick.NONE),
    (
        "<@Relay.One,@relay.two:user@c.test>",
        "user",
        "c.test",
        ("relay.one", "relay.two"),
        RoutingTrick.SOURCE_ROUTE,
    ),
    ("<user%host@relay>", "user%host", "relay", (), RoutingTrick.PERCENT_HACK),
    ('<"user%host"@relay>', "user%host", "relay", (), RoutingTrick.PERCENT_HACK),
    ("<host!user@relay>", "host!user", "relay", (), RoutingTrick.BANG_PATH),
    ('<"user@other"@relay>', "user@other", "relay", (), RoutingTrick.QUOTED_AT),
    (
        '<@r:"a%b!c@d"@relay>',
        "a%b!c@d",
        "relay",
        ("r",),
        RoutingTrick.SOURCE_ROUTE
        | RoutingTrick.PERCENT_HACK
        | RoutingTrick.BANG_PATH
        | RoutingTrick.QUOTED_AT,
    ),
]


@pytest.mark.parametrize(("path", "local", "domain", "route", "tricks"), VALID)
def test_valid_forward_paths(
    path: str, local: str, domain: str, route: tuple[str, ...], tricks: RoutingTrick
) -> None:
    """Each valid path parses to the decoded local part, canonical domain, route and tricks."""
    address = parse_forward_path(path)
    assert address.local_part == local
    assert address.domain == domain
    assert address.route == route
    assert address.tricks == tricks
    assert parse_reverse_path(path) == address
    assert parse_forward_path(address.smtp_path(), smtputf8=True) == address


@pytest.mark.parametrize(
    ("path", "local", "domain", "tricks"),
    [(path, local, domain, tricks) for path, local, domain, route, tricks in VALID if not route],
)
def test_valid_mailboxes(path: str, local: str, domain: str, tricks: RoutingTrick) -> None:
    """The route-less forms without brackets parse as bare mailboxes to the same fields."""
    address = parse_mailbox(path[1:-1])
    assert (address.local_part, address.domain, address.route) == (local, domain, ())
    assert address.tricks == tricks
    assert parse_mailbox(str(address)) == address


def test_idn_domain_becomes_a_label() -> None:
    """A U-label domain is stored as its lowercase A-label and shown back in Unicode."""
    address = parse_forward_path("<jörg@Bücher.Example>", smtputf8=True)
    assert address.domain == "xn--bcher-kva.example"
    assert address.unicode_domain == "bücher.example"
    assert address.local_part == "jörg"
    assert address.needs_smtputf8


def test_idn_domain_alone_does_not_need_smtputf8() -> None:
    """An ASCII local part at an IDN domain needs no SMTPUTF8: the domain is A-labels."""
    address = parse_mailbox("user@пример.испытание")
    assert address.domain.isascii()
    assert address.domain.startswith("xn--")
    assert address.unicode_domain == "пример.испытание"
    assert not address.needs_smtputf8


def test_unicode_domain_decodes_idna2008_labels() -> None:
    """An IDNA 2008 A-label the 2003 codec refuses (ß) still displays as Unicode."""
    assert parse_mailbox("a@xn--fa-hia.de").unicode_domain == "faß.de"


def test_unicode_domain_keeps_undecodable_a_labels() -> None:
    """An xn-- label that is not valid Punycode is displayed as written, never raised on."""
    for domain in ("xn--99999999999", "xn--abc", "xn--a", "xn--ls8h-broken"):
        assert parse_mailbox(f"a@{domain}").unicode_domain == domain


def test_literal_ip_and_is_literal() -> None:
    """Address literals expose their IP; names expose none."""
    v4 = parse_mailbox("a@[192.0.2.1]")
    v6 = parse_mailbox("a@[IPv6:2001:db8::1]")
    name = parse_mailbox("a@example.com")
    assert v4.is_literal and v4.literal_ip == ipaddress.IPv4Address("192.0.2.1")
    assert v6.is_literal and v6.literal_ip == ipaddress.IPv6Address("2001:db8::1")
    assert not name.is_literal and name.literal_ip is None
    assert v4.unicode_domain == "[192.0.2.1]"


def test_quoted_local_part_quotes_only_when_needed() -> None:
    """A local part that is a dot-string is written bare; anything else is quoted and escaped."""
    assert Address("a.b", "x").quoted_local_part() == "a.b"
    assert Address("a b", "x").quoted_local_part() == '"a b"'
    assert Address("a..b", "x").quoted_local_part() == '"a..b"'
    assert Address('a"b\\', "x").quoted_local_part() == '"a\\"b\\\\"'
    assert Address("", "x").quoted_local_part() == '""'
    assert str(Address("a b", "X.test")) == '"a b"@x.test'


def test_smtp_path_includes_route_and_str_does_not() -> None:
    """smtp_path() writes the route as @a,@b: while str() is the bare mailbox."""
    address = parse_forward_path("<@a,@b:u@c>")
    assert address.smtp_path() == "<@a,@b:u@c>"
    assert str(address) == "u@c"


def test_lower_local_casefolds() -> None:
    """lower_local() casefolds, so local users match case-insensitively (ß matches SS)."""
    assert parse_mailbox("Straße@x").lower_local() == parse_mailbox("STRASSE@x").lower_local()


def test_constructor_normalises_and_validates() -> None:
    """Building an Address directly normalises the domain and route and refuses bad fields."""
    assert Address("u", "Bücher.DE", ("Hop.Example",)) == Address(
        "u", "xn--bcher-kva.de", ("hop.example",)
    )
    with pytest.raises(AddressError, match="CR or LF"):
        Address("a\r\nb", "x")
    with pytest.raises(AddressError, match="literal"):
        Address("u", "x", ("[192.0.2.1]",))


def test_non_ascii_local_part_needs_smtputf8() -> None:
    """Without SMTPUTF8 a non-ASCII local part (quoted or not) is refused, with it accepted."""
    for path in ("<jörg@x>", '<"jörg x"@x>'):
        with pytest.raises(AddressError, match="SMTPUTF8"):
            parse_forward_path(path)
        assert not parse_forward_path(path, smtputf8=True).local_part.isascii()


def test_non_ascii_domain_needs_smtputf8() -> None:
    """Without SMTPUTF8 a U-label domain or route hop is refused: the wire must be ASCII."""
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_forward_path("<a@bücher.de>")
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_reverse_path("<@bücher.de:a@b>")


def test_null_reverse_path() -> None:
    """<> is the null reverse-path (None) for MAIL FROM and an error for RCPT TO."""
    assert parse_reverse_path("<>") is None
    with pytest.raises(AddressError, match="empty"):
        parse_forward_path("<>")


def test_length_limits_at_the_boundary() -> None:
    """A 64-octet local part and a 254-octet mailbox pass; one octet more fails."""
    local = "a" * 64
    domain = ".".join(["b" * 63, "c" * 63, "d" * 61])
    assert len(f"{local}@{domain}") == 254
    assert parse_mailbox(f"{local}@{domain}").local_part == local
    assert parse_forward_path(f"<{local}@{domain}>") == parse_mailbox(f"{local}@{domain}")
    with pytest.raises(AddressError, match="254"):
        parse_mailbox(f"{local}@{domain}e")
    with pytest.raises(AddressError, match="256"):
        parse_forward_path(f"<{local}@{domain}e>")
    with pytest.raises(AddressError, match="64"):
        parse_mailbox(f"{local}a@x")


def test_length_limit_counts_utf8_octets() -> None:
    """Limits count UTF-8 octets, not characters: 33 two-octet characters exceed 64."""
    with pytest.raises(AddressError, match="local part longer than 64"):
        parse_mailbox("é" * 33 + "@x")
    assert parse_mailbox("é" * 32 + "@x").local_part == "é" * 32


def test_length_limit_applies_after_idn_conversion() -> None:
    """A mailbox that only exceeds 254 octets once written with A-labels is refused."""
    label = "a" * 50 + "ü"  # 52 octets as UTF-8, 58 as an A-label
    text = "l" * 30 + "@" + ".".join([label] * 4)
    assert len(text.encode()) <= 254
    with pytest.raises(AddressError, match="mailbox longer than 254"):
        parse_mailbox(text)


# --- hostile and malformed input ------------------------------------------------------

HOSTILE = [
    # (parser, text, a word the message must contain)
    (parse_forward_path, "<a\0b@c>", "NUL"),
    (parse_forward_path, '<"a\0b"@c>', "NUL"),
    (parse_forward_path, "<a\rb@c>", "CR"),
    (parse_forward_path, '<"a\nb"@c>', "LF"),
    (parse_forward_path, "<a@b>\r\nRCPT TO:<c@d>", "CR"),
    (parse_mailbox, "a@b>\r\nRCPT TO:<c@d", "CR"),
    (parse_mailbox, "a\x7f@b", "control"),
    (parse_mailbox, "a\x85@b", "control"),
    (parse_forward_path, "<" + "a" * 10_000 + "@b>", "longer"),
    (parse_mailbox, "a" * 10_000, "longer"),
    (parse_forward_path, '<"abc@d>', "quote"),
    (parse_forward_path, '<abc"@d>', "quote"),
    (parse_mailbox, '"abc\\"@d', "quote"),
    (parse_forward_path, '<"a"b@c>', "after quoted"),
    (parse_forward_path, "<a@b", "angle bracket"),
    (parse_forward_path, "a@b>", "angle bracket"),
    (parse_forward_path, "a@b", "angle brackets"),
    (parse_forward_path, "<<a@b>>", "nested"),
    (parse_forward_path, "<a@[192.0.2.1>", "bracket"),
    (parse_forward_path, "<a@192.0.2.1]>", "bracket"),
    (parse_forward_path, "<a@b.example.>", "trailing dot"),
    (parse_forward_path, "<a@b..example>", "empty domain label"),
    (parse_forward_path, "<a@.example>", "empty domain label"),
    (parse_forward_path, f"<a@{'b' * 64}.example>", "63"),
    (parse_forward_path, "<a@-b.example>", "hyphen"),
    (parse_forward_path, "<a@b-.example>", "hyphen"),
    (parse_forward_path, "<a@b_c.example>", "invalid character"),
    (parse_forward_path, "<a@b c>", "invalid character"),
    (parse_forward_path, "<a b@c>", "space"),
    (parse_forward_path, "<.a@b>", "dot"),
    (parse_forward_path, "<a.@b>", "dot"),
    (parse_forward_path, "<a..b@c>", "dot"),
    (parse_forward_path, "<a(b)@c>", "invalid character"),
    (parse_mailbox, "@", "empty local part"),
    (parse_mailbox, "@x", "empty local part"),
    (parse_mailbox, "", "empty"),
    (parse_forward_path, "", "empty"),
    (parse_forward_path, "<>", "empty"),
    (parse_forward_path, "<a@>", "missing domain"),
    (parse_forward_path, "<postmaster>", "missing domain"),
    (parse_forward_path, '<"postmaster">', "missing domain"),
    (parse_forward_path, "<host!user>", "bang path"),
    (parse_mailbox, "a@b@c", "invalid character"),
    (parse_mailbox, "\ud800@x", "surrogate"),
    (parse_mailbox, "a@\udfff", "surrogate"),
    (parse_forward_path, '<"\udc80"@x>', "surrogate"),
    (parse_forward_path, "<a@[300.1.1.1]>", "IPv4"),
    (parse_forward_path, "<a@[1.2.3]>", "IPv4"),
    (parse_forward_path, "<a@[]>", "IPv4"),
    (parse_forward_path, "<a@[IPv6:1::2::3]>", "IPv6"),
    (parse_forward_path, "<a@[IPv6:fe80::1%eth0]>", "IPv6"),
    (parse_forward_path, "<a@[tag:content]>", "unsupported address literal"),
    (parse_forward_path, "<@[192.0.2.1]:a@b>", "source route"),
    (parse_forward_path, "<@a,b:c@d>", "source route"),
    (parse_forward_path, "<@a,:c@d>", "source route"),
    (parse_mailbox, "a@\u00ad", "internationalised"),
    (parse_mailbox, "a@\uff41\uff1cb", "invalid character"),
    (parse_mailbox, 'a"@x', "quote"),
    (parse_forward_path, '<"a\\é"@x>', "escape"),
]


@pytest.mark.parametrize(("parser", "text", "word"), HOSTILE)
def test_hostile_input_raises_address_error(parser: Parser, text: str, word: str) -> None:
    """Each malformed or hostile input raises AddressError whose message names the problem."""
    with pytest.raises(AddressError) as info:
        parser(text, smtputf8=True)
    assert word.lower() in str(info.value).lower()


def test_address_error_is_a_value_error() -> None:
    """AddressError is a ValueError, so generic validation code treats it as bad input."""
    assert issubclass(AddressError, ValueError)


# --- properties -----------------------------------------------------------------------

_ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"
_ATOM = st.text(alphabet=_ATEXT + "éß日", min_size=1, max_size=8)
_DOT_ATOM = st.lists(_ATOM, min_size=1, max_size=3).map(".".join)
_QUOTED_CONTENT = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0x2FF, exclude_categories=("Cc", "Cs")
    ),
    max_size=12,
)
_LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
_U_LABEL = st.sampled_from(["bücher", "BÜCHER", "пример", "例え", "mañana", "ελληνικά"])
_NAME = st.lists(_LABEL | _U_LABEL, min_size=1, max_size=4).map(".".join)
_V4 = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
_V6 = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded.upper()}]")
_DOMAIN = _NAME | _V4 | _V6
_ROUTE = st.lists(_NAME, max_size=3)


def _quote(content: str) -> str:
    """Write content as a quoted-string, escaping every character that must be escaped."""
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _written_paths(draw: st.DrawFn) -> tuple[str, str]:
    """Draw (path text as a client might write it, the decoded local part it carries)."""
    if draw(st.booleans()):
        local = draw(_DOT_ATOM)
        written = local
    else:
        local = draw(_QUOTED_CONTENT)
        written = _quote(local)
    route = draw(_ROUTE)
    prefix = ",".join(f"@{hop}" for hop in route) + ":" if route else ""
    return f"<{prefix}{written}@{draw(_DOMAIN)}>", local


@given(_written_paths())
def test_valid_addresses_round_trip(written: tuple[str, str]) -> None:
    """Every valid address parses, and its smtp_path() and str() parse back equal to it."""
    text, local = written
    try:
        address = parse_forward_path(text, smtputf8=True)
    except AddressError as e:
        assume("longer than" not in str(e))  # generated text may exceed a length limit
        raise
    assert address.local_part == local
    assert address.domain.isascii()
    assert address.domain.removeprefix("[IPv6:") == address.domain.lower().removeprefix("[ipv6:")
    assert parse_forward_path(address.smtp_path(), smtputf8=True) == address
    assert Address(address.local_part, address.domain, address.route) == address
    if not address.route:
        assert parse_mailbox(str(address)) == address


_HOSTILE_ALPHABET = '<>@"\\.:,[]!% aZ09-\x00\r\n\x7féü\ud800IPv6'
_ANY_TEXT = (
    st.text()
    | st.binary().map(lambda b: b.decode("latin-1"))
    | st.text(alphabet=_HOSTILE_ALPHABET, max_size=40)
    | st.builds("<{}>".format, st.text(alphabet=_HOSTILE_ALPHABET, max_size=40))
)


def _exercise(parser: Parser, text: str, smtputf8: bool) -> None:
    """Parse; on success, use every property and check the result round-trips."""
    try:
        address = parser(text, smtputf8=smtputf8)
    except AddressError:
        return
    if address is None:
        return
    _ = (address.tricks, address.is_literal, address.literal_ip, address.unicode_domain)
    _ = (address.needs_smtputf8, address.lower_local())
    assert parse_forward_path(address.smtp_path(), smtputf8=True) == address
    if not address.route:
        assert parse_mailbox(str(address)) == address


# The parser is drawn rather than parametrized: pytest-twisted wraps a test function once
# per item, and parametrized items share one function object under @given.
@given(parser=st.sampled_from(PARSERS), text=_ANY_TEXT, smtputf8=st.booleans())
def test_any_text_returns_or_raises_address_error(
    parser: Parser, text: str, smtputf8: bool
) -> None:
    """For any str at all, a parser returns a round-tripping Address or raises AddressError."""
    _exercise(parser, text, smtputf8)

"""RFC 5321 paths and mailboxes: parse once at the edge, then carry canonical values.

Theory of operation
-------------------
Every address enters the relay as text: the argument of ``MAIL FROM`` / ``RCPT TO``, a
line of configuration, an alias, a spool record.  This module turns that text into an
:class:`Address` or raises :class:`AddressError` -- never any other exception, whatever
the input, because the gateway turns exactly that error into a 501/553 reply and any
other exception would be a crash triggered by a remote peer.

Parsing is a hand-written, single-pass scanner rather than one large regular expression:
each step looks at each character a bounded number of times, so the cost is O(n), and the
length limits are checked before anything else so that an oversized input costs almost
nothing.  Control characters are refused up front, before any structure is looked at, so
no CR/LF can ever be smuggled into a reply, a log line or a spool record.

An :class:`Address` is canonical by construction: its ``__post_init__`` normalises the
domain (lowercase A-labels, canonical address literals) and the route, and validates the
local part and the length limits.  Two addresses that mean the same thing therefore
compare equal, and the text forms (``str(a)``, ``a.smtp_path()``) parse back to an equal
value -- which is what lets the spool store addresses as text.

Routing tricks (source routes, ``%``-hacks, bang paths, quoted ``@``) are *legal syntax*,
so they parse; they are reported in :attr:`Address.tricks` so that policy can refuse to
relay them, and a source route is kept only to be shown, never to route by.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass, field

__all__ = [
    "POSTMASTER",
    "Address",
    "AddressError",
    "RoutingTrick",
    "parse_forward_path",
    "parse_mailbox",
    "parse_reverse_path",
]

# RFC 5321 section 4.5.3.1 limits, in octets of the UTF-8 encoding.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63
MAX_PATH = 256  # a Path, including its angle brackets
MAX_MAILBOX = MAX_PATH - 2  # the same limit without the brackets (RFC 3696 errata)
# The local part every domain must accept mail for (RFC 5321 4.5.1), case-insensitively.
POSTMASTER = "postmaster"

# atext of RFC 5322 as used by RFC 5321's Atom, ASCII part; RFC 6531 adds all non-ASCII.
_ATEXT_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# One atom of a Dot-string: ASCII atext or any non-ASCII character (RFC 6531 extends
# atext with UTF8-non-ascii).  The same set as _ATEXT_ASCII, as a regex character class,
# because matching a whole local part at C speed is what every address costs.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_IPV4_CHARS = frozenset("0123456789.")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")

# C0 controls, DEL, C1 controls, and lone surrogates (which cannot be encoded as UTF-8).
# A plain character class: matching it is linear, whatever the input.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class AddressError(ValueError):
    """The one error every malformed address raises; ``str(e)`` names the problem.

    A ``ValueError`` so that constructing an :class:`Address` with bad fields fails the way
    Python callers expect, and a class of its own so the gateway can catch exactly this.
    """


class RoutingTrick(enum.Flag):
    """Legal-but-suspicious forms a relay must not honour for third parties."""

    NONE = 0
    SOURCE_ROUTE = enum.auto()  # <@a,@b:user@c>: the route is kept, never used to route
    PERCENT_HACK = enum.auto()  # user%host@relay
    BANG_PATH = enum.auto()  # host!user@relay
    QUOTED_AT = enum.auto()  # "user@other"@relay


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox, canonical by construction, with an optional (inert) source route.

    ``local_part`` is decoded: for a quoted-string it is the content without the quotes
    and backslash escapes.  ``domain`` and the ``route`` hops may be given in any case and
    with U-labels; they are stored lowercase with A-labels, and address literals are
    stored canonically (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).  Invalid fields raise
    :class:`AddressError`, so every ``Address`` that exists can be written out and read
    back unchanged.
    """

    local_part: str
    domain: str
    route: tuple[str, ...] = ()
    # str(self), made once: the spool, the logs, the policy and the wire all ask for it.
    _text: str = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_local_value(self.local_part)
        object.__setattr__(self, "domain", _normalise_domain(self.domain))
        object.__setattr__(self, "route", tuple(_normalise_hop(h) for h in self.route))
        object.__setattr__(self, "_text", f"{_quote_local(self.local_part)}@{self.domain}")
        if len(_utf8(self._text)) > MAX_MAILBOX:
            raise AddressError(f"mailbox longer than {MAX_MAILBOX} octets")
        if len(_utf8(self.smtp_path())) > MAX_PATH:
            raise AddressError(f"path longer than {MAX_PATH} octets")

    @property
    def tricks(self) -> RoutingTrick:
        """The routing tricks this address shows, for policy to refuse when relaying."""
        found = RoutingTrick.SOURCE_ROUTE if self.route else RoutingTrick.NONE
        if "%" in self.local_part:
            found |= RoutingTrick.PERCENT_HACK
        if "!" in self.local_part:
            found |= RoutingTrick.BANG_PATH
        if "@" in self.local_part:
            found |= RoutingTrick.QUOTED_AT
        return found

    @property
    def is_literal(self) -> bool:
        """Whether the domain is an address literal, which must not be looked up in DNS."""
        return self.domain.startswith("[")

    @property
    def literal_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP address of an address literal, so a channel can connect without DNS."""
        if not self.is_literal:
            return None
        if self.domain.startswith("[IPv6:"):
            return ipaddress.IPv6Address(self.domain[6:-1])
        return ipaddress.IPv4Address(self.domain[1:-1])

    @property
    def unicode_domain(self) -> str:
        """The domain with A-labels shown as Unicode, for people; never for the wire."""
        if self.is_literal:
            return self.domain
        return ".".join(_display_label(label) for label in self.domain.split("."))

    @property
    def needs_smtputf8(self) -> bool:
        """Whether sending this address needs SMTPUTF8: only a non-ASCII local part does.

        The domain never does, because it is always stored as A-labels.
        """
        return not self.local_part.isascii()

    def quoted_local_part(self) -> str:
        """The local part as written on the wire: a dot-string if it is one, else quoted."""
        return _quote_local(self.local_part)

    def __str__(self) -> str:
        """The canonical ``local@domain`` text without route or brackets (the spool form)."""
        return self._text

    def smtp_path(self) -> str:
        """The path as sent in MAIL FROM / RCPT TO, including any source route."""
        if not self.route:
            return f"<{self._text}>"
        return f"<@{',@'.join(self.route)}:{self._text}>"

    def lower_local(self) -> str:
        """The casefolded local part, for matching local users case-insensitively."""
        return self.local_part.casefold()


def parse_mailbox(text: str, *, smtputf8: bool = True) -> Address:
    """Parse a bare ``local@domain``: configuration, aliases, and ``str(Address)``.

    No angle brackets and no route.  ``smtputf8`` defaults to true because such text is
    ours (configuration, spool), not a peer's command line.
    """
    _check_text(text, MAX_MAILBOX, "mailbox")
    local, domain = _split_mailbox(text, smtputf8)
    return Address(local, domain)


# Paths are parsed at every MAIL and RCPT, and again whenever an envelope is read (the
# spool's recovery, each message a gateway worker hands over); the same senders and
# recipients come back all the time, and an Address is immutable.  So the last parses
# are kept, keyed by the text and the SMTPUTF8 flag; a path that fails is parsed anew
# each time (lru_cache keeps no exceptions).
_PATH_CACHE = 4096


@functools.lru_cache(maxsize=_PATH_CACHE)
def parse_forward_path(text: str, *, smtputf8: bool = False) -> Address:
    """Parse the argument of RCPT TO: ``<[@hop,@hop:]local@domain>``, brackets required.

    ``smtputf8`` says whether the peer asked for SMTPUTF8 on MAIL FROM; without it the
    whole path must be ASCII (RFC 6531 section 3.4).
    """
    _check_text(text, MAX_PATH, "path")
    inner = _strip_brackets(text)
    if not inner:
        raise AddressError("empty forward-path: <> is only allowed as a reverse-path")
    return _parse_path_content(inner, smtputf8)


@functools.lru_cache(maxsize=_PATH_CACHE)
def parse_reverse_path(text: str, *, smtputf8: bool = False) -> Address | None:
    """Parse the argument of MAIL FROM: a path as for RCPT TO, or ``<>`` giving ``None``.

    ``None`` is the null reverse-path of bounces, which must never be bounced to.
    """
    _check_text(text, MAX_PATH, "path")
    inner = _strip_brackets(text)
    if not inner:
        return None
    return _parse_path_content(inner, smtputf8)


# --- whole-input checks ---------------------------------------------------------------


def _check_text(text: str, limit: int, what: str) -> None:
    """Refuse oversized input and forbidden characters before looking at any structure.

    ``len`` first: a character is at least one octet, so this rejects a huge input
    without encoding it.  The forbidden-character scan then makes every later step safe
    to assume printable text (and no surrogates, so UTF-8 encoding cannot fail).
    """
    if not text:
        raise AddressError(f"empty {what}")
    if len(text) > limit:
        raise AddressError(f"{what} longer than {limit} octets")
    _reject_forbidden(text, "address")
    if len(_utf8(text)) > limit:
        raise AddressError(f"{what} longer than {limit} octets")


def _reject_forbidden(text: str, where: str) -> None:
    """Raise for the first control character or lone surrogate, naming what it is."""
    match = _FORBIDDEN.search(text)
    if match is None:
        return
    char = match.group()
    if char == "\0":
        raise AddressError(f"NUL byte in {where}")
    if char in "\r\n":
        raise AddressError(f"CR or LF in {where}")
    if "\ud800" <= char <= "\udfff":
        raise AddressError(f"lone surrogate in {where} (not encodable as UTF-8)")
    raise AddressError(f"control character {char!r} in {where}")


def _utf8(text: str) -> bytes:
    """Encode for octet counting; callers have already refused surrogates."""
    return text.encode("utf-8")


# --- paths ----------------------------------------------------------------------------


def _strip_brackets(text: str) -> str:
    """Return what lies between the angle brackets a Path requires."""
    if not text.startswith("<") or not text.endswith(">") or len(text) < 2:
        if text.startswith("<") or text.endswith(">"):
            raise AddressError("unbalanced angle bracket in path")
        raise AddressError("path must be enclosed in angle brackets")
    inner = text[1:-1]
    if inner.startswith("<") or inner.endswith(">"):
        raise AddressError("nested angle brackets in path")
    return inner


def _parse_path_content(inner: str, smtputf8: bool) -> Address:
    """Split an optional source route (A-d-l) from the mailbox and parse both.

    Route hops are plain domains (RFC 5321 At-domain), which contain no colon, so the
    first colon ends the route.
    """
    route: tuple[str, ...] = ()
    colon = inner.find(":")
    if inner.startswith("@") and colon != -1:
        route = _parse_route(inner[:colon], smtputf8)
        inner = inner[colon + 1 :]
    local, domain = _split_mailbox(inner, smtputf8)
    return Address(local, domain, route)


def _parse_route(text: str, smtputf8: bool) -> tuple[str, ...]:
    """Parse ``@a,@b`` into its hops; they are normalised when the Address is built."""
    hops = []
    for hop in text.split(","):
        if not hop.startswith("@") or len(hop) == 1:
            raise AddressError("malformed source route (expected @domain,@domain:)")
        _check_domain_charset(hop[1:], smtputf8)
        hops.append(hop[1:])
    return tuple(hops)


# --- mailbox and local part -----------------------------------------------------------


def _split_mailbox(text: str, smtputf8: bool) -> tuple[str, str]:
    """Split ``local@domain`` into the decoded local part and the domain as written.

    The text has already been checked for length and control characters; the domain is
    normalised (and fully validated) when the Address is built.
    """
    if text.startswith('"'):
        local, rest = _scan_quoted(text, smtputf8)
    else:
        local, rest = _scan_dot_string(text, smtputf8)
    if not rest:
        raise AddressError("missing domain (no @domain)")
    if not rest.startswith("@"):
        raise AddressError(f"unexpected {rest[0]!r} after quoted local part")
    domain = rest[1:]
    if not domain:
        raise AddressError("missing domain after @")
    _check_domain_charset(domain, smtputf8)
    return local, domain


def _scan_quoted(text: str, smtputf8: bool) -> tuple[str, str]:
    """Scan a Quoted-string at the start of ``text``; return (decoded content, rest).

    qtextSMTP is printable ASCII except ``"`` and ``\\`` (plus non-ASCII with SMTPUTF8);
    quoted-pairSMTP is a backslash and one printable ASCII character.
    """
    out: list[str] = []
    i, n = 1, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            return "".join(out), text[i + 1 :]
        if char == "\\":
            if i + 1 >= n:
                break
            char = text[i + 1]
            if not " " <= char <= "~":
                raise AddressError("invalid escape in quoted local part")
            i += 1
        elif not char.isascii() and not smtputf8:
            raise AddressError("non-ASCII local part needs SMTPUTF8")
        out.append(char)
        i += 1
    raise AddressError("unbalanced quote in local part")


def _scan_dot_string(text: str, smtputf8: bool) -> tuple[str, str]:
    """Take the unquoted local part up to the first ``@`` and check it is a Dot-string.

    ``@`` is not atext, so the first one ends an unquoted local part.  Without any ``@``
    the domain is what is missing, whatever else is wrong, so that is what is reported.
    """
    at = text.find("@")
    if at == -1:
        if "!" in text:
            raise AddressError("bang path without domain is not supported")
        raise AddressError("missing domain (no @domain)")
    local = text[:at]
    if not local:
        raise AddressError("empty local part")
    for char in local:
        if char == '"':
            raise AddressError("unexpected quote inside unquoted local part")
        if char == " ":
            raise AddressError("space in local part outside a quoted string")
        if not char.isascii():
            if not smtputf8:
                raise AddressError("non-ASCII local part needs SMTPUTF8")
        elif char not in _ATEXT_ASCII and char != ".":
            raise AddressError(f"invalid character {char!r} in local part")
    if "" in local.split("."):
        raise AddressError("leading, trailing or double dot in local part")
    return local, text[at:]


def _is_dot_string(value: str) -> bool:
    """Whether ``value`` can be written unquoted (RFC 5321 Dot-string, RFC 6531 atext)."""
    return _DOT_STRING.fullmatch(value) is not None


def _quote_local(value: str) -> str:
    """Write a decoded local part for the wire, quoting (and escaping) only when needed."""
    if _is_dot_string(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _check_local_value(value: str) -> None:
    """Validate a decoded local part: writable on the wire, and short enough once written.

    The limit is measured on the canonical wire form, the one the relay will send.
    """
    _reject_forbidden(value, "local part")
    if len(_utf8(_quote_local(value))) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")


# --- domains --------------------------------------------------------------------------


def _check_domain_charset(domain: str, smtputf8: bool) -> None:
    """Refuse a non-ASCII domain when the session has no SMTPUTF8 (the wire is ASCII)."""
    if not smtputf8 and not domain.isascii():
        raise AddressError("non-ASCII domain needs SMTPUTF8")


def _normalise_hop(hop: str) -> str:
    """Normalise one source-route hop: a domain name, never an address literal."""
    if hop.startswith("["):
        raise AddressError("address literal not allowed in source route")
    return _normalise_domain(hop)


def _normalise_domain(domain: str) -> str:
    """Return the canonical form of a domain or address literal, or raise."""
    if not domain:
        raise AddressError("missing domain")
    _reject_forbidden(domain, "domain")
    if "[" in domain or "]" in domain:
        if not (domain.startswith("[") and domain.endswith("]") and len(domain) >= 2):
            raise AddressError("unbalanced bracket in domain")
        return _normalise_literal(domain[1:-1])
    if domain.endswith("."):
        raise AddressError("trailing dot in domain")
    normalised = ".".join(_normalise_label(label) for label in domain.split("."))
    if len(normalised) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    return normalised


def _normalise_label(label: str) -> str:
    """Return one label as lowercase LDH ASCII, converting a U-label to an A-label."""
    if not label:
        raise AddressError("empty domain label")
    if not label.isascii():
        label = _to_a_label(label)
    label = label.lower()
    if len(label) > MAX_LABEL:
        raise AddressError(f"domain label longer than {MAX_LABEL} octets")
    for char in label:
        if char not in _LDH:
            raise AddressError(f"invalid character {char!r} in domain")
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("domain label starts or ends with a hyphen")
    return label


def _to_a_label(label: str) -> str:
    """Convert a U-label with the stdlib IDNA codec, turning its errors into ours."""
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError as e:
        reason = e.__cause__ or e  # the codec wraps the real reason
        raise AddressError(f"invalid internationalised domain label ({reason})") from None


def _normalise_literal(content: str) -> str:
    """Canonicalise an address literal's content: IPv4, or ``IPv6:`` then an IPv6 address."""
    if content[:5].lower() == "ipv6:":
        return f"[IPv6:{_parse_ipv6(content[5:]).compressed}]"
    if ":" in content:
        raise AddressError("unsupported address literal (only IPv4 and IPv6: are known)")
    return f"[{_parse_ipv4(content)}]"


def _parse_ipv4(text: str) -> ipaddress.IPv4Address:
    """Parse RFC 5321 IPv4-address-literal: four decimal Snum of 1-3 digits (0-255).

    Leading zeros are legal in RFC 5321 and mean decimal, so they are stripped here
    rather than refused as ``ipaddress`` does (it fears octal).
    """
    parts = text.split(".")
    if (
        len(parts) != 4
        or not all(parts)
        or not set(text) <= _IPV4_CHARS
        or any(len(p) > 3 or int(p) > 255 for p in parts)
    ):
        raise AddressError("invalid IPv4 address literal")
    return ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))


def _parse_ipv6(text: str) -> ipaddress.IPv6Address:
    """Parse the address of an ``[IPv6:...]`` literal; no zone index, hex and colons only."""
    if not text or not set(text) <= _IPV6_CHARS:
        raise AddressError("invalid IPv6 address literal")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise AddressError("invalid IPv6 address literal") from None


def _display_label(label: str) -> str:
    """Decode an A-label for display, or keep it when it does not decode cleanly.

    Punycode is decoded directly rather than with the IDNA 2003 codec, which would refuse
    IDNA 2008 labels such as ``xn--zca`` (``ß``).  A label only counts as decoded if the
    result is printable, non-ASCII and encodes back to the same label, so nothing
    surprising (or invisible) is ever shown in its place.
    """
    if not label.startswith("xn--"):
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        if decoded.encode("punycode").decode("ascii") != label[4:]:
            return label
    except UnicodeError:
        return label
    if not decoded.isprintable() or decoded.isascii():
        return label
    return decoded

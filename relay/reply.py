"""MMDF reply values: one table, read by every channel, the deliverer and the DSN builder.

MMDF's ``mmdf.h`` packs a reply into one byte written in octal ``0xyz``: the top two bits
say how it went (00 success, 01 partial success, 10 temporary failure, 11 permanent
failure), the middle three the area (0 syntax, 1 general, 2 connection, 3 user or
authorisation, 4 mail, 5 file system, 6 local I/O) and the last three the detail.  We keep
the numbers, so a log line or a spool record reads like MMDF's, and give each value what
the rest of a modern relay needs beside it: the SMTP reply code and RFC 3463 enhanced
status it is shown as (in a gateway reply or a bounce), a human text, and the action the
deliverer takes on it.

The action is not always what the class bits say.  MMDF's deliver treated a protocol
error (``PROT``, ``RPLY``) like a dropped connection: the address stays queued and the
host is marked dead, because a peer that speaks nonsense now is usually broken for a
while, not refusing this one recipient.  So those two are ``permanent`` by their bits but
``HOST_DEAD`` by their action, and their SMTP face is a 4xx: they are only ever reported
to a sender as a delay, or (after the lifetime) as a failure that says it timed out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Action",
    "Reply",
    "ReplyClass",
    "ReplyCode",
    "from_smtp",
]


class ReplyClass(enum.Enum):
    """The top two bits of an MMDF reply byte."""

    SUCCESS = 0
    PARTIAL = 1
    TEMPORARY = 2
    PERMANENT = 3


class Action(enum.Enum):
    """What the deliverer does with an address that got this reply."""

    COMMIT = "commit"  # delivered: record it and forget the address
    TEXT_FOLLOWS = "text-follows"  # address accepted; its fate is the final reply
    RETRY = "retry"  # keep this address queued; other mail for the host goes on
    HOST_DEAD = "host-dead"  # keep it queued and hold all mail for the destination a while
    BOUNCE = "bounce"  # permanent: report to the sender, never try again


@dataclass(frozen=True, slots=True)
class _Row:
    """One line of the reply table."""

    smtp_code: int
    enhanced: str
    text: str
    action: Action


class ReplyCode(enum.IntEnum):
    """The MMDF reply values, numbered as in ``mmdf.h`` (written in octal)."""

    # success (00)
    DONE = 0o010
    OK = 0o011
    DOK = 0o013
    MOK = 0o040
    # partial success (01)
    AOK = 0o140
    HOK = 0o141
    # temporary failure (10)
    AGN = 0o210
    TIME = 0o211
    NOOP = 0o212
    EOF = 0o213
    NET = 0o220
    BHST = 0o221
    DHST = 0o222
    NIO = 0o224
    NS = 0o225
    FIO = 0o250
    FCRT = 0o251
    FOPN = 0o252
    FSPC = 0o253
    LIO = 0o260
    LOCK = 0o261
    # permanent failure (11)
    HUH = 0o300
    NCMD = 0o301
    PARM = 0o302
    UCMD = 0o303
    MECH = 0o310
    NO = 0o311
    PROT = 0o320
    RPLY = 0o321
    USER = 0o330
    NAUTH = 0o331
    QUOT = 0o333
    NDEL = 0o340
    FSIZ = 0o353

    @property
    def reply_class(self) -> ReplyClass:
        """Success, partial, temporary or permanent: the top two bits."""
        return ReplyClass((self.value >> 6) & 0o3)

    @property
    def area(self) -> int:
        """The middle three bits: 0 syntax … 6 local I/O."""
        return (self.value >> 3) & 0o7

    @property
    def detail(self) -> int:
        """The last three bits."""
        return self.value & 0o7

    @property
    def smtp_code(self) -> int:
        """The three-digit SMTP reply code this value is shown as."""
        return _TABLE[self].smtp_code

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 enhanced status code, e.g. ``5.1.1``."""
        return _TABLE[self].enhanced

    @property
    def text(self) -> str:
        """A short human description."""
        return _TABLE[self].text

    @property
    def action(self) -> Action:
        """What the deliverer does with an address that got this reply."""
        return _TABLE[self].action

    @property
    def is_success(self) -> bool:
        """True for the success and partial-success classes."""
        return self.reply_class in (ReplyClass.SUCCESS, ReplyClass.PARTIAL)

    @property
    def is_temporary(self) -> bool:
        """True when the deliverer keeps the address queued (RETRY or HOST_DEAD)."""
        return self.action in (Action.RETRY, Action.HOST_DEAD)

    @property
    def is_permanent(self) -> bool:
        """True when the deliverer bounces the address."""
        return self.action is Action.BOUNCE

    @property
    def octal(self) -> str:
        """The value as MMDF writes it, e.g. ``0140``."""
        return f"0{self.value:o}"


_G = Action.COMMIT
_T = Action.RETRY
_D = Action.HOST_DEAD
_B = Action.BOUNCE

_TABLE: Final[dict[ReplyCode, _Row]] = {
    ReplyCode.DONE: _Row(250, "2.0.0", "done", _G),
    ReplyCode.OK: _Row(250, "2.0.0", "ok", _G),
    ReplyCode.DOK: _Row(250, "2.0.0", "sent, not confirmed", _G),
    ReplyCode.MOK: _Row(250, "2.0.0", "message delivered", _G),
    ReplyCode.AOK: _Row(250, "2.1.5", "address ok, text to follow", Action.TEXT_FOLLOWS),
    ReplyCode.HOK: _Row(250, "2.0.0", "host batch done", _G),
    ReplyCode.AGN: _Row(451, "4.3.0", "not now, try again later", _T),
    ReplyCode.TIME: _Row(451, "4.4.2", "timeout", _D),
    ReplyCode.NOOP: _Row(451, "4.3.0", "nothing done this time", _T),
    ReplyCode.EOF: _Row(451, "4.4.2", "unexpected end of input", _D),
    ReplyCode.NET: _Row(451, "4.4.2", "channel went bad", _D),
    ReplyCode.BHST: _Row(451, "4.4.0", "foreign host misbehaved", _D),
    ReplyCode.DHST: _Row(451, "4.4.1", "host went away or could not connect", _D),
    ReplyCode.NIO: _Row(451, "4.4.2", "network I/O problem", _D),
    ReplyCode.NS: _Row(451, "4.4.3", "temporary name server failure", _D),
    ReplyCode.FIO: _Row(451, "4.3.0", "error reading or writing a file", _T),
    ReplyCode.FCRT: _Row(451, "4.3.0", "unable to create a file", _T),
    ReplyCode.FOPN: _Row(451, "4.3.0", "unable to open a file", _T),
    ReplyCode.FSPC: _Row(452, "4.3.1", "local disk full", _T),
    ReplyCode.LIO: _Row(451, "4.3.0", "local I/O problem", _T),
    ReplyCode.LOCK: _Row(450, "4.2.0", "mailbox locked", _T),
    ReplyCode.HUH: _Row(500, "5.5.2", "syntax error", _B),
    ReplyCode.NCMD: _Row(500, "5.5.1", "no such command", _B),
    ReplyCode.PARM: _Row(501, "5.5.4", "bad parameter", _B),
    ReplyCode.UCMD: _Row(502, "5.5.1", "command not implemented", _B),
    ReplyCode.MECH: _Row(554, "5.3.0", "bad mechanism or path", _B),
    ReplyCode.NO: _Row(554, "5.0.0", "refused", _B),
    ReplyCode.PROT: _Row(451, "4.5.0", "protocol error", _D),
    ReplyCode.RPLY: _Row(451, "4.5.0", "unexpected reply from peer", _D),
    ReplyCode.USER: _Row(550, "5.1.1", "unknown user", _B),
    ReplyCode.NAUTH: _Row(550, "5.7.1", "not authorised", _B),
    ReplyCode.QUOT: _Row(552, "5.2.2", "mailbox quota exceeded", _B),
    ReplyCode.NDEL: _Row(550, "5.0.0", "not deliverable", _B),
    ReplyCode.FSIZ: _Row(552, "5.3.4", "message too large", _B),
}


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply as a channel gives it: the MMDF value plus the peer's own words.

    ``text`` is the diagnostic shown in logs and DSNs (for an SMTP peer, its reply line);
    it defaults to the table's text.  ``smtp_code`` and ``enhanced`` override the table's
    when the peer told us better ones (a remote ``552 5.2.2`` stays ``5.2.2``).
    """

    code: ReplyCode
    text: str = ""
    smtp_code: int | None = None
    enhanced: str | None = None

    def __post_init__(self) -> None:
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("a reply text is one line")
        if self.smtp_code is not None and not 200 <= self.smtp_code <= 599:
            raise ValueError(f"not an SMTP reply code: {self.smtp_code}")

    @property
    def effective_smtp_code(self) -> int:
        """The SMTP code to show: the peer's if known, else the table's."""
        return self.smtp_code if self.smtp_code is not None else self.code.smtp_code

    @property
    def effective_enhanced(self) -> str:
        """The enhanced status to show: the peer's if known, else the table's."""
        return self.enhanced if self.enhanced is not None else self.code.enhanced_status

    @property
    def description(self) -> str:
        """The human text: the peer's words if any, else the table's."""
        return self.text or self.code.text

    def smtp_line(self) -> str:
        """The reply as one SMTP line without CRLF, e.g. ``550 5.1.1 unknown user``."""
        return f"{self.effective_smtp_code} {self.effective_enhanced} {self.description}"

    def __str__(self) -> str:
        return f"{self.code.name}({self.code.octal}) {self.smtp_line()}"


def from_smtp(code: int, text: str = "", enhanced: str | None = None) -> Reply:
    """Translate an SMTP reply from a peer into the MMDF value the deliverer acts on.

    The enhanced status, when the peer sent one, is more precise than the three digits,
    so it decides first; the basic code decides the rest.  A 421 means the peer is going
    away, which for the deliverer is a dead host, not a refusal of this address.
    """
    code_class = code // 100
    if code_class == 2:
        return Reply(ReplyCode.OK, text, code, enhanced)
    if code_class not in (4, 5):
        return Reply(ReplyCode.RPLY, text, None, None)
    mmdf = _from_enhanced(code_class, enhanced) or _from_basic(code)
    if mmdf.reply_class is ReplyClass.PERMANENT and code_class == 4:
        mmdf = ReplyCode.AGN
    if mmdf.action is Action.RETRY and code_class == 5:
        mmdf = ReplyCode.NO
    if code == 421 and mmdf.action is not Action.HOST_DEAD:
        mmdf = ReplyCode.DHST  # whatever the enhanced status says, the peer is closing
    return Reply(mmdf, text, code, enhanced)


_ENHANCED: Final[dict[str, ReplyCode]] = {
    "1.1": ReplyCode.USER,
    "1.2": ReplyCode.NDEL,
    "1.6": ReplyCode.USER,
    "1.10": ReplyCode.NDEL,
    "2.1": ReplyCode.NDEL,
    "2.2": ReplyCode.QUOT,
    "2.3": ReplyCode.FSIZ,
    "3.1": ReplyCode.FSPC,
    "3.4": ReplyCode.FSIZ,
    "4.1": ReplyCode.DHST,
    "4.2": ReplyCode.NET,
    "4.3": ReplyCode.NS,
    "4.7": ReplyCode.TIME,
    "5.3": ReplyCode.AGN,
    "7.1": ReplyCode.NAUTH,
}


def _from_enhanced(code_class: int, enhanced: str | None) -> ReplyCode | None:
    """The MMDF value for an enhanced status's subject.detail, if one fits the class."""
    if enhanced is None:
        return None
    _, _, subject_detail = enhanced.partition(".")
    found = _ENHANCED.get(subject_detail)
    if found is None:
        return None
    if code_class == 4 and found.reply_class is ReplyClass.PERMANENT:
        return ReplyCode.LOCK if subject_detail.startswith("2.") else ReplyCode.AGN
    if code_class == 5 and found.action is Action.RETRY:
        return None
    return found


def _from_basic(code: int) -> ReplyCode:
    """The MMDF value for a bare SMTP code."""
    return {
        421: ReplyCode.DHST,
        450: ReplyCode.LOCK,
        451: ReplyCode.AGN,
        452: ReplyCode.FSPC,
        500: ReplyCode.HUH,
        501: ReplyCode.PARM,
        502: ReplyCode.UCMD,
        503: ReplyCode.PROT,
        504: ReplyCode.PARM,
        550: ReplyCode.USER,
        551: ReplyCode.NDEL,
        552: ReplyCode.QUOT,
        553: ReplyCode.USER,
        554: ReplyCode.NO,
    }.get(code, ReplyCode.AGN if code < 500 else ReplyCode.NO)

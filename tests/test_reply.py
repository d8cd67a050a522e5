"""The MMDF reply table: every value complete, classes from the bits, SMTP mapping."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.reply import Action, Reply, ReplyClass, ReplyCode, from_smtp

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

SPEC_TABLE = {
    "OK": 0o011,
    "MOK": 0o040,
    "AOK": 0o140,
    "HOK": 0o141,
    "AGN": 0o210,
    "TIME": 0o211,
    "NOOP": 0o212,
    "NET": 0o220,
    "BHST": 0o221,
    "DHST": 0o222,
    "NIO": 0o224,
    "NS": 0o225,
    "FSPC": 0o253,
    "LOCK": 0o261,
    "PARM": 0o302,
    "NO": 0o311,
    "PROT": 0o320,
    "USER": 0o330,
    "NAUTH": 0o331,
    "QUOT": 0o333,
    "NDEL": 0o340,
    "FSIZ": 0o353,
}


@pytest.mark.parametrize("name,value", sorted(SPEC_TABLE.items()))
def test_spec_values(name: str, value: int) -> None:
    """Every reply SPEC.md names exists with exactly the octal value mmdf.h gives it."""
    assert ReplyCode[name].value == value


@pytest.mark.parametrize("code", list(ReplyCode), ids=lambda c: c.name)
def test_every_value_is_complete(code: ReplyCode) -> None:
    """Every reply has a class, an SMTP code of the right class, an enhanced status, a text."""
    assert isinstance(code.reply_class, ReplyClass)
    assert 200 <= code.smtp_code <= 599
    assert ENHANCED.match(code.enhanced_status)
    assert code.enhanced_status[0] == str(code.smtp_code)[0]
    assert code.text
    assert isinstance(code.action, Action)


@pytest.mark.parametrize("code", list(ReplyCode), ids=lambda c: c.name)
def test_action_agrees_with_smtp_face(code: ReplyCode) -> None:
    """Successes commit (or wait for text), retries show as 4xx, bounces as 5xx."""
    if code.action in (Action.COMMIT, Action.TEXT_FOLLOWS):
        assert code.reply_class in (ReplyClass.SUCCESS, ReplyClass.PARTIAL)
        assert code.smtp_code // 100 == 2
    elif code.action in (Action.RETRY, Action.HOST_DEAD):
        assert code.smtp_code // 100 == 4
    else:
        assert code.reply_class is ReplyClass.PERMANENT
        assert code.smtp_code // 100 == 5


def test_class_bits() -> None:
    """The top two bits give the class: 00 success, 01 partial, 10 temporary, 11 permanent."""
    assert ReplyCode.MOK.reply_class is ReplyClass.SUCCESS
    assert ReplyCode.AOK.reply_class is ReplyClass.PARTIAL
    assert ReplyCode.LOCK.reply_class is ReplyClass.TEMPORARY
    assert ReplyCode.USER.reply_class is ReplyClass.PERMANENT
    assert (ReplyCode.USER.area, ReplyCode.USER.detail) == (3, 0)
    assert ReplyCode.FSPC.octal == "0253"


@pytest.mark.parametrize("name", ["LOCK", "FSPC", "AGN"])
def test_mailbox_level_failures_retry_only_the_address(name: str) -> None:
    """LOCK, FSPC and AGN keep the address queued without marking the host dead."""
    assert ReplyCode[name].action is Action.RETRY


@pytest.mark.parametrize("name", ["TIME", "NET", "BHST", "DHST", "NS", "PROT"])
def test_connection_level_failures_mark_the_host_dead(name: str) -> None:
    """TIME, NET, BHST, DHST, NS and protocol errors hold the whole destination."""
    assert ReplyCode[name].action is Action.HOST_DEAD
    assert ReplyCode[name].is_temporary


@pytest.mark.parametrize("name", ["USER", "QUOT", "FSIZ", "NDEL", "NO", "PARM", "NAUTH"])
def test_permanent_failures_bounce(name: str) -> None:
    """USER, QUOT, FSIZ, NDEL and the other permanent replies bounce."""
    assert ReplyCode[name].is_permanent


def test_reply_prefers_the_peers_words() -> None:
    """A reply keeps the peer's code, status and text over the table's."""
    reply = Reply(ReplyCode.QUOT, "mailbox full", 552, "5.2.2")
    assert reply.smtp_line() == "552 5.2.2 mailbox full"
    assert Reply(ReplyCode.USER).smtp_line() == "550 5.1.1 unknown user"


def test_reply_text_is_one_line() -> None:
    """A reply text containing CR or LF is refused (it would inject lines into SMTP)."""
    with pytest.raises(ValueError):
        Reply(ReplyCode.NO, "no\r\n250 ok")


@pytest.mark.parametrize(
    "code,enhanced,expected",
    [
        (250, "2.0.0", ReplyCode.OK),
        (550, "5.1.1", ReplyCode.USER),
        (550, None, ReplyCode.USER),
        (552, "5.2.2", ReplyCode.QUOT),
        (552, "5.3.4", ReplyCode.FSIZ),
        (554, "5.7.1", ReplyCode.NAUTH),
        (421, "4.4.2", ReplyCode.NET),
        (421, None, ReplyCode.DHST),
        (450, "4.2.1", ReplyCode.LOCK),
        (451, "4.3.0", ReplyCode.AGN),
        (452, "4.3.1", ReplyCode.FSPC),
        (452, "4.5.3", ReplyCode.AGN),
        (450, "4.1.1", ReplyCode.AGN),
        (503, "5.5.1", ReplyCode.PROT),
        (421, "4.7.1", ReplyCode.DHST),
        (421, "4.3.1", ReplyCode.DHST),
    ],
)
def test_from_smtp(code: int, enhanced: str | None, expected: ReplyCode) -> None:
    """Peer SMTP replies map to the MMDF value the deliverer must act on."""
    assert from_smtp(code, "x", enhanced).code is expected


@given(
    st.integers(min_value=200, max_value=599),
    st.one_of(st.none(), st.from_regex(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")),
)
def test_from_smtp_keeps_the_class(code: int, enhanced: str | None) -> None:
    """Any SMTP reply maps to a value of the same class: 2xx success, 4xx retry, 5xx bounce."""
    reply = from_smtp(code, "text", enhanced)
    if code // 100 == 2:
        assert reply.code.is_success
    elif code // 100 == 4:
        assert reply.code.is_temporary
    elif code // 100 == 5:
        assert reply.code.is_permanent or reply.code is ReplyCode.PROT
    else:
        assert reply.code is ReplyCode.RPLY

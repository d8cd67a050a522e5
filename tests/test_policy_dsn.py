"""Tests for relay.policy.dsn: RFC 3464 reports, their envelopes, and who never gets one."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.address import Address, AddressError, parse_mailbox
from relay.envelope import BodyType, Envelope, Recipient, RecipientState, RecipientStatus, Submitter
from relay.policy.dsn import (
    DOUBLE_BOUNCE_PROTOCOL,
    DSN_PROTOCOL,
    DsnKind,
    DsnRecipient,
    build_double_bounce,
    build_dsn,
    double_bounce_envelope,
    double_bounce_recipient,
    dsn_envelope,
    dsn_status,
    is_double_bounce,
    is_dsn,
    may_bounce,
)
from relay.policy.retry import expired_reply
from relay.reply import Reply, ReplyCode

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600.0
HOST = "hub.example.test"
POSTMASTER = "postmaster@example.test"
HEADERS = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: lunch?\r\n"
    b"Message-ID: <m1@example.test>\r\n"
)
BOB = Recipient(parse_mailbox("bob@remote.test"))
CAROL = Recipient(parse_mailbox("carol@remote.test"), original="rfc822;carol@alias.test")
UNKNOWN_USER = Reply(ReplyCode.USER, "user unknown", 550, "5.1.1")


def envelope(sender: str | None = "alice@example.test", **kw: object) -> Envelope:
    return_path = None if sender is None else parse_mailbox(sender)
    fields: dict[str, object] = {
        "return_path": return_path,
        "recipients": (BOB, CAROL),
        "arrival": ARRIVAL,
        "submitter": Submitter("ESMTP"),
    }
    fields.update(kw)
    return Envelope(**fields)  # type: ignore[arg-type]


def build(
    kind: str = "failure",
    env: Envelope | None = None,
    recipients: list[DsnRecipient] | None = None,
    headers: bytes = HEADERS,
) -> bytes:
    out = build_dsn(
        DsnKind(kind),
        env or envelope(),
        "Q0001",
        recipients or [DsnRecipient(BOB, UNKNOWN_USER, NOW - 60, "mx.remote.test")],
        headers,
        HOST,
        POSTMASTER,
        NOW,
    )
    assert out is not None
    return out


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def status_blocks(message: EmailMessage) -> list[Message]:
    payload = parts(message)[1].get_payload()
    assert isinstance(payload, list)
    return payload  # type: ignore[return-value]


def test_structure_is_multipart_report() -> None:
    """A DSN is multipart/report; report-type=delivery-status with the three RFC 3464 parts."""
    message = parse(build())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_top_level_headers() -> None:
    """The DSN comes from MAILER-DAEMON to the sender, auto-submitted, dated ``now``."""
    message = parse(build())
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["To"].addresses[0].addr_spec == "alice@example.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"].startswith("<") and message["Message-ID"].endswith(f"@{HOST}>")


def test_output_is_crlf_and_seven_bit() -> None:
    """The bytes use CRLF line ends only and, for an ASCII sender, only 7-bit octets."""
    data = build(headers=HEADERS + b"X-Latin: caf\xe9\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(data) < 128


def test_output_is_deterministic() -> None:
    """The same inputs give the same bytes (no clock, pid or random in ids and boundaries)."""
    assert build() == build()


def test_message_ids_differ_between_kinds_and_times() -> None:
    """Reports of different kinds or times get different Message-IDs."""
    failure = parse(build("failure"))["Message-ID"]
    delay = parse(build("delay"))["Message-ID"]
    entries = [DsnRecipient(BOB, UNKNOWN_USER)]
    later = build_dsn("failure", envelope(), "Q0001", entries, HEADERS, HOST, POSTMASTER, NOW + 1)
    assert later is not None
    assert len({failure, delay, parse(later)["Message-ID"]}) == 3


def test_human_part_explains_per_recipient() -> None:
    """The readable part names the host, each recipient and its reply, and the postmaster."""
    text = parts(parse(build()))[0].get_content()
    assert f"This is the mail system at host {HOST}." in text
    assert "<bob@remote.test>:" in text
    assert "550 5.1.1 user unknown" in text
    assert POSTMASTER in text


def test_per_message_fields() -> None:
    """The first status block reports the MTA, the queue id, the ENVID and the arrival."""
    message = parse(build(env=envelope(env_id="ENV-42")))
    block = status_blocks(message)[0]
    assert block["Reporting-MTA"] == f"dns; {HOST}"
    assert block["X-Queue-ID"] == "Q0001"
    assert block["Original-Envelope-Id"] == "ENV-42"
    assert parsedate_to_datetime(block["Arrival-Date"]).timestamp() == ARRIVAL


def test_no_envelope_id_no_field() -> None:
    """Without an ENVID the Original-Envelope-Id field is left out."""
    assert "Original-Envelope-Id" not in status_blocks(parse(build()))[0]


def test_per_recipient_fields_of_a_failure() -> None:
    """A failed recipient's block carries its address, action, status, MTA, reply and time."""
    block = status_blocks(parse(build()))[1]
    assert block["Final-Recipient"] == "rfc822; bob@remote.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    assert parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert "Original-Recipient" not in block
    assert "Will-Retry-Until" not in block


def test_several_recipients_in_one_dsn() -> None:
    """All recipients of one kind are reported in one DSN, one block each, in order."""
    recipients = [
        DsnRecipient(BOB, UNKNOWN_USER),
        DsnRecipient(CAROL, Reply(ReplyCode.QUOT, "mailbox full", 552, "5.2.2")),
    ]
    message = parse(build(recipients=recipients))
    blocks = status_blocks(message)[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@remote.test",
        "rfc822; carol@remote.test",
    ]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.2.2"]
    assert blocks[1]["Original-Recipient"] == "rfc822; carol@alias.test"
    text = parts(message)[0].get_content()
    assert "<bob@remote.test>:" in text and "<carol@remote.test>:" in text


def test_untyped_original_recipient_gets_rfc822() -> None:
    """An ORCPT stored without an address type is reported as rfc822."""
    recipient = Recipient(parse_mailbox("x@remote.test"), original="list@example.test")
    block = status_blocks(parse(build(recipients=[DsnRecipient(recipient, UNKNOWN_USER)])))[1]
    assert block["Original-Recipient"] == "rfc822; list@example.test"


def test_expired_recipient_reports_4_4_7() -> None:
    """A recipient that failed because time ran out reports Action failed, Status 4.4.7."""
    last = Reply(ReplyCode.DHST, "connection refused", 421, "4.4.1")
    entry = DsnRecipient(BOB, expired_reply(last))
    block = status_blocks(parse(build(recipients=[entry])))[1]
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert "421 4.4.1 connection refused" in block["Diagnostic-Code"]


def test_expired_without_any_reply() -> None:
    """A recipient that never got a reply still gets a block: 4.4.7 and no Diagnostic-Code."""
    block = status_blocks(parse(build(recipients=[DsnRecipient(BOB)])))[1]
    assert block["Status"] == "4.4.7"
    assert "Diagnostic-Code" not in block


def test_delay_dsn() -> None:
    """A delay DSN says delayed, keeps the 4.x.x status, and says until when it retries."""
    entry = DsnRecipient(
        BOB, Reply(ReplyCode.AGN, "greylisted", 451, "4.7.1"), will_retry_until=NOW + 86400
    )
    message = parse(build("delay", recipients=[entry]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(message)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == NOW + 86400
    assert "still trying" in parts(message)[0].get_content()


@pytest.mark.parametrize(
    ("kind", "reply", "status"),
    [
        ("failure", Reply(ReplyCode.USER), "5.1.1"),
        ("failure", Reply(ReplyCode.NO, "", 554, "5.7.1"), "5.7.1"),
        ("failure", Reply(ReplyCode.NO, "", 554, "4.7.1"), "5.7.1"),
        ("failure", Reply(ReplyCode.NO, "", 554, "garbage"), "5.0.0"),
        ("failure", Reply(ReplyCode.AGN), "4.4.7"),
        ("failure", Reply(ReplyCode.PROT), "4.4.7"),
        ("failure", None, "4.4.7"),
        ("delay", Reply(ReplyCode.LOCK), "4.2.0"),
        ("delay", Reply(ReplyCode.AGN, "", 451, "5.1.1"), "4.0.0"),
        ("delay", None, "4.0.0"),
    ],
)
def test_dsn_status_rules(kind: str, reply: Reply | None, status: str) -> None:
    """Failures report a 5.x.x (4.4.7 if expired), delays a 4.x.x, malformed codes a default."""
    assert dsn_status(DsnKind(kind), reply) == status


def test_original_headers_attached_without_body() -> None:
    """The third part holds the original header section and nothing after the blank line."""
    message = parse(build(headers=HEADERS + b"\r\nsecret body\r\n"))
    attached = parts(message)[2].get_content()
    assert attached.splitlines() == HEADERS.decode().splitlines()
    assert "secret body" not in attached


def test_no_headers_no_third_part() -> None:
    """Without original headers the report has just the two required parts."""
    assert len(parts(parse(build(headers=b"")))) == 2


def test_long_header_lines_survive() -> None:
    """An original header line longer than 998 octets is carried without breaking limits."""
    long_line = b"X-Long: " + b"y" * 5000 + b"\r\n"
    data = build(headers=HEADERS + long_line)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert "y" * 5000 in parts(parse(data))[2].get_content()


def test_long_diagnostic_is_folded_not_encoded() -> None:
    """A long reply is folded at spaces, reads back unchanged, and is never RFC 2047 encoded."""
    text = "rejected: " + " ".join(f"word{i}" for i in range(60))
    reply = Reply(ReplyCode.NDEL, text, 550, "5.7.1")
    data = build(recipients=[DsnRecipient(BOB, reply)])
    assert b"=?" not in data
    block = status_blocks(parse(data))[1]
    assert block["Diagnostic-Code"] == f"smtp; {reply.smtp_line()}"


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    """A non-ASCII recipient is reported as RFC 6533 utf-8 with \\x{HEX} escapes."""
    recipient = Recipient(Address("jürgen", "remote.test"))
    block = status_blocks(parse(build(recipients=[DsnRecipient(recipient, UNKNOWN_USER)])))[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen@remote.test"


def test_non_ascii_sender_gets_utf8_header_and_envelope() -> None:
    """A sender needing SMTPUTF8 gets a raw UTF-8 To: and a DSN envelope asking for SMTPUTF8."""
    env = envelope("jürgen@example.test")
    data = build(env=env)
    assert "To: jürgen@example.test\r\n".encode() in data
    dsn_env = dsn_envelope(env, NOW)
    assert dsn_env is not None
    assert dsn_env.smtputf8
    assert dsn_env.body_type is BodyType.EIGHT_BIT_MIME


def test_null_sender_gets_no_dsn() -> None:
    """Mail from <> is never answered with a DSN: no report and no envelope."""
    env = envelope(None)
    assert not may_bounce(env)
    entries = [DsnRecipient(BOB)]
    assert build_dsn("failure", env, "Q", entries, HEADERS, HOST, POSTMASTER, NOW) is None
    assert dsn_envelope(env, NOW) is None


def test_empty_recipient_list_is_refused() -> None:
    """A DSN about nobody is a caller's defect."""
    with pytest.raises(ValueError, match="at least one"):
        build_dsn("failure", envelope(), "Q", [], HEADERS, HOST, POSTMASTER, NOW)


def test_dsn_envelope() -> None:
    """A DSN's envelope is from <> to the original sender, marked as a DSN, arriving now."""
    dsn_env = dsn_envelope(envelope(), NOW)
    assert dsn_env is not None
    assert dsn_env.return_path is None
    assert [r.address for r in dsn_env.recipients] == [parse_mailbox("alice@example.test")]
    assert dsn_env.submitter.protocol == DSN_PROTOCOL
    assert dsn_env.arrival == NOW
    assert dsn_env.body_type is BodyType.SEVEN_BIT
    assert is_dsn(dsn_env) and not is_double_bounce(dsn_env)
    assert not may_bounce(dsn_env)


def test_double_bounce_goes_to_postmaster_once() -> None:
    """A failed DSN is reported to the postmaster, and that report is never reported again."""
    dsn_env = dsn_envelope(envelope(), NOW)
    assert dsn_env is not None
    double = double_bounce_envelope(dsn_env, POSTMASTER, NOW + 10)
    assert double is not None
    assert double.return_path is None
    assert double.recipients == (double_bounce_recipient(POSTMASTER),)
    assert double.submitter.protocol == DOUBLE_BOUNCE_PROTOCOL
    assert is_double_bounce(double) and is_dsn(double)
    assert double_bounce_envelope(double, POSTMASTER, NOW + 20) is None


def test_no_double_bounce_for_ordinary_or_foreign_mail() -> None:
    """Only this relay's own DSNs get a double bounce; other null-sender mail is dropped."""
    assert double_bounce_envelope(envelope(), POSTMASTER, NOW) is None
    foreign_bounce = envelope(None)
    assert not is_dsn(foreign_bounce)
    assert double_bounce_envelope(foreign_bounce, POSTMASTER, NOW) is None


def test_build_double_bounce() -> None:
    """The double-bounce report goes to the postmaster and says a notification failed."""
    dsn_env = dsn_envelope(envelope(), NOW)
    assert dsn_env is not None
    entry = DsnRecipient(dsn_env.recipients[0], UNKNOWN_USER)
    data = build_double_bounce(dsn_env, "Q2", [entry], HEADERS, HOST, POSTMASTER, NOW)
    assert data is not None
    message = parse(data)
    assert message["To"].addresses[0].addr_spec == POSTMASTER
    assert message["Subject"] == "Undeliverable Delivery Status Notification"
    assert status_blocks(message)[1]["Final-Recipient"] == "rfc822; alice@example.test"
    double = double_bounce_envelope(dsn_env, POSTMASTER, NOW)
    assert double is not None
    assert build_double_bounce(double, "Q3", [entry], HEADERS, HOST, POSTMASTER, NOW) is None
    assert build_double_bounce(envelope(), "Q4", [entry], HEADERS, HOST, POSTMASTER, NOW) is None


def test_dsn_recipient_from_status() -> None:
    """A queue record supplies the last reply and the time of the last attempt."""
    status = RecipientStatus(RecipientState.FAILED, 3, None, UNKNOWN_USER, False, NOW - 5)
    entry = DsnRecipient.from_status(BOB, status, remote_mta="mx.remote.test")
    assert entry == DsnRecipient(BOB, UNKNOWN_USER, NOW - 5, "mx.remote.test", None)


# --- hostile input ------------------------------------------------------------------------

reply_texts = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=()), max_size=3000
)
enhanced_codes = st.none() | st.text(max_size=40)
smtp_codes = st.none() | st.integers(min_value=200, max_value=599)
local_parts = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF), min_size=1, max_size=64
)


def _address_or_skip(local: str, domain: str) -> Address:
    try:
        return Address(local, domain)
    except AddressError:
        return Address("fallback", domain)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    headers=st.binary(max_size=4000) | st.binary(min_size=1000, max_size=3000).map(lambda b: b * 3),
    texts=st.lists(st.tuples(reply_texts, enhanced_codes, smtp_codes), min_size=1, max_size=4),
    kind=st.sampled_from(list(DsnKind)),
    sender_local=local_parts,
    recipient_local=local_parts,
    env_id=st.none() | st.text(max_size=200),
)
def test_builder_never_fails_on_hostile_input(
    headers: bytes,
    texts: list[tuple[str, str | None, int | None]],
    kind: DsnKind,
    sender_local: str,
    recipient_local: str,
    env_id: str | None,
) -> None:
    """Any header bytes and reply texts give a parseable multipart/report, lines ≤ 998 octets."""
    sender = _address_or_skip(sender_local, "example.test")
    recipient = Recipient(_address_or_skip(recipient_local, "remote.test"), original=env_id)
    code = ReplyCode.AGN if kind is DsnKind.DELAY else ReplyCode.NDEL
    entries = [
        DsnRecipient(recipient, Reply(code, text, smtp, enhanced), NOW, env_id, NOW + 1)
        for text, enhanced, smtp in texts
    ]
    env = Envelope(sender, (recipient,), ARRIVAL, Submitter("ESMTP"), env_id=env_id)
    data = build_dsn(kind, env, "Q\u00e9\r\n", entries, headers, HOST, POSTMASTER, NOW)
    assert data is not None
    lines = data.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert not any(b"\r" in line or b"\n" in line for line in lines)
    if not sender.needs_smtputf8:
        assert max(data) < 128
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert not message.defects
    blocks = status_blocks(message)
    assert len(blocks) == 1 + len(entries)
    for block in blocks[1:]:
        assert block["Action"] in ("failed", "delayed")
        assert block["Status"][0] in "45"
        assert block["Diagnostic-Code"].startswith("smtp; ")

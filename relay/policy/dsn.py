"""Delivery status notifications (RFC 3464): what the sender is told, and how it is sent.

A DSN is a ``multipart/report; report-type=delivery-status`` (RFC 6522) of three parts:
a text a person can read, saying per recipient what happened; a ``message/delivery-status``
part a program can read, with one block of per-message fields and one block per
recipient; and the headers of the original message as ``text/rfc822-headers`` (never
the body: it may be large, and the sender has it).  All the recipients of one message
that share a kind (failed, or delayed) go in one DSN.

Why it is built this way:

* **The stdlib builds the MIME.**  :mod:`email` writes the structure, the boundaries and
  the transfer encodings; this module decides only the content.  The output is CRLF bytes
  (``email.policy.SMTP``) ready for the spool.
* **It never fails and is always 7-bit-clean where it can be.**  The inputs are partly
  hostile: a peer's reply text, the original headers (arbitrary bytes, maybe 8-bit, maybe
  with 5 000-octet lines).  Text parts get quoted-printable or base64 when they need it;
  the delivery-status fields, which must be US-ASCII, are sanitised, shortened and folded
  by hand (the stdlib would turn an overlong word into an RFC 2047 encoded-word, which a
  DSN field must not contain), so no line ever exceeds 998 octets.  Only a sender whose
  address needs SMTPUTF8 gets UTF-8 in the ``To:`` header (and a DSN envelope that asks
  for SMTPUTF8); recipients with non-ASCII addresses are reported with RFC 6533's
  ``utf-8`` address type in its ASCII ``\\x{HEX}`` form.
* **Status codes.**  A failed recipient reports its reply's RFC 3463 status when that is
  a ``5.x.x``.  One that failed because time ran out (its last reply was temporary)
  reports ``4.4.7``, "delivery time expired": RFC 3464 allows a 4.x.x status with
  ``Action: failed`` exactly for this, and it tells the sender the failure was never
  permanent.  A delayed recipient reports its reply's ``4.x.x`` (``4.0.0`` if unknown).
* **Deterministic.**  The Message-ID and the MIME boundary are derived from the inputs
  (``now``, the queue id, the recipients, the content) rather than from
  :func:`email.utils.make_msgid` or the generator's random boundary, which read the
  clock, the process id and the random module.  The same inputs give the same bytes.

**Who never gets a DSN.**  Mail from the null sender ``<>`` is never answered with a DSN
(:func:`build_dsn` returns None): that is how bounce loops are prevented.  One exception,
the double bounce: when a DSN *this relay* sent cannot be delivered, the postmaster is
told once (:func:`build_double_bounce`).  Its envelope is marked with
``Submitter(protocol="double-bounce")`` (:func:`is_double_bounce`); if that fails too, the
deliverer drops it with a log line, and nothing more is sent.  Null-sender mail that came
from elsewhere is simply dropped (and logged) when it fails.
"""

from __future__ import annotations

import email.policy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage, Message, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime
from enum import StrEnum
from typing import Final, Literal, TypeAlias

from relay.address import Address, parse_mailbox
from relay.envelope import (
    BodyType,
    Envelope,
    Recipient,
    RecipientStatus,
    Submitter,
)
from relay.policy.retry import EXPIRED_STATUS, EXPIRED_TEXT
from relay.reply import Reply

__all__ = [
    "DOUBLE_BOUNCE_PROTOCOL",
    "DSN_PROTOCOL",
    "DsnKind",
    "DsnRecipient",
    "build_double_bounce",
    "build_dsn",
    "double_bounce_envelope",
    "double_bounce_recipient",
    "dsn_envelope",
    "dsn_status",
    "is_double_bounce",
    "is_dsn",
    "may_bounce",
]

DSN_PROTOCOL: Final = "dsn"
"""``Submitter.protocol`` of a DSN this relay made."""

DOUBLE_BOUNCE_PROTOCOL: Final = "double-bounce"
"""``Submitter.protocol`` of a DSN to the postmaster about a DSN that failed: if this
fails too, it is dropped."""

_MAX_DIAGNOSTIC: Final = 900  # octets of a Diagnostic-Code value: well inside 998
_MAX_FIELD: Final = 300  # octets of any other free-text field (ids, host names)
_FOLD_AT: Final = 78

_Policy: TypeAlias = "EmailPolicy[EmailMessage]"


class DsnKind(StrEnum):
    """Which DSN: a final failure, or a warning that delivery is still being tried."""

    FAILURE = "failure"
    DELAY = "delay"


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient to report, with what is known about its last attempt.

    ``reply`` is its last reply (None if it never got one, e.g. it expired while its
    destination was dead); ``last_attempt`` is when that was; ``remote_mta`` the host that
    answered, if any; ``will_retry_until`` (delay DSNs) when the relay gives up.
    """

    recipient: Recipient
    reply: Reply | None = None
    last_attempt: float | None = None
    remote_mta: str | None = None
    will_retry_until: float | None = None

    @classmethod
    def from_status(
        cls,
        recipient: Recipient,
        status: RecipientStatus,
        *,
        remote_mta: str | None = None,
        will_retry_until: float | None = None,
    ) -> DsnRecipient:
        """Report a recipient from its queue record (last reply, time of the update)."""
        return cls(recipient, status.last_reply, status.updated, remote_mta, will_retry_until)


# --- who gets a DSN, and its envelope ----------------------------------------------------


def may_bounce(envelope: Envelope) -> bool:
    """Whether a DSN may be sent for ``envelope``: never for the null sender."""
    return envelope.return_path is not None


def is_dsn(envelope: Envelope) -> bool:
    """Whether ``envelope`` is a DSN this relay made (to a sender or to the postmaster)."""
    return envelope.return_path is None and envelope.submitter.protocol in (
        DSN_PROTOCOL,
        DOUBLE_BOUNCE_PROTOCOL,
    )


def is_double_bounce(envelope: Envelope) -> bool:
    """Whether ``envelope`` is a double bounce: if it fails, drop it and log, nothing more."""
    return envelope.return_path is None and envelope.submitter.protocol == DOUBLE_BOUNCE_PROTOCOL


def dsn_envelope(original: Envelope, now: float) -> Envelope | None:
    """The envelope of a DSN about ``original``: from ``<>`` to its sender; None for ``<>``."""
    if original.return_path is None:
        return None
    return _report_envelope(original.return_path, DSN_PROTOCOL, now)


def double_bounce_recipient(postmaster: str) -> Recipient:
    """The recipient of a double bounce: the configured postmaster."""
    return Recipient(parse_mailbox(postmaster))


def double_bounce_envelope(failed: Envelope, postmaster: str, now: float) -> Envelope | None:
    """The envelope telling the postmaster that the DSN ``failed`` failed; None if not due.

    Only a DSN this relay made gets one, and a double bounce never does.
    """
    if not is_dsn(failed) or is_double_bounce(failed):
        return None
    return _report_envelope(parse_mailbox(postmaster), DOUBLE_BOUNCE_PROTOCOL, now)


def _report_envelope(to: Address, protocol: str, now: float) -> Envelope:
    utf8 = to.needs_smtputf8
    return Envelope(
        return_path=None,
        recipients=(Recipient(to),),
        arrival=now,
        submitter=Submitter(protocol=protocol),
        body_type=BodyType.EIGHT_BIT_MIME if utf8 else BodyType.SEVEN_BIT,
        smtputf8=utf8,
    )


# --- building the DSN --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    """Everything one DSN says, gathered so the builders take one argument."""

    kind: DsnKind
    to: Address
    envelope: Envelope
    queue_id: str
    recipients: Sequence[DsnRecipient]
    original_headers: bytes
    reporting_mta: str
    postmaster: str
    now: float
    double_bounce: bool = False


def build_dsn(
    kind: DsnKind | Literal["failure", "delay"],
    envelope: Envelope,
    queue_id: str,
    recipients: Sequence[DsnRecipient],
    original_headers: bytes,
    reporting_mta: str,
    postmaster: str,
    now: float,
) -> bytes | None:
    """The DSN telling the sender of ``envelope`` about ``recipients``; None for ``<>``.

    ``original_headers`` are the message's header section (anything after the first
    empty line is ignored); ``reporting_mta`` is this relay's hostname.
    """
    if envelope.return_path is None:
        return None
    report = _Report(
        DsnKind(kind),
        envelope.return_path,
        envelope,
        queue_id,
        _nonempty(recipients),
        original_headers,
        reporting_mta,
        postmaster,
        now,
    )
    return _render(report)


def build_double_bounce(
    failed: Envelope,
    queue_id: str,
    recipients: Sequence[DsnRecipient],
    original_headers: bytes,
    reporting_mta: str,
    postmaster: str,
    now: float,
) -> bytes | None:
    """The failure report to the postmaster about the DSN ``failed``; None if not due.

    ``original_headers`` are the failed DSN's headers.  See :func:`double_bounce_envelope`.
    """
    if not is_dsn(failed) or is_double_bounce(failed):
        return None
    report = _Report(
        DsnKind.FAILURE,
        parse_mailbox(postmaster),
        failed,
        queue_id,
        _nonempty(recipients),
        original_headers,
        reporting_mta,
        postmaster,
        now,
        double_bounce=True,
    )
    return _render(report)


def _nonempty(recipients: Sequence[DsnRecipient]) -> Sequence[DsnRecipient]:
    if not recipients:
        raise ValueError("a DSN reports at least one recipient")
    return recipients


def _render(report: _Report) -> bytes:
    """The whole DSN as CRLF bytes."""
    policy = _policy(utf8=report.to.needs_smtputf8)
    parts = [_human_part(report, policy), _status_part(report, policy)]
    headers = _header_section(report.original_headers)
    if headers:
        parts.append(_headers_part(headers, policy))
    message = _envelope_headers(report, policy)
    message.add_header("Content-Type", "multipart/report", report_type="delivery-status")
    for part in parts:
        message.attach(part)
    message.set_boundary(_boundary(parts))
    return message.as_bytes()


def _policy(*, utf8: bool) -> _Policy:
    """SMTP line ends, 7-bit bodies, and no refolding of the fields folded here."""
    return email.policy.SMTP.clone(cte_type="7bit", refold_source="none", utf8=utf8)


def _envelope_headers(report: _Report, policy: _Policy) -> MIMEPart:
    host = _ascii_field(report.reporting_mta, _MAX_FIELD)
    message = MIMEPart(policy=policy)
    message["From"] = HeaderAddress("Mail Delivery System", "MAILER-DAEMON", host)
    message["To"] = HeaderAddress(username=report.to.local_part, domain=report.to.domain)
    message["Subject"] = _subject(report)
    message["Date"] = _date(report.now)
    message["Message-ID"] = _message_id(report, host)
    message["Auto-Submitted"] = "auto-replied"
    message["MIME-Version"] = "1.0"
    return message


def _subject(report: _Report) -> str:
    if report.double_bounce:
        return "Undeliverable Delivery Status Notification"
    if report.kind is DsnKind.DELAY:
        return "Delayed Mail (still being retried)"
    return "Undelivered Mail Returned to Sender"


def _message_id(report: _Report, host: str) -> str:
    seed = "\0".join(
        [report.kind, report.queue_id, repr(report.now), str(report.to)]
        + [str(r.recipient.address) for r in report.recipients]
    )
    digest = hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"<{int(report.now)}.{report.kind}.{digest}@{host}>"


def _boundary(parts: Sequence[MIMEPart]) -> str:
    """A boundary that cannot occur in the parts: a hash of them (``=_`` is never QP)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.as_bytes())
    return f"=_relay-dsn-{digest.hexdigest()[:40]}"


# --- part 1: for people ------------------------------------------------------------------


def _human_part(report: _Report, policy: _Policy) -> MIMEPart:
    part = MIMEPart(policy=policy)
    part.set_content(_human_text(report), subtype="plain", charset="utf-8")
    part["Content-Description"] = "Notification"
    return part


def _human_text(report: _Report) -> str:
    host = _printable(report.reporting_mta)
    lines = [f"This is the mail system at host {host}.", ""]
    lines += _explanation(report)
    lines += ["", f"If you need help, write to <{_printable(report.postmaster)}>.", ""]
    for entry in report.recipients:
        lines += _human_recipient(report.kind, entry)
    return "\n".join(lines) + "\n"


def _explanation(report: _Report) -> list[str]:
    if report.double_bounce:
        return [
            "A delivery status notification that this relay sent could not be",
            "delivered either. It is not retried and nobody else is told; the",
            "technical report and the notification's headers are attached.",
        ]
    if report.kind is DsnKind.DELAY:
        return [
            "Your message has not been delivered yet to the recipients below.",
            "The relay is still trying, and you need not send it again; you will",
            "hear once more only if it gives up. Details are attached.",
        ]
    return [
        "Your message could not be delivered to the recipients below, and the",
        "relay has given up on them; the reason is shown with each address.",
        "The technical report and your message's headers are attached.",
    ]


def _human_recipient(kind: DsnKind, entry: DsnRecipient) -> list[str]:
    address = _printable(str(entry.recipient.address))
    reply = entry.reply
    reason = _no_reply_reason(kind) if reply is None else _printable(reply.smtp_line())
    lines = [f"<{address}>:", f"    {reason}"]
    if kind is DsnKind.DELAY and entry.will_retry_until is not None:
        lines.append(f"    (the relay keeps trying until {_date(entry.will_retry_until)})")
    return [*lines, ""]


def _no_reply_reason(kind: DsnKind) -> str:
    if kind is DsnKind.DELAY:
        return "not delivered yet"
    return EXPIRED_TEXT


# --- part 2: for programs ----------------------------------------------------------------


def _status_part(report: _Report, policy: _Policy) -> MIMEPart:
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    blocks: list[Message | str] = [_message_block(report, policy)]
    blocks += [_recipient_block(report.kind, entry, policy) for entry in report.recipients]
    part.set_payload(blocks)
    return part


def _message_block(report: _Report, policy: _Policy) -> Message:
    block = Message(policy=policy)
    _field(block, "Reporting-MTA", f"dns; {_ascii_field(report.reporting_mta, _MAX_FIELD)}")
    _field(block, "X-Queue-ID", _ascii_field(report.queue_id, _MAX_FIELD))
    if report.envelope.env_id is not None:
        _field(block, "Original-Envelope-Id", _ascii_field(report.envelope.env_id, _MAX_FIELD))
    _field(block, "Arrival-Date", _date(report.envelope.arrival))
    return block


def _recipient_block(kind: DsnKind, entry: DsnRecipient, policy: _Policy) -> Message:
    block = Message(policy=policy)
    if entry.recipient.original is not None:
        _field(block, "Original-Recipient", _original_recipient(entry.recipient.original))
    _field(block, "Final-Recipient", _typed_address(str(entry.recipient.address)))
    _field(block, "Action", "delayed" if kind is DsnKind.DELAY else "failed")
    _field(block, "Status", dsn_status(kind, entry.reply))
    if entry.remote_mta is not None:
        _field(block, "Remote-MTA", f"dns; {_ascii_field(entry.remote_mta, _MAX_FIELD)}")
    if entry.reply is not None:
        diagnostic = _ascii_field(entry.reply.smtp_line(), _MAX_DIAGNOSTIC)
        _field(block, "Diagnostic-Code", f"smtp; {diagnostic}")
    if entry.last_attempt is not None:
        _field(block, "Last-Attempt-Date", _date(entry.last_attempt))
    if kind is DsnKind.DELAY and entry.will_retry_until is not None:
        _field(block, "Will-Retry-Until", _date(entry.will_retry_until))
    return block


def dsn_status(kind: DsnKind | Literal["failure", "delay"], reply: Reply | None) -> str:
    """The RFC 3463 ``Status:`` of a recipient (see the module docstring for the rules)."""
    status = _status_triple(reply.effective_enhanced) if reply is not None else None
    if DsnKind(kind) is DsnKind.DELAY:
        return status if status is not None and status[0] == "4" else "4.0.0"
    if reply is None or not reply.code.is_permanent:
        return EXPIRED_STATUS
    if status is None:
        return "5.0.0"
    return "5" + status[1:]


def _status_triple(text: str) -> str | None:
    """``text`` if it is a well-formed RFC 3463 status (class.subject.detail), else None."""
    parts = text.split(".")
    if len(parts) != 3 or parts[0] not in ("2", "4", "5"):
        return None
    if not all(p.isascii() and p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:]):
        return None
    return text


def _original_recipient(original: str) -> str:
    """ORCPT as given if it already names its type (``rfc822;…``), else typed here."""
    kind, semicolon, rest = original.partition(";")
    if semicolon and kind and kind.isascii() and all(c.isalnum() or c == "-" for c in kind):
        return f"{kind}; {_ascii_field(rest.strip(), _MAX_FIELD)}"
    return _typed_address(original)


def _typed_address(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; addr`` with non-ASCII as ``\\x{HEX}``."""
    if address.isascii() and address.isprintable():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(_xtext_char(c) for c in address)


def _xtext_char(char: str) -> str:
    if "!" <= char <= "~" and char not in "\\+=":
        return char
    return f"\\x{{{ord(char):X}}}"


def _field(block: Message, name: str, value: str) -> None:
    """Add a field folded here at spaces, so the policy never re-encodes it."""
    block.set_raw(name, _fold(name, value))


def _fold(name: str, value: str) -> str:
    """``value`` folded at single spaces into lines of at most 78 octets where words allow."""
    words = value.split(" ")
    lines: list[str] = []
    current, budget = words[0], _FOLD_AT - len(name) - 2
    for word in words[1:]:
        if len(current) + 1 + len(word) <= budget:
            current += " " + word
            continue
        lines.append(current)
        current, budget = " " + word, _FOLD_AT
    lines.append(current)
    return "\n".join(lines)


# --- part 3: the original headers --------------------------------------------------------


def _headers_part(headers: str, policy: _Policy) -> MIMEPart:
    part = MIMEPart(policy=policy.clone(max_line_length=998))
    part.set_content(headers, subtype="rfc822-headers", charset="utf-8")
    part["Content-Description"] = "Undelivered message headers"
    return part


def _header_section(raw: bytes) -> str:
    """The header section of ``raw`` as text: up to the first empty line, made printable.

    Bytes that are not UTF-8 become U+FFFD and control characters ``?``: this copy is
    for people to read, and the part's encoding then carries it intact.
    """
    lines: list[str] = []
    for line in raw.splitlines():
        if not line.strip(b" \t"):
            break
        lines.append(_printable(line.decode("utf-8", "replace"), keep="\t"))
    return "".join(line + "\n" for line in lines)


# --- small helpers -----------------------------------------------------------------------


def _date(when: float) -> str:
    """An RFC 5322 date in UTC."""
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _printable(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character (controls, line separators) as ``?``."""
    return "".join(c if c.isprintable() or c == " " or c in keep else "?" for c in text)


def _ascii_field(text: str, limit: int) -> str:
    """``text`` as one field value: printable ASCII, single spaces, at most ``limit`` octets."""
    ascii_only = "".join(c if " " <= c <= "~" else "?" for c in text)
    collapsed = " ".join(ascii_only.split())
    if len(collapsed) > limit:
        collapsed = collapsed[: limit - 3] + "..."
    return collapsed or "unknown"

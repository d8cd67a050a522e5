"""The maildrop: its file format, what sendmail does to a text, and the daemon's pickup."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor

from relay.address import parse_forward_path, parse_reverse_path
from relay.maildrop import compose
from relay.maildrop.dropfile import DropFileError, encode_drop_file, parse_drop_file
from relay.maildrop.layout import DROP_MODE, MaildropLayout
from relay.maildrop.pickup import PickupService
from relay.maildrop.submit import drop
from relay.queue.ready import QueueReady

from support.memqueue import MemoryQueue
from support.reactor_helpers import logged_events, until

ALICE = parse_reverse_path("<alice@example.test>")
BOB = parse_forward_path("<bob@example.test>")


# --- the file format -------------------------------------------------------------------


def test_a_drop_file_reads_back_as_written() -> None:
    """encode_drop_file and parse_drop_file agree on sender, recipients, protocol and text."""
    data = encode_drop_file(ALICE, [BOB], b"Subject: x\r\n\r\nhi\r\n", protocol="ESMTP", helo="h")
    parsed = parse_drop_file(data, max_text=1000)
    assert (parsed.sender, parsed.recipients) == (ALICE, (BOB,))
    assert (parsed.protocol, parsed.helo, parsed.text) == (
        "ESMTP",
        "h",
        b"Subject: x\r\n\r\nhi\r\n",
    )


def test_a_null_sender_survives_the_file() -> None:
    """The null reverse-path <> is written and read back as None."""
    parsed = parse_drop_file(encode_drop_file(None, [BOB], b"x\r\n"), max_text=100)
    assert parsed.sender is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"hello", "not a maildrop file"),
        (b"RELAY-MAILDROP 1\n{not json}\n", "not JSON"),
        (b"RELAY-MAILDROP 1\n[]\n", "not a JSON object"),
        (b'RELAY-MAILDROP 1\n{"size": 5}\nabc', "the envelope says 5"),
        (
            b'RELAY-MAILDROP 1\n{"size":1,"protocol":"local","sender":"<>","recipients":[]}\nx',
            "recipients",
        ),
        (
            b'RELAY-MAILDROP 1\n{"size":1,"protocol":"local","sender":"<a@b>",'
            b'"recipients":["<bad address>"]}\nx',
            "bad recipient",
        ),
        (
            b'RELAY-MAILDROP 1\n{"size":1,"protocol":"uucp","sender":"<>","recipients":[]}\nx',
            "unknown protocol",
        ),
    ],
)
def test_a_malformed_file_says_what_is_wrong(data: bytes, why: str) -> None:
    """Each kind of damage is a DropFileError naming it."""
    with pytest.raises(DropFileError, match=why):
        parse_drop_file(data, max_text=1000)


def test_a_text_over_the_limit_is_refused() -> None:
    """A file whose text is larger than the message size limit does not parse."""
    with pytest.raises(DropFileError, match="over the limit"):
        parse_drop_file(encode_drop_file(ALICE, [BOB], b"x" * 11), max_text=10)


@given(st.binary(max_size=300))
def test_parsing_any_bytes_raises_only_drop_file_error(data: bytes) -> None:
    """Whatever a user writes into the drop directory, the parser answers or says why."""
    for candidate in (data, b"RELAY-MAILDROP 1\n" + data):
        with contextlib.suppress(DropFileError):
            parse_drop_file(candidate, max_text=1000)


# --- composing the text ----------------------------------------------------------------


def test_bare_lf_becomes_crlf_and_crlf_stays() -> None:
    """Mixed line ends all come out CRLF, and a last line gets its line end."""
    assert compose.to_crlf(b"a\nb\r\nc") == b"a\r\nb\r\nc\r\n"


@given(st.binary(max_size=200))
def test_to_crlf_leaves_no_bare_lf(data: bytes) -> None:
    """After to_crlf every LF is preceded by CR, and a second pass changes nothing."""
    out = compose.to_crlf(data)
    assert out.count(b"\n") == out.count(b"\r\n")
    assert compose.to_crlf(out) == out


def test_a_lone_dot_ends_the_text_unless_told_otherwise() -> None:
    """Without -i a '.' line ends the message; with -i it is text."""
    text = b"one\n.\ntwo\n"
    assert compose.read_text(io.BytesIO(text), dot_ends=True, limit=100) == b"one\n"
    assert compose.read_text(io.BytesIO(text), dot_ends=False, limit=100) == text


def test_reading_stops_at_the_size_limit() -> None:
    """More than the limit on standard input is compose.MessageTooLarge, in both modes."""
    for dot_ends in (True, False):
        with pytest.raises(compose.MessageTooLarge):
            compose.read_text(io.BytesIO(b"x\n" * 100), dot_ends=dot_ends, limit=50)


def test_the_header_splits_into_fields_with_their_continuations() -> None:
    """A folded field stays one field; the body starts after the empty line."""
    fields, body = compose.split_header(b"To: a@b,\r\n c@d\r\nSubject: s\r\n\r\nbody\r\n")
    assert fields == [b"To: a@b,\r\n c@d\r\n", b"Subject: s\r\n"]
    assert body == b"body\r\n"


def test_a_text_without_header_is_all_body() -> None:
    """A first line that is not a field starts the body (nothing is lost)."""
    fields, body = compose.split_header(b"hello there\r\n")
    assert (fields, body) == ([], b"hello there\r\n")
    assert compose.assemble(fields, body) == b"\r\nhello there\r\n"


@given(st.binary(max_size=300))
def test_splitting_and_assembling_keeps_every_octet(data: bytes) -> None:
    """Fields plus body are the text, with at most the one empty line added."""
    text = compose.to_crlf(data)
    fields, body = compose.split_header(text)
    head = b"".join(fields)
    assert text.startswith(head)
    assert text[len(head) :] in (body, b"\r\n" + body)
    assert compose.assemble(fields, body) == head + b"\r\n" + body


def test_recipients_come_from_to_cc_and_bcc_and_bcc_can_go() -> None:
    """-t reads every address of To, Cc and Bcc; Bcc is then removed."""
    fields, _ = compose.split_header(
        b"To: Alice <alice@x.test>, bob@x.test\r\nCc: carol@x.test\r\n"
        b"Bcc: dave@x.test\r\nSubject: s\r\n\r\n"
    )
    assert compose.header_recipients(fields) == [
        "alice@x.test",
        "bob@x.test",
        "carol@x.test",
        "dave@x.test",
    ]
    assert [f[:3] for f in compose.without_fields(fields, ["bcc"])] == [b"To:", b"Cc:", b"Sub"]


def test_missing_fields_are_made_and_present_ones_kept() -> None:
    """From, Date and Message-ID are added only where missing, with the given identity."""
    made = compose.missing_fields(
        [], sender="a@x.test", full_name="Ann", hostname="h.test", now=0.0
    )
    text = b"".join(made).decode()
    assert "From: Ann <a@x.test>\r\n" in text
    assert "Date: " in text and "@h.test>" in text
    assert (
        compose.missing_fields(made, sender="a@x.test", full_name=None, hostname="h", now=0) == []
    )


# --- the pickup service ----------------------------------------------------------------


def _service(root: Path, queue: MemoryQueue, inotify: bool = True) -> PickupService:
    return PickupService(
        MaildropLayout(root),
        QueueReady.of(queue),
        reactor,
        hostname="hub.example.test",
        max_text=10_000,
        inotify=inotify,
    )


def _good() -> bytes:
    return encode_drop_file(ALICE, [BOB], b"Subject: hi\r\n\r\nhello\r\n")


def _one_dropped(tmp_path: Path) -> tuple[MaildropLayout, MemoryQueue, PickupService]:
    """A maildrop holding one good file, an empty queue, and a pickup not yet started."""
    layout = MaildropLayout(tmp_path / "maildrop")
    drop(layout, _good())
    queue = MemoryQueue(reactor)
    return layout, queue, _service(layout.root, queue)


def _logged(events: list[Any], text: str) -> list[Any]:
    return [e for e in events if text in e.get("log_format", "")]


@pytest_twisted.ensureDeferred
async def test_files_dropped_before_start_are_taken_at_start(tmp_path: Path) -> None:
    """Mail left while the relay was down is stored, traced with the owner's uid, and removed."""
    layout, queue, service = _one_dropped(tmp_path)
    service.startService()
    try:
        await until(lambda: queue.stored())
        await until(lambda: not os.listdir(layout.drop_dir))
    finally:
        await service.stopService()
    [queue_id] = queue.stored()
    text = queue.texts[queue_id]
    assert text.startswith(
        f"Received: by hub.example.test (relay, from userid {os.getuid()}); ".encode()
    )
    assert text.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n")
    envelope = queue.envelope(queue_id)
    assert envelope.return_path == ALICE
    assert [r.address for r in envelope.recipients] == [BOB]
    assert envelope.submitter.protocol == "local"
    assert oct(layout.drop_dir.stat().st_mode & 0o7777) == oct(DROP_MODE)


@pytest.mark.parametrize("inotify", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_file_dropped_while_running_is_taken(tmp_path: Path, inotify: bool) -> None:
    """With inotify or by polling, a file renamed into the drop directory is stored."""
    queue = MemoryQueue(reactor)
    service = _service(tmp_path / "maildrop", queue, inotify=inotify)
    service.startService()
    try:
        await until(lambda: service.layout.drop_dir.is_dir())
        drop(service.layout, _good())
        await until(lambda: len(queue.stored()) == 1)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_bad_files_are_quarantined_and_logged_escaped(tmp_path: Path) -> None:
    """Garbage, a symlink, a FIFO, a hard link and a long name go to quarantine, logged."""
    layout = MaildropLayout(tmp_path / "maildrop")
    layout.prepare()
    (layout.drop_dir / "garbage\x1b[31m").write_bytes(b"\x1b[2J not mail")
    (layout.drop_dir / "link").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(layout.drop_dir / "fifo")
    (tmp_path / "original").write_bytes(_good())
    os.link(tmp_path / "original", layout.drop_dir / "hardlink")
    (layout.drop_dir / ("long" * 60)).write_bytes(b"a name near NAME_MAX")
    queue = MemoryQueue(reactor)
    service = _service(layout.root, queue)
    with logged_events() as events:
        service.startService()
        try:
            await until(lambda: service.quarantined == 5)
        finally:
            await service.stopService()
    assert queue.stored() == []
    assert os.listdir(layout.drop_dir) == []
    assert len(os.listdir(layout.quarantine_dir)) == 5
    lines = _logged(events, "quarantined")
    assert len(lines) == 5
    assert all("\x1b" not in str(e["name"]) + str(e["reason"]) for e in lines)


@pytest_twisted.ensureDeferred
async def test_a_file_the_spool_cannot_take_stays_for_later(tmp_path: Path) -> None:
    """When the store fails the file is kept, and taken once the spool works again."""
    layout, queue, service = _one_dropped(tmp_path)
    queue.fail_stores = 1
    service.startService()
    try:
        await until(lambda: queue.fail_stores == 0)
        assert len(os.listdir(layout.drop_dir)) == 1
        service.wake()
        await until(lambda: len(queue.stored()) == 1)
        await until(lambda: not os.listdir(layout.drop_dir))
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stored_file_that_cannot_be_removed_is_not_taken_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the unlink after the store fails, the file is skipped from then on, loudly."""
    layout, queue, service = _one_dropped(tmp_path)

    def refuse(path: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr("relay.maildrop.pickup.os.unlink", refuse)
    with logged_events() as events:
        service.startService()
        try:
            await until(lambda: _logged(events, "cannot be removed"))
            for _ in range(3):
                service.wake()
                await until(lambda: service._running_pass is None)
        finally:
            await service.stopService()
    assert len(queue.stored()) == 1
    assert len(os.listdir(layout.drop_dir)) == 1


@pytest_twisted.ensureDeferred
async def test_a_drop_directory_the_relay_does_not_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that could not remove what it takes does not take anything, and says why."""
    layout, queue, service = _one_dropped(tmp_path)
    owner = layout.drop_dir.stat().st_uid
    monkeypatch.setattr("relay.maildrop.pickup.os.geteuid", lambda: owner + 4242)
    with logged_events() as events:
        service.startService()
        try:
            await until(lambda: _logged(events, "not taking mail"))
        finally:
            await service.stopService()
    [line] = _logged(events, "not taking mail")
    assert f"belongs to uid {owner}" in line["why"]
    assert queue.stored() == []

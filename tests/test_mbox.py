"""mbox delivery: mboxrd quoting that round-trips, both locks, rollback, refusals."""

from __future__ import annotations

import errno
import fcntl
import mailbox
import os
import pwd
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import fileio
from relay.mailbox.errors import DeliveryError
from relay.mailbox.identity import Identity
from relay.mailbox.mbox import MboxDelivery, from_line
from relay.mailbox.text import MailboxText, mailbox_text, unquote_mboxrd
from relay.reply import ReplyCode

NOBODY = pwd.getpwnam("nobody")
# Text made of the pieces that matter to mbox: From lines, quotes, CR, LF.
PIECES = st.sampled_from(
    [b"From ", b">", b">From ", b"From", b"\r\n", b"\n", b"\r", b"x", b" ", b"F", b"rom "]
)
TEXTS = st.lists(PIECES, max_size=40).map(b"".join)


def _append(path: Path, text: bytes, **options: Any) -> Path:
    """Deliver ``text`` (the queue's CRLF form) into the mbox at ``path``."""
    transform = MailboxText(quote_from=True)
    data = transform.feed(text) + transform.finish(ensure_newline=True)
    delivery = MboxDelivery(path, **options)
    delivery.ensure_open()
    delivery.write(from_line("sender@remote.test", 0.0) + data)
    return delivery.commit()


def _stdlib_messages(path: Path) -> list[bytes]:
    box = mailbox.mbox(path, create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_any_text_reads_back_with_the_stdlib(texts: list[bytes]) -> None:
    """Any texts appended and read with stdlib mailbox.mbox give back each text (as LF,
    with a final newline) once the mboxrd quoting is undone."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "box"
        for text in texts:
            _append(path, text)
        got = [unquote_mboxrd(m) for m in _stdlib_messages(path)]
    want = [mailbox_text(t, quote_from=False, ensure_newline=True) for t in texts]
    assert got == want


@settings(max_examples=500, deadline=None)
@given(
    text=TEXTS,
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    quote=st.booleans(),
    newline=st.booleans(),
)
def test_streaming_conversion_equals_the_whole_text_one(
    text: bytes, cuts: list[int], quote: bool, newline: bool
) -> None:
    """Converting in chunks split anywhere gives exactly what converting at once gives."""
    transform = MailboxText(quote_from=quote)
    out = b""
    start = 0
    for cut in sorted(c for c in cuts if c <= len(text)):
        out += transform.feed(text[start:cut])
        start = cut
    out += transform.feed(text[start:]) + transform.finish(ensure_newline=newline)
    assert out == mailbox_text(text, quote_from=quote, ensure_newline=newline)


@given(text=TEXTS)
def test_quoting_is_undone_exactly(text: bytes) -> None:
    """unquote(quote(x)) == x for LF text, and no quoted line starts with 'From '."""
    lf = text.replace(b"\r", b"")
    quoted = mailbox_text(lf, quote_from=True, ensure_newline=False)
    assert unquote_mboxrd(quoted) == lf
    assert not any(line.startswith(b"From ") for line in quoted.split(b"\n"))


def test_from_line() -> None:
    """The From_ line names the sender (spaces made safe) or MAILER-DAEMON, then a date."""
    assert from_line(None, 0.0).startswith(b"From MAILER-DAEMON ")
    assert from_line('"a b"@x.test', 0.0).startswith(b'From "a_b"@x.test ')
    assert from_line("s@x.test", 0.0).endswith(time.asctime(time.localtime(0.0)).encode() + b"\n")


@pytest.mark.parametrize("fail_after", [0, 1, 17, 100, 4000])
def test_a_failed_write_rolls_the_mailbox_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_after: int
) -> None:
    """A write failing after N bytes leaves the mbox byte-identical, unlocked, readable."""
    path = tmp_path / "box"
    _append(path, b"Subject: one\r\n\r\nfirst\r\n")
    before = path.read_bytes()
    written = 0
    real_write = fileio._write

    def failing(fd: int, data: Any) -> int:
        nonlocal written
        room = fail_after - written
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count = real_write(fd, bytes(data[:room]))
        written += count
        return count

    monkeypatch.setattr(fileio, "_write", failing)
    with pytest.raises(DeliveryError) as caught:
        _append(path, b"Subject: two\r\n\r\n" + b"second\r\n" * 1000)
    monkeypatch.undo()
    assert caught.value.reply.code is ReplyCode.FSPC
    assert path.read_bytes() == before
    assert not (tmp_path / "box.lock").exists()
    with open(path, "rb+") as file:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the fcntl lock was released
    assert _stdlib_messages(path) == [b"Subject: one\n\nfirst\n"]


def test_abort_rolls_back(tmp_path: Path) -> None:
    """An abandoned message is truncated away."""
    path = tmp_path / "box"
    _append(path, b"a\r\n")
    before = path.read_bytes()
    delivery = MboxDelivery(path)
    delivery.ensure_open()
    delivery.write(b"From x Thu Jan  1 00:00:00 1970\nhalf a mess")
    delivery.abort()
    assert path.read_bytes() == before


def test_a_held_dot_lock_answers_lock(tmp_path: Path) -> None:
    """A fresh dot-lock held by someone else: LOCK (temporary), their lock untouched."""
    path = tmp_path / "box"
    (tmp_path / "box.lock").write_text("12345\n")
    naps: list[float] = []
    with pytest.raises(DeliveryError) as caught:
        _append(path, b"x\r\n", lock_attempts=3, lock_delay=0.5, sleep=naps.append)
    assert caught.value.reply.code is ReplyCode.LOCK
    assert caught.value.reply.code.is_temporary
    assert naps == [0.5, 0.5]
    assert (tmp_path / "box.lock").read_text() == "12345\n"
    assert not path.exists()


def test_a_stale_dot_lock_is_removed(tmp_path: Path) -> None:
    """A dot-lock older than the stale limit is broken and the delivery goes ahead."""
    path = tmp_path / "box"
    lock = tmp_path / "box.lock"
    lock.write_text("12345\n")
    os.utime(lock, (time.time() - 600, time.time() - 600))
    _append(path, b"x\r\n", stale_lock_after=500.0)
    assert _stdlib_messages(path) == [b"x\n"]
    assert not lock.exists()


@pytest.fixture
def locked_by_another_process(tmp_path: Path) -> Iterator[Path]:
    """An mbox whose fcntl lock another process holds."""
    path = tmp_path / "box"
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(path)!r}, 'r+')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        yield path
    finally:
        holder.kill()
        holder.wait()


def test_a_held_fcntl_lock_answers_lock(locked_by_another_process: Path) -> None:
    """A mail reader holding the fcntl lock: LOCK, no dot-lock left behind, file unchanged."""
    path = locked_by_another_process
    with pytest.raises(DeliveryError) as caught:
        _append(path, b"x\r\n", lock_attempts=2, sleep=lambda s: None)
    assert caught.value.reply.code is ReplyCode.LOCK
    assert path.read_bytes() == b""
    assert not path.with_name("box.lock").exists()


def test_a_mailbox_without_a_final_newline_is_mended(tmp_path: Path) -> None:
    """If the mbox does not end with a newline, one is added before the From_ line."""
    path = tmp_path / "box"
    path.write_bytes(b"From a Thu Jan  1 00:00:00 1970\nSubject: old\n\nno newline")
    _append(path, b"Subject: new\r\n\r\nbody\r\n")
    messages = _stdlib_messages(path)
    assert messages == [b"Subject: old\n\nno newline\n", b"Subject: new\n\nbody\n"]


def test_hard_links_and_non_files_are_refused(tmp_path: Path) -> None:
    """A hard-linked mbox, or a directory in its place, is refused (temporary FOPN)."""
    path = tmp_path / "box"
    path.write_bytes(b"")
    os.link(path, tmp_path / "other")
    with pytest.raises(DeliveryError) as caught:
        _append(path, b"x\r\n")
    assert caught.value.reply.code is ReplyCode.FOPN
    assert "hard links" in caught.value.reply.text
    (tmp_path / "dir").mkdir()
    with pytest.raises(DeliveryError) as caught:
        _append(tmp_path / "dir", b"x\r\n")
    assert caught.value.reply.code is ReplyCode.FOPN
    assert not (tmp_path / "dir.lock").exists()


def test_a_symlinked_mbox_is_not_followed(tmp_path: Path) -> None:
    """The mailbox's last component is opened without following a symlink."""
    target = tmp_path / "target"
    target.write_bytes(b"")
    (tmp_path / "box").symlink_to(target)
    with pytest.raises(DeliveryError) as caught:
        _append(tmp_path / "box", b"x\r\n")
    assert caught.value.reply.code is ReplyCode.FOPN
    assert target.read_bytes() == b""


def test_a_dot_lock_may_fail_for_files_named_in_aliases(tmp_path: Path) -> None:
    """Mail to a file in a directory the writer cannot write goes on without a dot-lock,
    as Postfix does; a mailbox delivery in the same place fails instead."""
    directory = Path(tempfile.mkdtemp(prefix="relay-mbox-"))
    try:
        directory.chmod(0o755)
        path = directory / "box"
        path.write_bytes(b"")
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        nobody = Identity(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")
        options: dict[str, Any] = {"identity": nobody, "lock_identity": nobody}
        with pytest.raises(DeliveryError) as caught:
            _append(path, b"x\r\n", **options)
        assert caught.value.reply.code is ReplyCode.FOPN
        assert "Permission denied" in caught.value.reply.text
        _append(path, b"x\r\n", dotlock_may_fail=True, **options)
        assert _stdlib_messages(path) == [b"x\n"]
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()

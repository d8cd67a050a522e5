"""Maildir delivery: unique names, atomic visibility in new/, fsync order, failures."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import fileio
from relay.mailbox.errors import DeliveryError
from relay.mailbox.maildir import MaildirDelivery, MaildirName, MaildirNamer, sanitise_host
from relay.reply import ReplyCode

TMP_NAME = re.compile(r"\d+\.M\d{1,6}P\d+R[0-9a-f]{16}Q\d+\.[^/]+")
NEW_NAME = re.compile(r"\d+\.M\d{1,6}P\d+V[0-9a-f]+I[0-9a-f]+R[0-9a-f]{16}Q\d+\.[^/]+,S=(\d+)")


def _deliver(maildir: Path, data: bytes, namer: MaildirNamer | None = None) -> Path:
    delivery = MaildirDelivery(maildir, namer or MaildirNamer("host.test"))
    delivery.ensure_open()
    delivery.write(data)
    return delivery.commit()


def test_a_delivery_creates_the_maildir_and_lands_in_new(tmp_path: Path) -> None:
    """A missing Maildir is made (tmp, new, cur); the message is in new/ under a full name."""
    maildir = tmp_path / "a" / "b" / "Maildir"
    path = _deliver(maildir, b"Subject: x\n\nbody\n")
    assert path.parent == maildir / "new"
    assert path.read_bytes() == b"Subject: x\n\nbody\n"
    assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
    assert list((maildir / "tmp").iterdir()) == []
    match = NEW_NAME.fullmatch(path.name)
    assert match is not None and int(match.group(1)) == path.stat().st_size
    assert stat.S_IMODE(maildir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_names_have_the_documented_shape() -> None:
    """tmp names are secs.MusecPpidRrandQn.host; new names add V dev, I inode and ,S=size."""
    namer = MaildirNamer("mx.test", clock=lambda: 1700000000.25, random_bits=lambda n: 0xABC)
    name = namer.new_name()
    assert name.tmp == f"1700000000.M250000P{os.getpid()}R0000000000000abcQ1.mx.test"
    assert TMP_NAME.fullmatch(name.tmp)
    final = name.final(0x801, 0x1234, 42)
    assert final == f"1700000000.M250000P{os.getpid()}V801I1234R0000000000000abcQ1.mx.test,S=42"


def test_the_host_part_is_escaped() -> None:
    """'/' and ':' (and ',') in the host name are escaped as maildir(5) says."""
    assert sanitise_host("a/b:c,d") == r"a\057b\072c\054d"
    assert sanitise_host("") == "localhost"


@settings(max_examples=200, deadline=None)
@given(
    clocks=st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=50),
    random_value=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_names_from_one_namer_never_repeat(clocks: list[float], random_value: int) -> None:
    """Whatever the clock says (even the same instant) and whatever the random bits, no
    namer ever gives the same name twice."""
    ticks = iter(clocks * 3)
    namer = MaildirNamer("h", clock=lambda: next(ticks), random_bits=lambda n: random_value)
    names = [namer.new_name().tmp for _ in range(len(clocks) * 3)]
    assert len(set(names)) == len(names)
    assert all(TMP_NAME.fullmatch(n) for n in names)


def test_a_name_taken_in_new_is_never_overwritten(tmp_path: Path) -> None:
    """If new/ already has the name, link() fails and another name is used: nothing lost."""
    namer = MaildirNamer("h", clock=lambda: 1000.5, random_bits=lambda n: 7)
    maildir = tmp_path / "md"
    delivery = MaildirDelivery(maildir, namer)
    delivery.ensure_open()
    delivery.write(b"new message\n")
    [tmp_file] = list((maildir / "tmp").iterdir())
    info = tmp_file.stat()
    first = MaildirName(1000, 500000, os.getpid(), 7, 1, "h").final(info.st_dev, info.st_ino, 12)
    (maildir / "new" / first).write_bytes(b"older message\n")
    path = delivery.commit()
    assert path.name != first
    assert (maildir / "new" / first).read_bytes() == b"older message\n"
    assert path.read_bytes() == b"new message\n"


def test_fsync_order_file_then_link_then_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is fsynced before it is linked into new/, and new/ is fsynced after."""
    maildir = tmp_path / "md"
    _deliver(maildir, b"first\n")  # the Maildir exists: only the delivery's own steps below
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def link(*args: Any, **kwargs: Any) -> None:
        events.append("link")
        real_link(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    _deliver(maildir, b"second\n")
    assert events == ["fsync file", "link", "fsync dir"]


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing part-way (ENOSPC after some bytes) leaves new/ and tmp/ empty."""
    maildir = tmp_path / "md"
    written: list[int] = []
    real_write = fileio._write

    def failing(fd: int, data: Any) -> int:
        if sum(written) >= 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count = real_write(fd, bytes(data[:60]))
        written.append(count)
        return count

    monkeypatch.setattr(fileio, "_write", failing)
    delivery = MaildirDelivery(maildir, MaildirNamer("h"))
    delivery.ensure_open()
    with pytest.raises(DeliveryError) as caught:
        delivery.write(b"x" * 1000)
    delivery.abort()
    assert caught.value.reply.code is ReplyCode.FSPC
    assert sum(written) == 120
    assert list((maildir / "new").iterdir()) == []
    assert list((maildir / "tmp").iterdir()) == []


def test_a_maildir_that_cannot_be_created_is_fcrt(tmp_path: Path) -> None:
    """A Maildir path below a regular file gives FCRT (temporary) naming the path."""
    (tmp_path / "file").write_text("")
    delivery = MaildirDelivery(tmp_path / "file" / "md", MaildirNamer("h"))
    with pytest.raises(DeliveryError) as caught:
        delivery.ensure_open()
    assert caught.value.reply.code is ReplyCode.FCRT
    assert str(tmp_path / "file" / "md") in caught.value.reply.text


def test_nothing_in_new_is_ever_partial(tmp_path: Path) -> None:
    """A reader scanning new/ while four threads deliver only ever sees whole messages."""
    maildir = tmp_path / "md"
    namer = MaildirNamer("h")
    size, pieces = 64 * 1024, 16
    messages = {bytes([65 + i]) * size for i in range(8)}
    stop = threading.Event()
    seen: dict[str, bytes] = {}
    bad: list[str] = []

    def writer(letter: int) -> None:
        for _ in range(15):
            delivery = MaildirDelivery(maildir, namer)
            delivery.ensure_open()
            for _ in range(pieces):
                delivery.write(bytes([65 + letter]) * (size // pieces))
                time.sleep(0)
            delivery.commit()

    def reader() -> None:
        while True:
            finished = stop.is_set()
            new = maildir / "new"
            for path in list(new.iterdir()) if new.exists() else []:
                data = path.read_bytes()
                if data not in messages:
                    bad.append(f"{path.name}: {len(data)} bytes")
                seen[path.name] = data
            if finished:
                return

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watcher.join()
    assert bad == []
    assert len(list((maildir / "new").iterdir())) == 60
    assert len(seen) == 60

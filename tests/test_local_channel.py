"""The local channel end to end through its session: every target type and failure."""

from __future__ import annotations

import errno
import mailbox
import os
import pwd
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent
from zope.interface.verify import verifyClass, verifyObject

from relay import fileio
from relay.channels.local import LocalChannel, LocalSession
from relay.envelope import Destination, Submitter
from relay.errors import SpoolError
from relay.interfaces import IChannel, IChannelSession, IMessage, SequencingMode
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue
from relay.reply import ReplyCode

from support.fakes import BytesMessage
from support.local_channel import (
    channel_for,
    deliver,
    make_config,
    make_message,
    recipient,
    shared_directory,
)
from support.memqueue import MemoryQueue
from support.reactor_helpers import logged_events

TEXT = b"Subject: test\r\nFrom: someone@remote.test\r\n\r\nFrom the start\r\nHello.\r\n"
LF_TEXT = TEXT.replace(b"\r\n", b"\n")
QUOTED_LF_TEXT = LF_TEXT.replace(b"\nFrom the", b"\n>From the")  # mboxrd
DAEMON = pwd.getpwnam("daemon")
NOBODY = pwd.getpwnam("nobody")


@pytest_twisted.async_yield_fixture
async def made() -> AsyncIterator[list[LocalChannel]]:
    """Channels made by a test; their thread pools are stopped afterwards."""
    channels: list[LocalChannel] = []
    yield channels
    for channel in channels:
        await channel.close()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the unprivileged alias identity (nobody) can write."""
    with shared_directory() as path:
        yield path


def _channel(
    made: list[LocalChannel], config: Any, queue: Any = None, **options: Any
) -> LocalChannel:
    channel = channel_for(config, queue, **options)
    made.append(channel)
    return channel


def _maildir_files(path: Path) -> list[bytes]:
    new = path / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def _headers(to: str, sender: str = "sender@remote.test") -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {to}\n".encode()


# --------------------------------------------------------------------------- contract


@pytest_twisted.ensureDeferred
async def test_channel_and_session_provide_the_contract(tmp_path: Path, made: list[Any]) -> None:
    """The local channel and its session verify against IChannel and IChannelSession."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    assert verifyObject(IChannel, channel)
    assert verifyClass(IChannelSession, LocalSession)
    assert channel.name == "local"
    assert channel.mode is SequencingMode.TEXT_PER_ADDRESS
    session = await channel.open_session(Destination("local", ""))
    assert verifyObject(IChannelSession, session)
    assert verifyObject(IMessage, make_message())


@pytest_twisted.ensureDeferred
async def test_close_ends_the_threads_without_joining_them_in_the_reactor(
    tmp_path: Path, made: list[Any]
) -> None:
    """close() returns at once and fires once every thread of the channel's pool has ended."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    replies = await deliver(channel, make_message(TEXT), "alice@example.test")  # threads start
    assert [r.code for r in replies] == [ReplyCode.MOK]

    def pool_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if "relay-local" in t.name]

    assert pool_threads()
    closing = channel.close()
    assert not closing.called  # the joining is left to another thread
    await closing
    assert pool_threads() == []
    assert (await channel.close()) is None  # a second close has nothing to do


@pytest_twisted.ensureDeferred
async def test_text_calls_do_nothing_and_say_so(tmp_path: Path, made: list[Any]) -> None:
    """Text calls are no-ops in per-address mode; end_text answers NOOP, not a delivery."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    session = await channel.open_session(Destination("local", ""))
    early = await session.add_recipient(recipient("alice@example.test"))
    assert early.code is ReplyCode.PROT
    await session.begin_message("m", None, make_message())
    await session.begin_text()
    await session.write_text(b"x")
    assert (await session.end_text()).code is ReplyCode.NOOP
    await session.abort_message()
    assert _maildir_files(tmp_path / "var/mail/alice") == []


# --------------------------------------------------------------------------- mailboxes


@pytest_twisted.ensureDeferred
async def test_maildir_delivery_adds_headers_and_keeps_the_text(
    tmp_path: Path, made: list[Any]
) -> None:
    """A Maildir copy is Return-Path + Delivered-To + the text with LF line ends, nothing else."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    [reply] = await deliver(channel, make_message(TEXT), "alice@example.test")
    assert reply.code is ReplyCode.MOK
    assert reply.smtp_line().startswith("250 2.0.0 delivered to alice@example.test")
    files = _maildir_files(tmp_path / "var/mail/alice")
    assert files == [_headers("alice@example.test") + LF_TEXT]
    assert list((tmp_path / "var/mail/alice/tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_mbox_delivery_reads_back_with_the_stdlib(tmp_path: Path, made: list[Any]) -> None:
    """An mbox copy has a From_ line, quoted From lines, and reads back as the same text."""
    config = make_config(tmp_path, 'users = ["alice"]\nformat = "mbox"')
    channel = _channel(made, config)
    replies = await deliver(channel, make_message(TEXT), "alice@example.test", "alice@example.test")
    assert [r.code for r in replies] == [ReplyCode.MOK, ReplyCode.MOK]
    raw = (tmp_path / "var/mail/alice").read_bytes()
    assert raw.startswith(b"From sender@remote.test ")
    assert b"\n>From the start\n" in raw
    box = mailbox.mbox(tmp_path / "var/mail/alice", create=False)
    messages = [box.get_bytes(key) for key in box.iterkeys()]
    assert len(messages) == 2
    for message in messages:
        assert message == _headers("alice@example.test") + QUOTED_LF_TEXT
    assert not (tmp_path / "var/mail/alice.lock").exists()


@pytest_twisted.ensureDeferred
async def test_concurrent_mbox_deliveries_never_interleave(tmp_path: Path, made: list[Any]) -> None:
    """Twenty deliveries to one mbox at once give twenty whole messages."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]\nformat = "mbox"'))
    texts = [b"Subject: %d\r\n\r\n" % i + (b"line %d\r\n" % i) * 2000 for i in range(20)]
    replies = await defer.gatherResults(
        [
            defer.ensureDeferred(
                deliver(channel, make_message(t, queue_id=f"Q{i}"), "alice@example.test")
            )
            for i, t in enumerate(texts)
        ]
    )
    assert all(r.code is ReplyCode.MOK for [r] in replies)
    box = mailbox.mbox(tmp_path / "var/mail/alice", create=False)
    got = sorted(box.get_bytes(k) for k in box.iterkeys())
    assert got == sorted(_headers("alice@example.test") + t.replace(b"\r\n", b"\n") for t in texts)


@pytest_twisted.ensureDeferred
async def test_large_message_is_byte_exact(tmp_path: Path, made: list[Any]) -> None:
    """A message larger than one pool hop arrives whole, CRLF split across chunks or not."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    body = b"".join(b"%07d From x\r\n" % i for i in range(90_000))  # ~1.4 MB
    text = b"Subject: big\r\n\r\n" + body
    [reply] = await deliver(channel, make_message(text), "alice@example.test")
    assert reply.code is ReplyCode.MOK
    assert _maildir_files(tmp_path / "var/mail/alice") == [
        _headers("alice@example.test") + text.replace(b"\r\n", b"\n")
    ]


@pytest_twisted.ensureDeferred
async def test_null_sender(tmp_path: Path, made: list[Any]) -> None:
    """Mail from <> gets Return-Path: <> and a MAILER-DAEMON From_ line."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]\nformat = "mbox"'))
    [reply] = await deliver(channel, make_message(TEXT, sender=None), "alice@example.test")
    assert reply.code is ReplyCode.MOK
    raw = (tmp_path / "var/mail/alice").read_bytes()
    assert raw.startswith(b"From MAILER-DAEMON ")
    assert b"\nReturn-Path: <>\nDelivered-To: alice@example.test\n" in raw


@pytest_twisted.ensureDeferred
async def test_users_match_without_case_and_with_a_delimiter(
    tmp_path: Path, made: list[Any]
) -> None:
    """ALICE+News@ reaches alice; Delivered-To keeps the address as delivered (folded)."""
    channel = _channel(made, make_config(tmp_path, 'users = ["Alice"]'))
    [reply] = await deliver(channel, make_message(TEXT), "ALICE+News@example.test")
    assert reply.code is ReplyCode.MOK
    assert _maildir_files(tmp_path / "var/mail/Alice") == [
        _headers("alice+news@example.test") + LF_TEXT
    ]


@pytest_twisted.ensureDeferred
async def test_no_delimiter_means_no_extensions(tmp_path: Path, made: list[Any]) -> None:
    """With recipient_delimiter = "", alice+news is nobody."""
    config = make_config(tmp_path, 'users = ["alice"]\nrecipient_delimiter = ""')
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "alice+news@example.test")
    assert reply.code is ReplyCode.USER


@pytest_twisted.ensureDeferred
async def test_unknown_user(tmp_path: Path, made: list[Any]) -> None:
    """An address that is neither user nor alias gets USER, 550 5.1.1, and nothing is written."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    [reply] = await deliver(channel, make_message(TEXT), "bob@example.test")
    assert reply.code is ReplyCode.USER
    assert reply.smtp_line() == "550 5.1.1 unknown user: bob@example.test"
    assert not (tmp_path / "var/mail").exists()


@pytest_twisted.ensureDeferred
async def test_explicit_mailbox_path(tmp_path: Path, made: list[Any]) -> None:
    """A [local.mailboxes] user's mail goes to its path, created with its parents."""
    config = make_config(tmp_path, extra='[local.mailboxes]\ncarol = "boxes/deep/carol"\n')
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "carol@example.test")
    assert reply.code is ReplyCode.MOK
    assert _maildir_files(tmp_path / "boxes/deep/carol") == [
        _headers("carol@example.test") + LF_TEXT
    ]
    assert {p.name for p in (tmp_path / "boxes/deep/carol").iterdir()} == {"tmp", "new", "cur"}


# --------------------------------------------------------------------------- aliases


@pytest_twisted.ensureDeferred
async def test_alias_recursion_self_reference_and_duplicates(
    tmp_path: Path, made: list[Any]
) -> None:
    """bob: bob, team; team: alice, bob — bob and alice get one copy each, bob's via itself."""
    aliases = "bob: bob, team\nteam: alice, bob, Alice\n"
    config = make_config(tmp_path, 'users = ["alice", "bob"]', aliases=aliases)
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "bob@example.test")
    assert reply.code is ReplyCode.MOK
    assert _maildir_files(tmp_path / "var/mail/bob") == [_headers("bob@example.test") + LF_TEXT]
    assert _maildir_files(tmp_path / "var/mail/alice") == [_headers("alice@example.test") + LF_TEXT]


@pytest_twisted.ensureDeferred
async def test_alias_loop_without_a_mailbox_fails(tmp_path: Path, made: list[Any]) -> None:
    """a: b, b: a with no such users is a loop: NDEL 5.4.6, nothing delivered."""
    config = make_config(tmp_path, 'users = ["alice"]', aliases="a: b\nb: a\n")
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "a@example.test")
    assert reply.code is ReplyCode.NDEL
    assert reply.effective_enhanced == "5.4.6"
    assert "a -> b -> a" in reply.text


@pytest_twisted.ensureDeferred
async def test_delivered_to_loop_bounces(tmp_path: Path, made: list[Any]) -> None:
    """A message already carrying Delivered-To for the address bounces as a forwarding loop."""
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    looped = b"Delivered-To: Alice@Example.test\r\n" + TEXT
    [reply] = await deliver(channel, make_message(looped), "alice@example.test")
    assert reply.code is ReplyCode.NDEL
    assert reply.smtp_line() == "550 5.4.6 mail forwarding loop for alice@example.test"
    assert _maildir_files(tmp_path / "var/mail/alice") == []


@pytest_twisted.ensureDeferred
async def test_alias_to_files(tmp_path: Path, made: list[Any], shared: Path) -> None:
    """/file targets append mboxrd (as nobody), /dir/ targets are Maildirs, /dev/null drops."""
    aliases = f"archive: {shared}/archive.mbox, {shared}/md/, /dev/null\n"
    channel = _channel(made, make_config(tmp_path, aliases=aliases))
    [reply] = await deliver(channel, make_message(TEXT), "archive@example.test")
    assert reply.code is ReplyCode.MOK, reply
    box = mailbox.mbox(shared / "archive.mbox", create=False)
    [only] = [box.get_bytes(k) for k in box.iterkeys()]
    assert only == _headers("archive@example.test") + QUOTED_LF_TEXT
    assert (shared / "archive.mbox").stat().st_uid == NOBODY.pw_uid
    assert _maildir_files(shared / "md") == [_headers("archive@example.test") + LF_TEXT]


@pytest_twisted.ensureDeferred
async def test_alias_to_a_file_in_a_missing_directory_is_temporary(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """A /file whose directory is missing is not created: a temporary failure names it."""
    channel = _channel(made, make_config(tmp_path, aliases=f"x: {shared}/nope/box\n"))
    [reply] = await deliver(channel, make_message(TEXT), "x@example.test")
    assert reply.code.is_temporary
    assert f"{shared}/nope/box" in reply.text


@pytest_twisted.ensureDeferred
async def test_include_file(tmp_path: Path, made: list[Any]) -> None:
    """:include: lists deliver to their members; their changes count without a restart."""
    members = tmp_path / "members"
    members.write_text("# the list\nalice,\nbob\n")
    config = make_config(
        tmp_path, 'users = ["alice", "bob", "carol"]', aliases=f"list: :include:{members}\n"
    )
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "list@example.test")
    assert reply.code is ReplyCode.MOK
    members.write_text("carol\n")
    [reply] = await deliver(channel, make_message(TEXT, queue_id="Q2"), "list@example.test")
    assert reply.code is ReplyCode.MOK
    counts = [len(_maildir_files(tmp_path / "var/mail" / u)) for u in ("alice", "bob", "carol")]
    assert counts == [1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_an_empty_list_delivers_to_no_one(tmp_path: Path, made: list[Any]) -> None:
    """An alias whose include file is empty is done (MOK), with nothing written anywhere."""
    (tmp_path / "empty").write_text("# nobody yet\n")
    config = make_config(
        tmp_path, 'users = ["alice"]', aliases=f"list: :include:{tmp_path}/empty\n"
    )
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "list@example.test")
    assert reply.code is ReplyCode.MOK
    assert "expands to no one" in reply.text
    assert not (tmp_path / "var/mail").exists()


@pytest_twisted.ensureDeferred
async def test_include_file_problems_are_temporary(tmp_path: Path, made: list[Any]) -> None:
    """A missing include, or one naming a command, defers the mail (an admin fixes it)."""
    bad = tmp_path / "bad"
    bad.write_text('"|/bin/true"\n')
    aliases = f"gone: :include:{tmp_path}/missing\nbad: :include:{bad}\n"
    channel = _channel(made, make_config(tmp_path, aliases=aliases))
    gone, refused = await deliver(
        channel, make_message(TEXT), "gone@example.test", "bad@example.test"
    )
    assert gone.code is ReplyCode.FOPN and "No such file" in gone.text
    assert refused.code is ReplyCode.FIO and "not allowed" in refused.text


# --------------------------------------------------------------------------- commands


@pytest_twisted.ensureDeferred
async def test_pipe_gets_the_message_and_its_environment(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """|command reads From_ + headers + the LF text, with SENDER, RECIPIENT… set."""
    command = (
        f'printf "%s|%s|%s|%s|%s" "$SENDER" "$RECIPIENT" "$EXTENSION" "$ORIGINAL_RECIPIENT" '
        f'"$(id -u)" > {shared}/env; cat > {shared}/out'
    )
    escaped = command.replace("\\", "\\\\").replace('"', '\\"')
    aliases = f'tickets: "|{escaped}"\n'
    channel = _channel(made, make_config(tmp_path, aliases=aliases))
    [reply] = await deliver(channel, make_message(TEXT), "tickets+urgent@example.test")
    assert reply.code is ReplyCode.MOK, reply
    out = (shared / "out").read_bytes()
    first, rest = out.split(b"\n", 1)
    assert first.startswith(b"From sender@remote.test ")
    assert rest == _headers("tickets@example.test") + LF_TEXT
    env = (shared / "env").read_text().split("|")
    assert env == [
        "sender@remote.test",
        "tickets@example.test",
        "urgent",
        "tickets+urgent@example.test",
        str(NOBODY.pw_uid),
    ]


@pytest_twisted.ensureDeferred
async def test_a_large_message_streams_into_a_slow_command(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """Megabytes into a command that reads slowly arrive whole (the pipe pushes back)."""
    text = b"Subject: big\r\n\r\n" + b"".join(b"%08d\r\n" % i for i in range(400_000))
    script = f"sleep 0.2; cat > {shared}/out"
    channel = _channel(made, make_config(tmp_path, aliases=f'big: "|{script}"\n'))
    [reply] = await deliver(channel, make_message(text), "big@example.test")
    assert reply.code is ReplyCode.MOK, reply
    out = (shared / "out").read_bytes()
    assert out.split(b"\n", 1)[1] == _headers("big@example.test") + text.replace(b"\r\n", b"\n")


@pytest.mark.parametrize(
    ("script", "code", "enhanced"),
    [
        ("exit 0", ReplyCode.MOK, "2.0.0"),
        ("echo try later >&2; exit 75", ReplyCode.AGN, "4.3.0"),
        ("exit 71", ReplyCode.LIO, "4.3.0"),
        ("exit 74", ReplyCode.LIO, "4.3.0"),
        ("echo no such user; exit 67", ReplyCode.USER, "5.1.1"),
        ("exit 77", ReplyCode.NAUTH, "5.7.0"),
        ("exit 78", ReplyCode.NO, "5.3.5"),
        ("exit 65", ReplyCode.NO, "5.6.0"),
        ("exit 1", ReplyCode.NO, "5.3.0"),
        ("kill -TERM $$", ReplyCode.AGN, "4.3.0"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_pipe_exit_status(
    tmp_path: Path, made: list[Any], script: str, code: ReplyCode, enhanced: str
) -> None:
    """The command's exit status maps through sysexits; a signal means try again."""
    channel = _channel(made, make_config(tmp_path, aliases=f'cmd: "|{script}"\n'))
    [reply] = await deliver(channel, make_message(TEXT), "cmd@example.test")
    assert reply.code is code, reply
    assert reply.effective_enhanced == enhanced
    if "echo" in script:
        assert script.split("echo ")[1].split(";")[0].split(" >")[0] in reply.text
    if "kill" in script:
        assert "killed by signal 15" in reply.text


@pytest_twisted.ensureDeferred
async def test_pipe_timeout_kills_the_whole_command(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """A command still running after the time-out is killed (children too) and retried later."""
    script = f"sleep 30 & echo $! > {shared}/child; wait"
    config = make_config(tmp_path, aliases=f'slow: "|{script}"\n')
    channel = _channel(made, config, command_timeout=1.0)
    [reply] = await deliver(channel, make_message(TEXT), "slow@example.test")
    assert reply.code is ReplyCode.AGN
    assert "timed out" in reply.text
    child = int((shared / "child").read_text())
    with pytest.raises(ProcessLookupError):
        _wait_gone(child)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_delivery_kills_its_command(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """When the deliverer gives up on an address (stopping), its command is killed."""
    config = make_config(tmp_path, aliases=f'slow: "|echo $$ > {shared}/pid; exec sleep 30"\n')
    channel = _channel(made, config)
    session = await channel.open_session(Destination("local", ""))
    await session.begin_message("m", None, make_message(TEXT))
    pending = session.add_recipient(recipient("slow@example.test"))
    for _ in range(2000):  # a bound, not a timing assertion
        if (shared / "pid").exists() and (shared / "pid").read_text().strip():
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    pid = int((shared / "pid").read_text())
    pending.cancel()
    with pytest.raises(defer.CancelledError):
        await pending
    with pytest.raises(ProcessLookupError):
        _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    """Raise ProcessLookupError once ``pid`` is gone (a killed child may linger briefly)."""
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ", 1)[1].startswith("Z"):
                    raise ProcessLookupError(pid)
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        subprocess.run(["sleep", "0.01"], check=True)


@pytest_twisted.ensureDeferred
async def test_pipe_runs_as_the_aliases_owner(
    tmp_path: Path, made: list[Any], shared: Path
) -> None:
    """Commands of an aliases file owned by a user run as that user, never root."""
    config = make_config(tmp_path, aliases=f'who: "|id -u > {shared}/uid"\n')
    os.chown(tmp_path / "aliases", DAEMON.pw_uid, DAEMON.pw_gid)
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "who@example.test")
    assert reply.code is ReplyCode.MOK, reply
    assert (shared / "uid").read_text().strip() == str(DAEMON.pw_uid)


# --------------------------------------------------------------------------- remote targets


@pytest_twisted.ensureDeferred
async def test_remote_targets_are_requeued_as_one_new_message(
    tmp_path: Path, made: list[Any], memory_queue: MemoryQueue
) -> None:
    """Remote alias targets become one new queued message: same sender, ORCPT, loop marker."""
    queue = memory_queue
    aliases = "team: alice, x@remote.test, y@remote.test\n"
    config = make_config(tmp_path, 'users = ["alice"]', aliases=aliases)
    channel = _channel(made, config, queue)
    [reply] = await deliver(channel, make_message(TEXT), "team@example.test")
    assert reply.code is ReplyCode.MOK
    [queue_id] = await queue.list_messages()
    envelope, _ = await queue.load(queue_id)
    assert str(envelope.return_path) == "sender@remote.test"
    assert [str(r.address) for r in envelope.recipients] == ["x@remote.test", "y@remote.test"]
    assert {r.original for r in envelope.recipients} == {"team@example.test"}
    assert {r.destination for r in envelope.recipients} == {None}
    assert envelope.submitter == Submitter(protocol="local")
    assert queue.texts[queue_id] == b"Delivered-To: team@example.test\r\n" + TEXT
    assert _maildir_files(tmp_path / "var/mail/alice") == [_headers("alice@example.test") + LF_TEXT]


@pytest_twisted.ensureDeferred
async def test_the_queue_may_come_from_the_spool_service(
    tmp_path: Path, made: list[Any], memory_queue: MemoryQueue
) -> None:
    """Given the queue before it is open (the spool's QueueReady), forwarding waits for it."""
    queue = memory_queue
    ready: QueueReady[MemoryQueue] = QueueReady()  # opened by hand, below

    config = make_config(tmp_path, aliases="fwd: someone@remote.test\n")
    channel = _channel(made, config, ready)
    delivering = defer.ensureDeferred(deliver(channel, make_message(TEXT), "fwd@example.test"))
    assert not delivering.called
    ready.opened(queue)
    [reply] = await delivering
    assert reply.code is ReplyCode.MOK
    assert len(await queue.list_messages()) == 1


@pytest_twisted.ensureDeferred
async def test_remote_targets_into_the_real_spool(tmp_path: Path, made: list[Any]) -> None:
    """The forwarded copy is stored in the real spool and reads back byte for byte."""
    queue = await SpoolQueue.open(tmp_path / "spool", reactor)  # type: ignore[arg-type]
    try:
        config = make_config(tmp_path, aliases="fwd: someone@remote.test\n")
        channel = _channel(made, config, queue)
        [reply] = await deliver(channel, make_message(TEXT), "fwd@example.test")
        assert reply.code is ReplyCode.MOK
        [queue_id] = await queue.list_messages()
        assert queue_id in reply.text
        envelope, _ = await queue.load(queue_id)
        assert [str(r.address) for r in envelope.recipients] == ["someone@remote.test"]
        reader = queue.open_message(queue_id).open_text()
        chunks = []
        while chunk := await reader.read(7):
            chunks.append(chunk)
        reader.close()
        assert b"".join(chunks) == b"Delivered-To: fwd@example.test\r\n" + TEXT
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_partial_failure_is_retried_without_duplicates(
    tmp_path: Path, made: list[Any], memory_queue: MemoryQueue, shared: Path
) -> None:
    """When one target fails temporarily, the retry skips the targets that already got it."""
    queue = memory_queue
    flag = shared / "ready"
    aliases = f'team: alice, far@remote.test, "|test -f {flag} || exit 75; cat >> {shared}/got"\n'
    config = make_config(tmp_path, 'users = ["alice"]', aliases=aliases)
    channel = _channel(made, config, queue)
    message = make_message(TEXT)
    [first] = await deliver(channel, message, "team@example.test")
    assert first.code is ReplyCode.AGN
    assert "delivered to 2 of 3 targets" in first.text
    flag.write_text("")
    flag.chmod(0o644)
    [second] = await deliver(channel, message, "team@example.test")
    assert second.code is ReplyCode.MOK, second
    assert len(_maildir_files(tmp_path / "var/mail/alice")) == 1
    assert len(await queue.list_messages()) == 1
    assert (shared / "got").read_bytes().count(b"Subject: test") == 1


@pytest_twisted.ensureDeferred
async def test_a_queue_that_cannot_store_defers(
    tmp_path: Path, made: list[Any], memory_queue: MemoryQueue
) -> None:
    """If the forwarded copy cannot be queued, the address is retried later (AGN)."""
    queue = memory_queue
    queue.fail_stores = 1
    queue.store_error = SpoolError("spool: No space left on device")
    config = make_config(tmp_path, aliases="fwd: someone@remote.test\n")
    channel = _channel(made, config, queue)
    [reply] = await deliver(channel, make_message(TEXT), "fwd@example.test")
    assert reply.code is ReplyCode.AGN
    assert "No space left" in reply.text


@pytest_twisted.ensureDeferred
async def test_a_permanent_failure_among_targets_is_reported(
    tmp_path: Path, made: list[Any]
) -> None:
    """team: alice, ghost — alice gets it, the sender hears that ghost is unknown."""
    config = make_config(tmp_path, 'users = ["alice"]', aliases="team: alice, ghost\n")
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "team@example.test")
    assert reply.code is ReplyCode.USER
    assert "ghost@example.test" in reply.text and "delivered to 1 of 2" in reply.text
    assert len(_maildir_files(tmp_path / "var/mail/alice")) == 1


# --------------------------------------------------------------------------- failures


@pytest_twisted.ensureDeferred
async def test_full_disk_on_a_tiny_tmpfs(tmp_path: Path, made: list[Any]) -> None:
    """ENOSPC is FSPC (452 4.3.1, retried); no partial file in new/, mbox rolled back."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a 64k tmpfs (this test needs root): {done.stderr.strip()}")
    try:
        big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2000  # 160 KB > 64 KiB
        extra = '[local.mailboxes]\nmd = "tiny/md"\nmb = "tiny/mb"\n'
        maildir_config = make_config(tmp_path, extra=extra)
        channel = _channel(made, maildir_config)
        [reply] = await deliver(channel, make_message(big), "md@example.test")
        assert reply.code is ReplyCode.FSPC
        assert reply.smtp_line().startswith("452 4.3.1 ")
        assert list((mount / "md/new").iterdir()) == []
        assert list((mount / "md/tmp").iterdir()) == []
        mbox_config = make_config(tmp_path, 'format = "mbox"', extra=extra)
        channel = _channel(made, mbox_config)
        [small] = await deliver(channel, make_message(TEXT), "mb@example.test")
        assert small.code is ReplyCode.MOK
        before = (mount / "mb").read_bytes()
        [reply] = await deliver(channel, make_message(big), "mb@example.test")
        assert reply.code is ReplyCode.FSPC
        assert (mount / "mb").read_bytes() == before
        assert not (mount / "mb.lock").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest_twisted.ensureDeferred
async def test_permission_denied_is_temporary(made: list[Any], shared: Path) -> None:
    """A system user's Maildir they cannot write (root's, 0700) defers the mail: FOPN 451."""
    config = make_config(shared, "system_users = true")
    maildir = shared / "var/mail/daemon"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    maildir.chmod(0o700)
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "daemon@example.test")
    assert reply.code is ReplyCode.FOPN
    assert reply.code.is_temporary
    assert "Permission denied" in reply.text
    assert list((maildir / "new").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_system_users_get_files_they_own(made: list[Any], shared: Path) -> None:
    """With system_users, mail for an account is written as it: Maildir and mbox it owns."""
    channel = _channel(made, make_config(shared, "system_users = true"))
    [reply] = await deliver(channel, make_message(TEXT), "Daemon@example.test")
    assert reply.code is ReplyCode.MOK, reply
    maildir = shared / "var/mail/daemon"
    [delivered] = list((maildir / "new").iterdir())
    for path in (maildir, maildir / "new", maildir / "tmp", delivered):
        assert (path.stat().st_uid, path.stat().st_gid) == (DAEMON.pw_uid, DAEMON.pw_gid)
    boxes = make_config(shared, 'system_users = true\nformat = "mbox"\nmail_root = "spool"')
    channel = _channel(made, boxes)
    [reply] = await deliver(channel, make_message(TEXT), "daemon@example.test")
    assert reply.code is ReplyCode.MOK, reply
    assert (shared / "spool/daemon").stat().st_uid == DAEMON.pw_uid


@pytest_twisted.ensureDeferred
async def test_a_mail_root_that_cannot_be_made_is_temporary(
    tmp_path: Path, made: list[Any]
) -> None:
    """A mail root under a regular file cannot be created: FCRT, temporary."""
    (tmp_path / "afile").write_text("")
    config = make_config(tmp_path, 'users = ["alice"]\nmail_root = "afile/mail"')
    channel = _channel(made, config)
    [reply] = await deliver(channel, make_message(TEXT), "alice@example.test")
    assert reply.code is ReplyCode.FCRT
    assert reply.code.is_temporary


@pytest_twisted.ensureDeferred
async def test_quota_exceeded_bounces(
    tmp_path: Path, made: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDQUOT while writing is a full mailbox: QUOT, 552 5.2.2, and nothing in new/."""
    calls = []

    def over_quota(fd: int, data: Any) -> int:
        calls.append(len(data))
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(fileio, "_write", over_quota)
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    [reply] = await deliver(channel, make_message(TEXT), "alice@example.test")
    assert calls
    assert reply.code is ReplyCode.QUOT
    assert reply.smtp_line().startswith("552 5.2.2 mailbox full")
    assert list((tmp_path / "var/mail/alice/new").iterdir()) == []
    assert list((tmp_path / "var/mail/alice/tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_an_unreadable_text_is_temporary(tmp_path: Path, made: list[Any]) -> None:
    """If the queued text cannot be read, the address is retried (AGN), nothing half-written."""

    class Broken(BytesMessage):
        def open_text(self) -> Any:
            reader = super().open_text()
            reads = iter([reader.read(10)])

            class Reader:
                def read(self, n: int) -> Any:
                    return next(reads, defer.fail(OSError(errno.EIO, "Input/output error")))

                def close(self) -> None:
                    reader.close()

            return Reader()

    message = make_message(TEXT)
    broken = Broken(message.queue_id, message.envelope, message.text)
    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    [reply] = await deliver(channel, broken, "alice@example.test")
    assert reply.code is ReplyCode.AGN
    assert "Input/output error" in reply.text


@pytest_twisted.ensureDeferred
async def test_a_defect_is_answered_not_raised(
    tmp_path: Path, made: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception becomes LIO (temporary), logged with the address escaped."""
    import relay.channels.local.channel as local

    def broken(*args: Any) -> Any:
        raise RuntimeError("defect")

    channel = _channel(made, make_config(tmp_path, 'users = ["alice"]'))
    monkeypatch.setattr(local, "expand", broken)
    with logged_events() as events:
        [reply] = await deliver(channel, make_message(TEXT), "a\u2028b@example.test")
    assert reply.code is ReplyCode.LIO
    (event,) = [e for e in events if "failed unexpectedly" in e.get("log_format", "")]
    line = formatEvent(event)  # a U+2028 in the recipient does not break the line
    assert line.isprintable() and "a\\u2028b@example.test" in line
    monkeypatch.undo()
    [reply] = await deliver(channel, make_message(TEXT), "alice@example.test")
    assert reply.code is ReplyCode.MOK
    assert channel.failed == 1 and channel.delivered == 1

"""How local delivery judges failures: OS errors, command exits, and who it acts as."""

from __future__ import annotations

import errno
import os
import pwd
import threading
from pathlib import Path

import pytest

from relay.mailbox.errors import Step, reply_for_oserror
from relay.mailbox.identity import Identity, acting_as, can_switch, identity_of_owner
from relay.mailbox.pipe import CommandOutcome, reply_for_outcome
from relay.reply import ReplyCode

DAEMON = pwd.getpwnam("daemon")


@pytest.mark.parametrize(
    ("number", "step", "code", "line"),
    [
        (errno.ENOSPC, Step.WRITE, ReplyCode.FSPC, "452 4.3.1 cannot write /m/x: "),
        (errno.EDQUOT, Step.WRITE, ReplyCode.QUOT, "552 5.2.2 mailbox full: cannot write /m/x: "),
        (errno.EFBIG, Step.WRITE, ReplyCode.QUOT, "552 5.2.2 mailbox full: "),
        (errno.EACCES, Step.CREATE, ReplyCode.FOPN, "451 4.3.0 cannot create /m/x: "),
        (errno.EPERM, Step.OPEN, ReplyCode.FOPN, "451 4.3.0 cannot open /m/x: "),
        (errno.EROFS, Step.WRITE, ReplyCode.FOPN, "451 4.3.0 "),
        (errno.ENOENT, Step.CREATE, ReplyCode.FCRT, "451 4.3.0 cannot create "),
        (errno.ENOTDIR, Step.OPEN, ReplyCode.FCRT, "451 4.3.0 "),
        (errno.EAGAIN, Step.LOCK, ReplyCode.LOCK, "450 4.2.0 "),
        (errno.EMFILE, Step.OPEN, ReplyCode.LIO, "451 4.3.0 "),
        (errno.EIO, Step.WRITE, ReplyCode.FIO, "451 4.3.0 cannot write /m/x: "),
        (errno.EIO, Step.CREATE, ReplyCode.FCRT, "451 4.3.0 "),
        (errno.EIO, Step.OPEN, ReplyCode.FOPN, "451 4.3.0 "),
        (errno.EIO, Step.LOCK, ReplyCode.LOCK, "450 4.2.0 "),
    ],
)
def test_os_errors_map_to_replies(number: int, step: Step, code: ReplyCode, line: str) -> None:
    """Full disk and permissions are temporary, quota is a 5.2.2 bounce, the rest retries."""
    reply = reply_for_oserror(OSError(number, os.strerror(number)), step, "/m/x")
    assert reply.code is code
    assert reply.smtp_line().startswith(line)
    assert reply.smtp_line().endswith(os.strerror(number))
    assert reply.code.is_temporary == (code is not ReplyCode.QUOT)


def test_paths_in_replies_are_one_line() -> None:
    """A hostile path cannot break the reply onto two lines."""
    reply = reply_for_oserror(OSError(errno.EIO, "I/O"), Step.WRITE, "/m/a\r\nb")
    assert "\n" not in reply.text and "\\r\\n" in reply.text


@pytest.mark.parametrize(
    ("outcome", "code", "line"),
    [
        (CommandOutcome(0), ReplyCode.MOK, "250 2.0.0 delivered to command |cmd"),
        (CommandOutcome(75, output=b"busy\n"), ReplyCode.AGN, "451 4.3.0 command |cmd exited 75"),
        (CommandOutcome(67), ReplyCode.USER, "550 5.1.1 command |cmd exited 67 (user unknown)"),
        (CommandOutcome(71), ReplyCode.LIO, "451 4.3.0 "),
        (CommandOutcome(74), ReplyCode.LIO, "451 4.3.0 "),
        (CommandOutcome(77), ReplyCode.NAUTH, "550 5.7.0 "),
        (CommandOutcome(64), ReplyCode.NO, "554 5.3.0 "),
        (CommandOutcome(68), ReplyCode.NDEL, "550 5.1.2 "),
        (CommandOutcome(73), ReplyCode.NO, "554 5.2.0 "),
        (CommandOutcome(78), ReplyCode.NO, "554 5.3.5 "),
        (CommandOutcome(2), ReplyCode.NO, "554 5.3.0 command |cmd exited 2"),
        (CommandOutcome(None, signal=9), ReplyCode.AGN, "451 4.3.0 command |cmd killed by"),
        (CommandOutcome(None, 9, timed_out=True), ReplyCode.AGN, "451 4.3.0 command |cmd timed"),
    ],
)
def test_command_exits_map_through_sysexits(
    outcome: CommandOutcome, code: ReplyCode, line: str
) -> None:
    """sysexits.h decides: 75/71/74 retry, 67 unknown user, 77 not authorised, rest bounce."""
    reply = reply_for_outcome("cmd", outcome)
    assert reply.code is code
    assert reply.smtp_line().startswith(line)
    if outcome.output:
        assert reply.text.endswith(": busy")


def test_command_output_is_kept_short_and_on_one_line() -> None:
    """Whatever the command printed becomes one printable line of bounded length."""
    reply = reply_for_outcome("cmd", CommandOutcome(1, output=b"a\r\nb\x1b[31m" + b"c" * 5000))
    assert "\n" not in reply.text and "\x1b" not in reply.text
    assert ": a b\\x1b[31mccc" in reply.text and len(reply.text) < 400  # shown, not run


def _fs_uid(thread_id: int) -> int:
    with open(f"/proc/self/task/{thread_id}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return int(line.split()[4])
    raise AssertionError("no Uid line")


def test_acting_as_changes_only_the_calling_thread(tmp_path: Path) -> None:
    """Inside acting_as the thread creates files as the user; other threads stay root."""
    assert can_switch(), "these tests run as root on Linux"
    daemon = Identity(DAEMON.pw_uid, DAEMON.pw_gid, "daemon")
    shared = Path("/tmp") / f"relay-identity-{os.getpid()}"
    shared.mkdir(mode=0o777, exist_ok=True)
    shared.chmod(0o777)
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def worker() -> None:
        with acting_as(daemon):
            (shared / "made").write_text("x")
            try:
                (tmp_path / "denied").write_text("x")  # tmp_path is root's, 0700 above
            except PermissionError:
                seen["denied"] = True
            seen["tid"] = threading.get_native_id()
            inside.set()
            release.wait(10)
        seen["after"] = _fs_uid(threading.get_native_id())

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert inside.wait(10)
        assert _fs_uid(int(str(seen["tid"]))) == DAEMON.pw_uid
        assert _fs_uid(threading.get_native_id()) == 0
        (tmp_path / "root-can").write_text("x")
    finally:
        release.set()
        thread.join()
    try:
        assert seen["denied"] is True
        assert seen["after"] == 0
        assert (shared / "made").stat().st_uid == DAEMON.pw_uid
    finally:
        (shared / "made").unlink()
        shared.rmdir()


def test_the_owner_of_a_file_runs_its_commands_never_root(tmp_path: Path) -> None:
    """A root-owned aliases file maps to nobody; a user's file to that user."""
    path = tmp_path / "aliases"
    path.write_text("")
    nobody = pwd.getpwnam("nobody")
    assert identity_of_owner(path) == Identity(
        nobody.pw_uid, nobody.pw_gid, "nobody", nobody.pw_dir
    )
    os.chown(path, DAEMON.pw_uid, DAEMON.pw_gid)
    assert identity_of_owner(path).uid == DAEMON.pw_uid
    os.chown(path, 4242, 4343)
    assert identity_of_owner(path) == Identity(4242, 4343, "4242")

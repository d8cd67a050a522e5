"""``relay-sendmail`` as programs run it: the installed console script, as a subprocess.

Most tests read what it dropped (no daemon needed: that is the point of the maildrop);
two run ``twistd -n relay`` to see the mail delivered, one of them started only after
the mail was submitted, and one feed it a malformed drop file while it runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.maildrop.dropfile import DropFile, parse_drop_file
from relay.maildrop.layout import MaildropLayout

BIN = Path(sys.executable).parent
SENDMAIL = str(BIN / "relay-sendmail")
TWISTD = str(BIN / "twistd")
RELAY = str(BIN / "relay")
NOBODY = 65534


def _config(tmp_path: Path, *, maildrop: str = "maildrop", extra: str = "") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nhostname = "hub.example.test"\nlocal_domains = ["example.test"]\n'
        f'spool = "spool"\nmaildrop = "{maildrop}"\n'
        '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\nworkers = 0\nmax_message_size = 4096\n'
        '[local]\nmail_root = "mail"\nusers = ["alice", "bob", "carol"]\n' + extra
    )
    return path


def _sendmail(
    config: Path, args: list[str], text: bytes = b"", *, program: str = SENDMAIL
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    return subprocess.run(
        [program, *args], input=text, capture_output=True, env=env, timeout=60, check=False
    )


def _dropped(tmp_path: Path) -> list[DropFile]:
    drop_dir = tmp_path / "maildrop" / "drop"
    return [
        parse_drop_file((drop_dir / name).read_bytes(), max_text=1 << 20)
        for name in sorted(os.listdir(drop_dir))
    ]


def _header(text: bytes) -> str:
    return text.split(b"\r\n\r\n", 1)[0].decode()


# --- what gets dropped -----------------------------------------------------------------


def test_recipients_from_the_header_with_bcc_removed(tmp_path: Path) -> None:
    """-t takes To, Cc and Bcc as recipients (plus any arguments) and drops the Bcc field."""
    config = _config(tmp_path)
    text = (
        b"To: Alice <alice@example.test>\nCc: bob@example.test\n"
        b"Bcc: carol@example.test\nSubject: t\n\nbody\n"
    )
    result = _sendmail(config, ["-t", "-oi", "dave@example.test"], text)
    assert result.returncode == 0, result.stderr
    [dropped] = _dropped(tmp_path)
    assert [str(r) for r in dropped.recipients] == [
        "dave@example.test",
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
    ]
    assert "carol" not in dropped.text.decode()
    assert "To: Alice <alice@example.test>\r\nCc: bob@example.test\r\n" in dropped.text.decode()


def test_a_lone_dot_is_text_with_i_and_the_end_without(tmp_path: Path) -> None:
    """With -i a '.' line stays in the message; without it, it ends the message there."""
    config = _config(tmp_path)
    text = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert _sendmail(config, ["-i", "alice"], text).returncode == 0
    assert _sendmail(config, ["alice"], text).returncode == 0
    bodies = sorted(d.text.split(b"\r\n\r\n", 1)[1] for d in _dropped(tmp_path))
    assert bodies == [b"before\r\n", b"before\r\n.\r\nafter\r\n"]


def test_f_sets_the_sender_and_missing_fields_are_added(tmp_path: Path) -> None:
    """-f is the envelope sender; From (with -F), Date and Message-ID are made if missing."""
    config = _config(tmp_path)
    result = _sendmail(config, ["-f", "carol@example.test", "-F", "Carol C", "bob"], b"hi\n")
    assert result.returncode == 0, result.stderr
    [dropped] = _dropped(tmp_path)
    assert str(dropped.sender) == "carol@example.test"
    assert [str(r) for r in dropped.recipients] == ["bob@example.test"]
    header = _header(dropped.text)
    assert "From: Carol C <carol@example.test>" in header
    assert "Date: " in header
    assert "Message-ID: <" in header and "@hub.example.test>" in header
    assert dropped.text.endswith(b"\r\n\r\nhi\r\n")


def test_present_fields_are_kept_and_bare_lf_becomes_crlf(tmp_path: Path) -> None:
    """A program's own From/Date/Message-ID stay; LF line ends arrive as CRLF."""
    config = _config(tmp_path)
    text = (
        b"From: me@example.test\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
        b"Message-ID: <1@x>\n\nline one\nline two\r\nline three"
    )
    assert _sendmail(config, ["alice@example.test"], text).returncode == 0
    [dropped] = _dropped(tmp_path)
    assert dropped.text == (
        b"From: me@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <1@x>\r\n\r\nline one\r\nline two\r\nline three\r\n"
    )
    assert b"\n" not in dropped.text.replace(b"\r\n", b"")


def test_common_no_op_options_are_accepted(tmp_path: Path) -> None:
    """-oem, -odi, -odb, -oQ…, -v, -N, -bm pass (as with Postfix) and the mail is dropped."""
    config = _config(tmp_path)
    args = ["-oem", "-odi", "-odb", "-oQ/tmp", "-v", "-N", "never", "-bm", "-oi", "alice"]
    result = _sendmail(config, args, b"x\n")
    assert result.returncode == 0, result.stderr
    assert len(_dropped(tmp_path)) == 1


class _PipeSMTP(smtplib.SMTP):
    """smtplib talking to ``relay-sendmail -bs`` over a socket pair instead of TCP."""

    def __init__(self, config: Path) -> None:
        self._env = {**os.environ, "RELAY_CONFIG": str(config)}
        self.process: subprocess.Popen[bytes] | None = None
        super().__init__()

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [SENDMAIL, "-bs"], stdin=theirs, stdout=theirs, env=self._env
        )
        theirs.close()
        ours.settimeout(60)
        return ours


def test_bs_speaks_smtp_on_a_pipe_to_smtplib(tmp_path: Path) -> None:
    """-bs: smtplib sends two messages through a pipe; each is dropped before its 250."""
    config = _config(tmp_path)
    client = _PipeSMTP(config)
    client.connect("pipe")
    code, lines = client.ehlo("client.example.test")
    assert code == 250 and b"PIPELINING" in lines
    refused = client.sendmail(
        "alice@example.test", ["bob@example.test"], b"Subject: 1\r\n\r\none\r\n"
    )
    assert refused == {}
    client.sendmail("<>", ["carol@example.test", "bob@example.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    client.quit()
    assert client.process is not None and client.process.wait(timeout=30) == 0
    first, second = _dropped(tmp_path)
    by_subject = {b"1" if b"Subject: 1" in d.text else b"2": d for d in (first, second)}
    one, two = by_subject[b"1"], by_subject[b"2"]
    assert (str(one.sender), [str(r) for r in one.recipients]) == (
        "alice@example.test",
        ["bob@example.test"],
    )
    assert (one.protocol, one.helo) == ("ESMTP", "client.example.test")
    assert two.sender is None
    assert "Message-ID: " in _header(two.text)


# --- exit codes ------------------------------------------------------------------------


def test_exit_64_for_a_bad_command_line(tmp_path: Path) -> None:
    """An unknown option, an unsupported mode, or no recipients: 64 and one line on stderr."""
    config = _config(tmp_path)
    for args in (["-Z", "alice"], ["-bd"], []):
        result = _sendmail(config, args, b"x\n")
        assert result.returncode == 64, args
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "maildrop" / "drop").exists() or _dropped(tmp_path) == []


def test_exit_65_for_bad_data(tmp_path: Path) -> None:
    """A malformed address or a message over the size limit: 65, and nothing dropped."""
    config = _config(tmp_path)
    for args, text in (
        (["bad address@example.test"], b"x\n"),
        (["-t"], b"Subject: nobody\n\nx\n"),
        (["alice"], b"x" * 5000),
    ):
        result = _sendmail(config, args, text)
        assert result.returncode == 65, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "maildrop" / "drop").exists() or _dropped(tmp_path) == []


def test_exit_75_when_the_message_cannot_be_made_durable(tmp_path: Path) -> None:
    """A maildrop that cannot be written: 75 (try again later), one line on stderr."""
    (tmp_path / "blocker").write_text("a file where a directory should be")
    config = _config(tmp_path, maildrop="blocker/maildrop")
    result = _sendmail(config, ["alice"], b"x\n")
    assert result.returncode == 75
    assert len(result.stderr.splitlines()) == 1
    assert b"cannot queue" in result.stderr


def test_exit_0_and_mailq_and_newaliases_by_program_name(tmp_path: Path) -> None:
    """Linked as mailq it lists the queue; as newaliases it checks the aliases: both exit 0."""
    config = _config(tmp_path)
    for name in ("mailq", "newaliases"):
        (tmp_path / name).symlink_to(SENDMAIL)
    mailq = _sendmail(config, [], program=str(tmp_path / "mailq"))
    assert (mailq.returncode, mailq.stdout) == (0, b"Mail queue is empty\n")
    newaliases = _sendmail(config, [], program=str(tmp_path / "newaliases"))
    assert newaliases.returncode == 0
    assert b"no aliases file configured" in newaliases.stdout


def test_the_configuration_is_c_then_relay_config(tmp_path: Path) -> None:
    """-C wins over $RELAY_CONFIG; a $RELAY_CONFIG naming no file is exit 78."""
    config = _config(tmp_path)
    missing = tmp_path / "missing.toml"
    result = _sendmail(missing, ["-C", str(config), "alice"], b"x\n")
    assert result.returncode == 0, result.stderr
    assert len(_dropped(tmp_path)) == 1
    result = _sendmail(missing, ["alice"], b"x\n")
    assert result.returncode == 78
    assert b"file not found" in result.stderr


def test_q_flushes_the_queue(tmp_path: Path) -> None:
    """-q is relay flush: with nothing deferred it flushes nothing, and exits 0."""
    result = _sendmail(_config(tmp_path), ["-q"])
    assert (result.returncode, result.stdout) == (0, b"relay: flushed 0 recipients\n")


def test_relay_sendmail_is_the_same_command(tmp_path: Path) -> None:
    """``relay sendmail ARGS`` takes sendmail's own options, not argparse's."""
    config = _config(tmp_path)
    result = _sendmail(config, ["sendmail", "-t", "-oi"], b"To: bob\n\nx\n", program=RELAY)
    assert result.returncode == 0, result.stderr
    [dropped] = _dropped(tmp_path)
    assert [str(r) for r in dropped.recipients] == ["bob@example.test"]


# --- with the daemon -------------------------------------------------------------------


@pytest.fixture
def daemon_log(tmp_path: Path) -> Path:
    return tmp_path / "twistd.log"


def _start(tmp_path: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "relay", "--config"]
    return subprocess.Popen([*argv, str(config)], cwd=tmp_path)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _wait(predicate: object, proc: subprocess.Popen[bytes], log: Path, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        assert proc.poll() is None, log.read_text() if log.exists() else "twistd exited"
        time.sleep(0.05)
    raise AssertionError(log.read_text() if log.exists() else "nothing logged")


def _delivered(tmp_path: Path, user: str) -> list[bytes]:
    new = tmp_path / "mail" / user / "new"
    return [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        _stop(proc)


def test_mail_submitted_while_the_relay_is_down_is_delivered_when_it_starts(
    tmp_path: Path, daemon_log: Path, running: list[subprocess.Popen[bytes]]
) -> None:
    """sendmail exits 0 with no daemon; the relay, started later, delivers the mail."""
    config = _config(tmp_path)
    result = _sendmail(config, ["-oi", "alice"], b"Subject: while down\n\nhello\n")
    assert result.returncode == 0, result.stderr
    assert len(_dropped(tmp_path)) == 1
    proc = _start(tmp_path, config, daemon_log)
    running.append(proc)
    _wait(lambda: _delivered(tmp_path, "alice"), proc, daemon_log)
    [mail] = _delivered(tmp_path, "alice")
    assert b"Subject: while down" in mail
    assert f"(relay, from userid {os.getuid()})".encode() in mail
    assert os.listdir(tmp_path / "maildrop" / "drop") == []


def test_a_malformed_drop_file_is_quarantined_and_the_relay_goes_on(
    tmp_path: Path, daemon_log: Path, running: list[subprocess.Popen[bytes]]
) -> None:
    """A bad file dropped while the relay runs is quarantined and logged; mail still flows."""
    config = _config(tmp_path)
    proc = _start(tmp_path, config, daemon_log)
    running.append(proc)
    drop_dir = tmp_path / "maildrop" / "drop"
    _wait(drop_dir.is_dir, proc, daemon_log)
    (drop_dir / "evil\x1b]0;owned\x07").write_bytes(b"RELAY-MAILDROP 1\n{\x1b[2J\n")
    quarantine = tmp_path / "maildrop" / "quarantine"
    _wait(lambda: os.listdir(quarantine), proc, daemon_log)
    [kept] = os.listdir(quarantine)
    assert (quarantine / kept).read_bytes() == b"RELAY-MAILDROP 1\n{\x1b[2J\n"
    log = daemon_log.read_text()
    assert "quarantined" in log and "\x1b" not in log and "\\x1b" in log
    assert _sendmail(config, ["bob"], b"Subject: after\n\nstill here\n").returncode == 0
    _wait(lambda: _delivered(tmp_path, "bob"), proc, daemon_log)
    assert proc.poll() is None


# Run as nobody, with one capability left: reading and searching any directory, because
# the interpreter may live where nobody may not look (pyenv under /root).  It gives no
# right to write: the drop directory's own mode (1733) is what lets nobody create a file.
AS_NOBODY = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=-all,+dac_read_search",
    "--ambient-caps=-all,+dac_read_search",
]


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_any_user_can_submit_without_privileges_and_is_traced_by_uid(
    daemon_log: Path, running: list[subprocess.Popen[bytes]]
) -> None:
    """An unprivileged user (nobody) drops mail; the relay's trace names its uid."""
    base = Path(tempfile.mkdtemp(prefix="relay-sendmail-", dir="/tmp"))
    try:
        config = _config(base)
        MaildropLayout(base / "maildrop").prepare()  # as the relay does at its start
        env = {**os.environ, "RELAY_CONFIG": str(config)}
        result = subprocess.run(
            [*AS_NOBODY, SENDMAIL, "-oi", "alice"],
            input=b"Subject: from nobody\n\nhi\n",
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        drop_dir = base / "maildrop" / "drop"
        assert oct(drop_dir.stat().st_mode & 0o7777) == "0o1733"
        [name] = os.listdir(drop_dir)
        assert (drop_dir / name).stat().st_uid == NOBODY
        touch = subprocess.run([*AS_NOBODY, "touch", str(base / "x")], check=False, timeout=60)
        assert touch.returncode != 0  # it really may write nowhere else
        proc = _start(base, config, daemon_log)
        running.append(proc)
        _wait(lambda: _delivered(base, "alice"), proc, daemon_log)
        [mail] = _delivered(base, "alice")
        assert f"(relay, from userid {NOBODY})".encode() in mail
    finally:
        for proc in running:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)

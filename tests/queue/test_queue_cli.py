"""``relay queue`` and ``relay flush``: on a stopped spool directly, and through the daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from relay.cli import exitcodes, queue_commands
from relay.cli.main import main
from relay.envelope import RecipientState, RecipientStatus
from relay.queue.control import listen_control
from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLock
from relay.queue.store import SpoolQueue
from relay.reply import Reply, ReplyCode

from support.queue_helpers import LOCAL_DEST, SMTP_DEST, make_envelope, open_queue

TEXT = b"From: alice@example.test\r\nSubject: hello\x1b[2J\r\n\r\nbody\r\n"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nhostname = "hub.example.test"\nspool = "spool"\n')
    return path


async def _fill(tmp_path: Path) -> tuple[SpoolQueue, list[str]]:
    """A spool with three messages: one deferred on smtp, one pending local, one plain."""
    queue = await open_queue(tmp_path / "spool")
    ids = [
        await queue.store(make_envelope(2, destinations=(SMTP_DEST, LOCAL_DEST)), TEXT),
        await queue.store(make_envelope(1, destinations=(LOCAL_DEST,)), TEXT),
        await queue.store(make_envelope(1, sender=None), b"x"),
    ]
    deferred = RecipientStatus(RecipientState.DEFERRED, 2, 4e9, Reply(ReplyCode.DHST, "refused"))
    await queue.update(ids[0], {0: deferred})
    return queue, ids


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest_twisted.ensureDeferred
async def test_the_queue_lists_and_shows_a_stopped_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no daemon, listing and show read the spool directly and change nothing."""
    queue, ids = await _fill(tmp_path)
    await queue.close()
    config = str(_config(tmp_path))
    before = {p.name: p.read_bytes() for p in (tmp_path / "spool" / "log").iterdir()}
    code, out, _ = _run(capsys, "queue", "-c", config)
    assert code == exitcodes.OK
    assert all(qid in out for qid in ids) and "-- 1 KiB in 3 messages." in out
    assert "deferred  user0@dest.test  smtp:dest.test  attempts 2" in out
    assert "(451 4.4.1 refused)" in out
    code, out, _ = _run(capsys, "queue", "-c", config, "--json")
    listed = json.loads(out)
    assert [m["id"] for m in listed] == ids
    assert listed[0]["recipients"][0]["state"] == "deferred"
    assert listed[2]["sender"] == "<>"
    code, out, _ = _run(capsys, "queue", "show", ids[0], "-c", config)
    assert code == exitcodes.OK
    assert "Subject: hello\\x1b[2J" in out and "body" not in out
    code, out, _ = _run(capsys, "queue", "-c", config, "show", "--json", ids[1])
    assert json.loads(out)["envelope"]["recipients"][0]["channel"] == "local"
    after = {p.name: p.read_bytes() for p in (tmp_path / "spool" / "log").iterdir()}
    assert after == before


@pytest_twisted.ensureDeferred
async def test_hold_release_flush_and_rm_on_a_stopped_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Changes made by the command directly are durable and seen by the next daemon."""
    queue, ids = await _fill(tmp_path)
    await queue.close()
    config = str(_config(tmp_path))
    assert _run(capsys, "queue", "-c", config, "hold", ids[1])[:2] == (
        exitcodes.OK,
        f"{ids[1]}: held 1 recipient\n",
    )
    code, out, _ = _run(capsys, "flush", "-c", config, "--channel", "smtp")
    assert (code, out) == (exitcodes.OK, "relay: flushed 1 recipient\n")
    code, _, err = _run(capsys, "queue", "-c", config, "rm", ids[2], "0660C978C5B4C0")
    assert code == exitcodes.NOINPUT and "no such message: 0660C978C5B4C0" in err
    queue = await open_queue(tmp_path / "spool")
    try:
        assert await queue.list_messages() == ids[:2]
        assert (await queue.load(ids[1]))[1][0].state is RecipientState.HELD
        assert (await queue.load(ids[0]))[1][0].state is RecipientState.PENDING
    finally:
        await queue.close()
    assert _run(capsys, "queue", "-c", config, "release", ids[1])[1] == (
        f"{ids[1]}: released 1 recipient\n"
    )


def test_a_spool_that_does_not_exist_is_an_empty_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listing a spool never created says so and creates nothing."""
    config = str(_config(tmp_path))
    assert _run(capsys, "queue", "-c", config) == (exitcodes.OK, "Mail queue is empty\n", "")
    assert _run(capsys, "queue", "-c", config, "rm", "0660C978C5B4C0")[0] == exitcodes.NOINPUT
    assert not (tmp_path / "spool").exists()


def test_a_malformed_id_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anything that is not a queue id is refused before the spool is touched."""
    code, _, err = _run(capsys, "queue", "-c", str(_config(tmp_path)), "rm", "../etc")
    assert code == exitcodes.USAGE and "not a queue id" in err


@pytest_twisted.ensureDeferred
async def test_with_a_daemon_the_command_goes_through_its_control_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the daemon holds the lock, the command asks it, and the daemon's state changes."""
    queue, ids = await _fill(tmp_path)
    port = await listen_control(queue, reactor)  # type: ignore[arg-type]
    config = str(_config(tmp_path))
    woken: list[None] = []
    queue.add_listener(lambda: woken.append(None))
    try:
        code, out, _ = await deferToThread(_run, capsys, "queue", "-c", config, "--json")
        assert code == exitcodes.OK and [m["id"] for m in json.loads(out)] == ids
        code, out, _ = await deferToThread(_run, capsys, "queue", "-c", config, "show", ids[0])
        assert "Subject: hello" in out
        code, out, _ = await deferToThread(_run, capsys, "queue", "-c", config, "hold", *ids)
        assert code == exitcodes.OK and out.count("held") == 3
        assert queue.next_due_time() is None and list(await queue.due(1e12)) == []
        code, out, _ = await deferToThread(_run, capsys, "queue", "-c", config, "release", ids[1])
        assert (ids[1], 0) in list(await queue.due(1e12))
        code, out, _ = await deferToThread(_run, capsys, "queue", "-c", config, "rm", ids[2])
        assert out == f"{ids[2]}: removed\n"
        assert await queue.list_messages() == ids[:2]
        code, out, err = await deferToThread(_run, capsys, "flush", "-c", config, "FFFFFFFFFFFFFF")
        assert code == exitcodes.NOINPUT and "no such message" in err
        assert woken  # the release made mail due: listeners (the deliverer) were woken
    finally:
        await port.stopListening()
        await queue.close()
    assert not SpoolLayout(tmp_path / "spool").control_path.exists()


def test_a_locked_spool_without_a_daemon_answering_is_a_temporary_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the lock is held but nobody answers the socket, the command gives up with 75."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.make_dirs()
    monkeypatch.setattr(queue_commands, "DAEMON_WAIT", 0.3)
    with SpoolLock(layout.lock_path):
        code, _, err = _run(capsys, "queue", "-c", str(_config(tmp_path)))
    assert code == exitcodes.TEMPFAIL and "in use" in err

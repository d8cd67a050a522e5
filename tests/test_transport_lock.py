"""UUCP device locks: LCK..name with the owner's pid, stale ones removed, live ones refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.transport import lock as lock_module
from relay.transport.lock import DeviceLock, DeviceLocked, DeviceLockError, lock_name

LOCK_MODULE = Path(lock_module.__file__)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_holds_our_pid_in_hdb_format(tmp_path: Path) -> None:
    """LCK..ttyS0 holds the pid as ten right-aligned characters and a newline."""
    lock = DeviceLock("/dev/ttyS0", tmp_path)
    lock.acquire()
    assert lock.path == tmp_path / "LCK..ttyS0"
    assert lock.path.read_bytes() == f"{os.getpid():10d}\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["LCK..ttyS0"]  # no temporary left
    lock.release()
    assert not lock.path.exists()


def test_a_symlink_shares_the_lock_of_its_device(tmp_path: Path) -> None:
    """Two names of one port give one lock name; a pty below /dev keeps its sub-path."""
    master, slave = os.openpty()
    try:
        device = os.ttyname(slave)
        link = tmp_path / "modem"
        link.symlink_to(device)
        assert lock_name(str(link)) == lock_name(device)
        assert lock_name(device) == "LCK.." + device.removeprefix("/dev/").replace("/", "_")
    finally:
        os.close(master)
        os.close(slave)


def test_a_live_owner_refuses_with_a_clear_message(tmp_path: Path) -> None:
    """A lock held by a live process is refused, naming the device, the pid and the file."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "LCK..ttyS0").write_text(f"{owner.pid:10d}\n")
        with pytest.raises(DeviceLocked) as caught:
            DeviceLock("/dev/ttyS0", tmp_path).acquire()
        message = str(caught.value)
        assert "/dev/ttyS0" in message and str(owner.pid) in message and "LCK..ttyS0" in message
        assert caught.value.pid == owner.pid
        assert (tmp_path / "LCK..ttyS0").read_text() == f"{owner.pid:10d}\n"
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    """A lock whose pid is dead is taken over (ASCII and the old binary format alike)."""
    for content in (f"{_dead_pid():10d}\n".encode(), _dead_pid().to_bytes(4, "little")):
        (tmp_path / "LCK..ttyS0").write_bytes(content)
        lock = DeviceLock("/dev/ttyS0", tmp_path)
        lock.acquire()
        assert lock.path.read_bytes() == f"{os.getpid():10d}\n".encode()
        lock.release()


def test_a_garbled_lock_is_not_taken_over(tmp_path: Path) -> None:
    """A lock file that names no pid may be another program's half-made lock: refused."""
    (tmp_path / "LCK..ttyS0").write_bytes(b"garbage here")
    with pytest.raises(DeviceLocked, match="unreadable lock"):
        DeviceLock("/dev/ttyS0", tmp_path).acquire()


def test_release_leaves_another_programs_lock_alone(tmp_path: Path) -> None:
    """If the file no longer holds our pid (removed and retaken), release does not touch it."""
    lock = DeviceLock("/dev/ttyS0", tmp_path)
    lock.acquire()
    lock.path.write_text(f"{1:10d}\n")
    lock.release()
    assert lock.path.read_text() == f"{1:10d}\n"


def test_two_locks_on_one_device_exclude_each_other(tmp_path: Path) -> None:
    """Within one process too: the second acquire sees our own live pid and refuses."""
    first = DeviceLock("/dev/ttyS0", tmp_path)
    first.acquire()
    with pytest.raises(DeviceLocked):
        DeviceLock("/dev/ttyS0", tmp_path).acquire()
    first.release()
    second = DeviceLock("/dev/ttyS0", tmp_path)
    second.acquire()
    second.release()


def test_creation_is_atomic_between_racing_processes(tmp_path: Path) -> None:
    """Many processes racing for one stale lock: exactly one wins each round."""
    script = (  # the lock module alone, not the package (no Twisted to import)
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('lock', {str(LOCK_MODULE)!r})\n"
        "lock_module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(lock_module)\n"
        "lock = lock_module.DeviceLock('/dev/ttyS9', sys.argv[1])\n"
        "try:\n    lock.acquire()\nexcept lock_module.DeviceLockError:\n    print('lost')\n"
        "else:\n    print('won')\n"
        "sys.stdout.flush(); sys.stdin.read()  # hold the lock until told to go\n"
    )
    for _ in range(2):
        (tmp_path / "LCK..ttyS9").write_text(f"{_dead_pid():10d}\n")
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(tmp_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(5)
        ]
        results = [r.stdout.readline().strip() for r in racers]  # type: ignore[union-attr]
        for racer in racers:
            racer.communicate(timeout=30)
        assert results.count("won") == 1, results
        (tmp_path / "LCK..ttyS9").unlink()


def test_an_unwritable_lock_directory_is_a_clear_error(tmp_path: Path) -> None:
    """No lock directory: an error naming it (the port is not opened unlocked)."""
    with pytest.raises(DeviceLockError, match="cannot create a lock in"):
        DeviceLock("/dev/ttyS0", tmp_path / "missing").acquire()

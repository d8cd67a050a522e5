"""``relay passwd``: set, change and delete AUTH users; the gateway can read the result."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from relay.cli import exitcodes
from relay.cli.main import main
from relay.gateway.auth import parse_users, verify_password


def _passwd(monkeypatch: pytest.MonkeyPatch, password: str, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    return main(["passwd", *argv])


def test_set_creates_a_private_file_the_gateway_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's line verifies the password given on stdin; the file is mode 0600."""
    users = tmp_path / "users"
    assert _passwd(monkeypatch, "s3cret", "alice", "-f", str(users)) == exitcodes.OK
    encoded = parse_users(users.read_text())["alice"]
    assert verify_password("s3cret", encoded)
    assert not verify_password("wrong", encoded)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def test_change_keeps_other_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing one user's password keeps other users and comments as they were."""
    users = tmp_path / "users"
    assert _passwd(monkeypatch, "one", "alice", "-f", str(users)) == exitcodes.OK
    assert _passwd(monkeypatch, "two", "bob", "-f", str(users)) == exitcodes.OK
    users.write_text("# staff\n" + users.read_text())
    bob_line = next(line for line in users.read_text().splitlines() if line.startswith("bob:"))
    assert _passwd(monkeypatch, "three", "alice", "-f", str(users)) == exitcodes.OK
    lines = users.read_text().splitlines()
    assert lines[0] == "# staff"
    assert bob_line in lines
    assert verify_password("three", parse_users(users.read_text())["alice"])
    assert len([line for line in lines if line.startswith("alice:")]) == 1


def test_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--delete removes the user; deleting an unknown user exits EX_NOUSER."""
    users = tmp_path / "users"
    assert _passwd(monkeypatch, "x", "alice", "-f", str(users)) == exitcodes.OK
    assert main(["passwd", "--delete", "alice", "-f", str(users)]) == exitcodes.OK
    assert parse_users(users.read_text()) == {}
    assert main(["passwd", "--delete", "alice", "-f", str(users)]) == exitcodes.NOUSER


@pytest.mark.parametrize("user", ["", "a:b", "a b", "a\nb"])
def test_bad_user_names_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    """A user name the users file cannot hold is refused and nothing is written."""
    users = tmp_path / "users"
    code = _passwd(monkeypatch, "x", user, "-f", str(users))
    assert code in (exitcodes.USAGE, exitcodes.DATAERR)
    assert not users.exists()


def test_empty_password_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty password is refused (EX_DATAERR) and nothing is written."""
    users = tmp_path / "users"
    assert _passwd(monkeypatch, "", "alice", "-f", str(users)) == exitcodes.DATAERR
    assert not users.exists()


def test_without_a_users_file_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no -f and no [smtp] auth_users_file, passwd exits EX_CONFIG."""
    assert _passwd(monkeypatch, "x", "alice") == exitcodes.CONFIG

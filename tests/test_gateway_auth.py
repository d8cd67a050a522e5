"""AUTH credentials: the users file format, scrypt hashing, and checking off the reactor."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from relay.gateway import auth
from relay.gateway.auth import (
    AuthUnavailable,
    PasswordChecker,
    ScryptParams,
    UsersFileError,
    hash_password,
    make_user_line,
    parse_users,
    verify_password,
)

FAST = ScryptParams(log_n=4, r=8, p=1)


def test_rfc7914_test_vector_verifies() -> None:
    """The stored form is plain scrypt: RFC 7914's vector (N=1024, r=8, p=16) checks out."""
    import base64

    salt = base64.b64encode(b"NaCl").decode().rstrip("=")
    digest = bytes.fromhex(
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640"
    )
    encoded = f"$scrypt$ln=10,r=8,p=16${salt}${base64.b64encode(digest).decode().rstrip('=')}"
    assert verify_password("password", encoded)
    assert not verify_password("Password", encoded)


@settings(max_examples=20, deadline=None)
@given(st.text(max_size=30))
def test_hash_then_verify(password: str) -> None:
    """Any password verifies against its own hash, and a different one does not."""
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return
    encoded = hash_password(password, FAST)
    assert encoded.startswith("$scrypt$ln=4,r=8,p=1$")
    assert verify_password(password, encoded)
    assert not verify_password(password + "x", encoded)


def test_salts_differ() -> None:
    """Two hashes of one password differ (a fresh salt each time)."""
    assert hash_password("pw", FAST) != hash_password("pw", FAST)


def test_make_user_line_round_trips_through_parse_users() -> None:
    """A line made for a user parses back to that user and verifies its password."""
    line = make_user_line("carol@example.test", "s3cret", FAST)
    users = parse_users(f"# comment\n\n{line}\n")
    assert list(users) == ["carol@example.test"]
    assert verify_password("s3cret", users["carol@example.test"])


@pytest.mark.parametrize("user", ["", "a b", "a:b", "x" * 256, "tab\tuser"])
def test_make_user_line_refuses_bad_names(user: str) -> None:
    """A user name with whitespace or ':' (or none) cannot be written."""
    with pytest.raises(ValueError):
        make_user_line(user, "pw", FAST)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("carol\n", 1),
        ("\ncarol:plain-password\n", 2),
        ("carol:$scrypt$ln=99,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n", 1),
        ("carol:$scrypt$ln=4,r=8,p=1$!!!!!!!!$aGFzaGhhc2hoYXNoaGFzaA\n", 1),
    ],
)
def test_parse_users_names_the_bad_line(text: str, line: int) -> None:
    """A malformed line, or parameters out of bounds, raise UsersFileError with the line."""
    with pytest.raises(UsersFileError, match=f"line {line}"):
        parse_users(text)


def test_parse_users_refuses_duplicates() -> None:
    """The same user twice is an error (which one would count?)."""
    line = make_user_line("carol", "pw", FAST)
    with pytest.raises(UsersFileError, match="twice"):
        parse_users(f"{line}\n{line}\n")


def test_scrypt_parameters_are_bounded() -> None:
    """Parameters needing over 1 GiB (a hostile or broken file) are refused."""
    with pytest.raises(UsersFileError):
        ScryptParams(log_n=20, r=16, p=1)
    assert ScryptParams(log_n=15, r=8, p=1).memory == 32 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_checker_runs_in_a_thread_and_rereads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashes run off the reactor thread; right/wrong/unknown answer; edits take effect."""
    users = tmp_path / "users"
    users.write_text(make_user_line("carol", "one", FAST) + "\n")
    hashed_in: list[threading.Thread] = []

    def recording_verify(password: str, encoded: str) -> bool:
        hashed_in.append(threading.current_thread())
        return verify_password(password, encoded)

    monkeypatch.setattr(auth, "verify_password", recording_verify)
    checker = PasswordChecker(users, reactor)  # type: ignore[arg-type]
    try:
        assert await checker.check("carol", "one") is True
        assert await checker.check("carol", "two") is False
        assert await checker.check("dave", "one") is False  # still hashes (timing)
        users.write_text(make_user_line("carol", "two", FAST) + "\n")
        assert await checker.check("carol", "two") is True
    finally:
        checker.stop()
    assert len(hashed_in) == 4
    assert threading.main_thread() not in hashed_in


@pytest_twisted.ensureDeferred
async def test_checker_is_unavailable_when_the_file_is_broken(tmp_path: Path) -> None:
    """A malformed, missing or undecodable users file fails the check with AuthUnavailable."""
    users = tmp_path / "users"
    users.write_text("garbage line\n")
    checker = PasswordChecker(users, reactor)  # type: ignore[arg-type]
    try:
        with pytest.raises(AuthUnavailable, match="line 1"):
            await checker.check("carol", "one")
        users.unlink()
        with pytest.raises(AuthUnavailable, match="No such file"):
            await checker.check("carol", "one")
        users.write_bytes(b"carol:\xff\xfe\n")
        with pytest.raises(AuthUnavailable):
            await checker.check("carol", "one")
        users.write_text(make_user_line("carol", "one", FAST) + "\n")
        assert await checker.check("carol", "one") is True  # repaired: works again
    finally:
        checker.stop()

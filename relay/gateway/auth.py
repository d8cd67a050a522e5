"""SMTP AUTH credentials: the ``auth_users_file`` format, hashing, and checking off-thread.

The file has one ``user:$scrypt$ln=15,r=8,p=1$SALT$HASH`` line per user (``#`` comments
and blank lines allowed), SALT and HASH in unpadded base64.  scrypt (RFC 7914, in
:func:`hashlib.scrypt`) is memory-hard, so a stolen file is expensive to attack; the
parameters live in each line, so they can be raised later without breaking old lines.
:func:`make_user_line` writes such a line (for ``relay passwd``).

scrypt is deliberately slow (tens of milliseconds and tens of MiB per check), so
:class:`PasswordChecker` never runs it in the reactor thread: it reads the file and
verifies in a small thread pool of its own.  Reading the file on each attempt means a
``relay passwd`` takes effect without a restart.  An unknown user costs the same hash as
a known one, so timing does not tell which user names exist.

A users file that cannot be read or parsed is our fault, not the client's: the check
fails with :class:`AuthUnavailable` (the gateway answers ``454 4.7.0``, a temporary
failure, so a good client retries instead of being told its password is wrong and
counted as a guesser).  It still fails closed: nobody is authenticated meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = [
    "AuthUnavailable",
    "PasswordChecker",
    "ScryptParams",
    "UsersFileError",
    "hash_password",
    "make_user_line",
    "parse_users",
    "verify_password",
]

_log = Logger()

_LINE: Final = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,2})\$([A-Za-z0-9+/]{6,88})\$([A-Za-z0-9+/]{16,172})"
)
_USER: Final = re.compile(r"[^\s:]{1,255}")


class UsersFileError(ValueError):
    """A users file (or a hash in it) that cannot be read; says which line."""


class AuthUnavailable(Exception):
    """Credentials cannot be checked now (the users file is unreadable or malformed)."""


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost: N = 2**log_n, block size r, parallelism p (RFC 7914).

    The bounds refuse parameters that would make one check take gigabytes or minutes
    (a damaged or hostile file must not be a way to exhaust the host).
    """

    log_n: int = 15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.log_n <= 20 and 1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise UsersFileError(f"scrypt parameters out of range: {self}")
        if self.memory > 1 << 30:
            raise UsersFileError("scrypt parameters need more than 1 GiB")

    @property
    def memory(self) -> int:
        """Bytes scrypt needs with these parameters."""
        return 128 * self.r * (1 << self.log_n) * self.p


DEFAULT_PARAMS: Final = ScryptParams()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, params: ScryptParams, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=1 << params.log_n,
        r=params.r,
        p=params.p,
        maxmem=params.memory + (1 << 20),
        dklen=length,
    )


def hash_password(
    password: str, params: ScryptParams = DEFAULT_PARAMS, *, salt: bytes | None = None
) -> str:
    """The ``$scrypt$...`` string for ``password`` (a fresh 16-byte salt unless given)."""
    salt = os.urandom(16) if salt is None else salt
    digest = _scrypt(password, salt, params, 32)
    return f"$scrypt$ln={params.log_n},r={params.r},p={params.p}${_b64(salt)}${_b64(digest)}"


def valid_user_name(user: str) -> bool:
    """Whether ``user`` can stand in a users file (1-255 characters, no whitespace or ':')."""
    return _USER.fullmatch(user) is not None


def make_user_line(user: str, password: str, params: ScryptParams = DEFAULT_PARAMS) -> str:
    """One line of an ``auth_users_file`` (without newline) for ``user`` and ``password``."""
    if not valid_user_name(user):
        raise ValueError("a user name is 1-255 characters without whitespace or ':'")
    return f"{user}:{hash_password(password, params)}"


def _decode(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    match = _LINE.fullmatch(encoded)
    if match is None:
        raise UsersFileError("not a $scrypt$ln=N,r=R,p=P$SALT$HASH string")
    params = ScryptParams(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    try:
        return params, _unb64(match.group(4)), _unb64(match.group(5))
    except (binascii.Error, ValueError):
        raise UsersFileError("bad base64 in salt or hash") from None


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded``; compares in constant time."""
    params, salt, expected = _decode(encoded)
    return hmac.compare_digest(_scrypt(password, salt, params, len(expected)), expected)


def parse_users(text: str) -> dict[str, str]:
    """``{user: encoded hash}`` from a users file's text; UsersFileError names the line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not _USER.fullmatch(user):
            raise UsersFileError(f"line {number}: expected user:$scrypt$...")
        try:
            _decode(encoded)
        except UsersFileError as e:
            raise UsersFileError(f"line {number}: {e}") from None
        if user in users:
            raise UsersFileError(f"line {number}: user {user!r} appears twice")
        users[user] = encoded
    return users


_DUMMY_HASH: Final = (
    f"$scrypt$ln={DEFAULT_PARAMS.log_n},r=8,p=1${_b64(b'relay-dummy-salt')}${_b64(bytes(32))}"
)


class PasswordChecker:
    """Checks SMTP AUTH credentials against ``users_file`` in a thread pool of its own."""

    def __init__(self, users_file: Path, reactor: IReactorFromThreads, *, threads: int = 2) -> None:
        self._path = Path(users_file)
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="smtp-auth")
        self._started = False

    def start(self) -> None:
        """Start the thread pool (the gateway service does, at start)."""
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        """Stop the thread pool (waits for checks in progress)."""
        if self._started:
            self._pool.stop()
            self._started = False

    def check(self, username: str, password: str) -> Deferred[bool]:
        """Fire with whether the credentials are valid.

        Fails with :class:`AuthUnavailable` (logged here) when they cannot be checked.
        """
        self.start()
        d: Deferred[bool] = deferToThreadPool(
            self._reactor, self._pool, _check_in_thread, self._path, username, password
        )

        def failed(failure: Failure) -> bool:
            _log.failure("smtp auth: cannot check credentials", failure)
            raise AuthUnavailable(f"{self._path}: {failure.getErrorMessage()}")

        return d.addErrback(failed)


def _check_in_thread(path: Path, username: str, password: str) -> bool:
    """Read the users file and verify; an unknown user still costs one hash."""
    users: Mapping[str, str] = parse_users(path.read_text(encoding="utf-8"))
    encoded = users.get(username)
    if encoded is None:
        verify_password(password, _DUMMY_HASH)
        return False
    return verify_password(password, encoded)

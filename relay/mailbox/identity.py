"""Doing file work as another user, from one thread, without touching the others.

Why this way.  A root relay must write a system user's mailbox *as that user*: with the
user's permissions (so a symlink or hard link the user planted cannot make root write
somewhere the user could not) and leaving files the user owns (so quotas and the
user's mail reader work).  The classic ways are a forked helper per delivery (a process
start per message: far too slow) or ``seteuid`` in a single-threaded agent (in a threaded
process glibc applies ``setuid`` calls to *every* thread, the reactor's included).

Linux keeps a *file-system* user and group id per thread, used for every permission
check and for the owner of new files, and ``setfsuid``/``setfsgid`` change only the
calling thread's (glibc does not broadcast them).  Changing the file-system uid away
from 0 also drops the thread's file capabilities (``CAP_DAC_OVERRIDE``…), so the thread
really is the user for file work, and changing it back restores them.  The local
channel's pool threads do each piece of file work inside :func:`acting_as`.

Supplementary groups are not changed (that call *is* broadcast): the work runs with
the user's uid and primary group only.  Off Linux, or when the relay is not root,
:func:`acting_as` does nothing and files are written as the relay's own user.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pwd
import sys
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Identity", "IdentityError", "acting_as", "can_switch", "identity_of_owner"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A user to act as: numeric ids, plus name and home for a command's environment."""

    uid: int
    gid: int
    name: str
    home: str = "/"


class IdentityError(OSError):
    """The thread could not take on (or give back) a file-system identity."""


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def can_switch() -> bool:
    """Whether :func:`acting_as` really changes identity here (Linux, running as root)."""
    return _LIBC is not None and os.geteuid() == 0


def _set_fs_ids(uid: int, gid: int) -> None:
    """Set this thread's fs gid then uid, and check both took (the calls never fail loudly)."""
    assert _LIBC is not None
    _LIBC.setfsgid(gid)
    _LIBC.setfsuid(uid)
    # Called with an invalid id (-1) they change nothing and return the current value.
    if _LIBC.setfsuid(-1) != uid or _LIBC.setfsgid(-1) != gid:
        raise IdentityError(f"cannot act as uid {uid} gid {gid}")


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Run the body with this thread's file-system identity set to ``identity``.

    A no-op for None, for the relay's own identity, or where :func:`can_switch` is false.
    """
    if identity is None or not can_switch():
        yield
        return
    uid, gid = os.geteuid(), os.getegid()
    if identity.uid == uid and identity.gid == gid:
        yield
        return
    try:
        _set_fs_ids(identity.uid, identity.gid)
    except IdentityError:
        _set_fs_ids(uid, gid)  # never leave the pool thread half switched
        raise
    try:
        yield
    finally:
        _set_fs_ids(uid, gid)


def identity_of_owner(path: os.PathLike[str] | str, *, fallback: str = "nobody") -> Identity:
    """Who runs commands and writes files named in a file: its owner, never root.

    Postfix's rule for aliases: the owner of the file if that is not root, otherwise
    the unprivileged ``fallback`` account (``nobody``, uid 65534 if it has no entry).
    """
    owner = os.stat(path).st_uid
    if owner != 0:
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:
            return Identity(owner, os.stat(path).st_gid, str(owner))
        return Identity(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir or "/")
    try:
        entry = pwd.getpwnam(fallback)
    except KeyError:
        return Identity(65534, 65534, fallback)
    return Identity(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir or "/")

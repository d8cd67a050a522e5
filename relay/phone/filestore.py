"""A durable, file-backed phone store: for the tests, the benchmark and small sites.

Layout, one directory per site (site names and message ids are safe as file names, the
engine checks them)::

    ROOT/SITE/out/ID.env   ID.text      mail held for SITE (the envelope as JSON)
    ROOT/SITE/in/partial/ID             text of a message from SITE still arriving
    ROOT/SITE/in/mail/ID.text  ID.env   messages from SITE, committed

A message from a site is committed by fsyncing its text, renaming it into ``in/mail``,
writing its envelope to a temporary file, fsyncing it and renaming it to ``ID.env``: the
envelope's name is the commit point, and its existence is the durable "already have it"
for that id (kept as long as the message is).  This store refuses no recipient, so the
committed envelope also names every recipient the first answer accepted: a re-proposal
(its final reply lost with the line) is answered per recipient from it.  The text of a
cut-off message stays in ``in/partial``; its size, after an fsync, is the offset the next
call resumes from, and the digest check at commit catches anything a crash left behind.

Ids are remembered "long enough to outlive any resend", not for ever:
:meth:`FilePhoneStore.forget` drops the envelopes of messages committed before a time
whose text has been taken (a committed text still there is mail not yet handed on, and
is kept), and partial texts untouched since then (a message the sender gave up on).  The
owner calls it periodically with a time older than any resend can be (the relay: twice
its ``give_up_after``).

Every file operation runs in a thread off the reactor (fsync is not cheap), one batch at
a time in the order asked: the operations that arrived while a batch ran form the next
batch, and a directory touched by several commits of a batch is fsynced once for all of
them.  Partial text is written without fsync; it is synced when asked for its size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope
from relay.errors import DigestMismatch
from relay.fileio import fsync_directory, write_all
from relay.interfaces import IPhoneStore
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.session import Acceptance, Outgoing, held_acceptance

__all__ = ["FilePhoneStore", "still_to_do"]

_AOK = Reply(ReplyCode.AOK)
_READ_BLOCK = 1 << 16


def still_to_do(envelope: Envelope, replies: Sequence[Reply]) -> Envelope | None:
    """The envelope of the recipients a reply left queued (temporary failures), or None
    when every recipient is done (delivered or failed for good)."""
    left = tuple(
        r for r, reply in zip(envelope.recipients, replies, strict=True) if reply.code.is_temporary
    )
    return envelope.with_recipients(left) if left else None


class _Batch:
    """The directories a batch must fsync once its operations are done, and the steps
    that may only run after that (a commit's second rename)."""

    def __init__(self) -> None:
        self.dirs: set[Path] = set()
        self.after_sync: list[Callable[[], None]] = []

    def sync(self) -> None:
        for path in sorted(self.dirs):
            fsync_directory(path)
        self.dirs.clear()


class _Lane:
    """Runs file operations in a thread, in order, a batch at a time."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._running = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((fn, args, d))
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._queue = self._queue, []
        self._running = True

        def work() -> list[tuple[bool, Any]]:
            state = _Batch()
            results: list[tuple[bool, Any]] = []
            for fn, args, _ in batch:
                try:
                    results.append((True, fn(state, *args)))
                except Exception:
                    results.append((False, Failure()))  # type: ignore[no-untyped-call]
            try:
                state.sync()
                for step in state.after_sync:
                    step()
                state.sync()
            except OSError:
                failure = Failure()  # type: ignore[no-untyped-call]
                results = [(False, failure)] * len(batch)
            return results

        def done(results: list[tuple[bool, Any]] | Failure) -> None:
            self._running = False
            if self._queue:
                self._start()
            for index, (_, _, d) in enumerate(batch):
                if isinstance(results, Failure):
                    d.errback(results)
                else:
                    ok, value = results[index]
                    d.callback(value) if ok else d.errback(value)

        pool = self._reactor.getThreadPool()
        deferToThreadPool(self._reactor, pool, work).addBoth(done)


@implementer(IPhoneStore)
class FilePhoneStore:
    """An :class:`~relay.interfaces.IPhoneStore` in a directory tree (see the module)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        reactor: Any = None,
        *,
        max_message_size: int | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.root = Path(root)
        self._max_size = max_message_size
        self._lane = _Lane(reactor)

    # --- paths -----------------------------------------------------------------------------

    def _out(self, site: str) -> Path:
        return self.root / site / "out"

    def _partial(self, site: str) -> Path:
        return self.root / site / "in" / "partial"

    def _mail(self, site: str) -> Path:
        return self.root / site / "in" / "mail"

    # --- for senders (tests, the benchmark, tools) -----------------------------------------

    def put_outgoing(
        self, site: str, message_id: str, envelope: Envelope, text: bytes
    ) -> Deferred[None]:
        """Queue a message for ``site`` durably (text first, the envelope commits it)."""
        result: Deferred[None] = self._lane.run(
            _put_outgoing, self._out(site), message_id, envelope, text
        )
        return result

    def received(self, site: str) -> dict[str, tuple[Envelope, bytes]]:
        """Every message committed from ``site`` (blocking: for tests and tools only)."""
        out: dict[str, tuple[Envelope, bytes]] = {}
        mail = self._mail(site)
        if not mail.is_dir():
            return out
        for env_path in sorted(mail.glob("*.env")):
            message_id = env_path.name[: -len(".env")]
            envelope = Envelope.from_dict(json.loads(env_path.read_bytes()))
            out[message_id] = (envelope, (mail / f"{message_id}.text").read_bytes())
        return out

    def pending(self, site: str) -> list[str]:
        """Ids still held for ``site`` (blocking: for tests and tools only)."""
        out_dir = self._out(site)
        if not out_dir.is_dir():
            return []
        return sorted(p.name[: -len(".env")] for p in out_dir.glob("*.env"))

    # --- IPhoneStore -----------------------------------------------------------------------

    def outgoing(self, site: str) -> Deferred[Sequence[Outgoing]]:
        result: Deferred[Sequence[Outgoing]] = self._lane.run(_outgoing, self._out(site))
        return result

    def read_text(self, site: str, message_id: str, offset: int, max_bytes: int) -> Deferred[bytes]:
        path = self._out(site) / f"{message_id}.text"
        result: Deferred[bytes] = self._lane.run(_read_at, path, offset, max_bytes)
        return result

    def settle(self, site: str, message_id: str, replies: Sequence[Reply]) -> Deferred[None]:
        result: Deferred[None] = self._lane.run(
            _settle, self._out(site), message_id, tuple(replies)
        )
        return result

    def accept(
        self, site: str, message_id: str, envelope: Envelope, size: int
    ) -> Deferred[Acceptance]:
        if self._max_size is not None and size > self._max_size:
            limit = Reply(ReplyCode.FSIZ, f"over the limit of {self._max_size} bytes")
            return _fired(Acceptance(whole=limit))
        result: Deferred[Acceptance] = self._lane.run(
            _accept, self._mail(site), self._partial(site), message_id, envelope, size
        )
        return result

    def write_text(self, site: str, message_id: str, offset: int, data: bytes) -> Deferred[None]:
        result: Deferred[None] = self._lane.run(
            _write_at, self._partial(site), message_id, offset, data
        )
        return result

    # --- forgetting ---------------------------------------------------------------------

    def forget(self, before: float) -> Deferred[int]:
        """Forget the ids committed before ``before`` (seconds since the epoch) whose text
        has been taken, and drop partial texts untouched since; fire with how many ids."""
        result: Deferred[int] = self._lane.run(_forget, self.root, before)
        return result

    def commit(
        self, site: str, message_id: str, envelope: Envelope, size: int, digest: bytes
    ) -> Deferred[str]:
        result: Deferred[str] = self._lane.run(
            _commit, self._mail(site), self._partial(site), message_id, envelope, size, digest
        )
        result.addCallback(lambda _: f"{site}/{message_id}")
        return result


def _fired(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


# --- the operations, run in the lane's thread ---------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_outgoing(
    batch: _Batch, out_dir: Path, message_id: str, envelope: Envelope, text: bytes
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(out_dir / f"{message_id}.text", text)
    tmp = out_dir / f"{message_id}.env.tmp"
    _write_file(tmp, json.dumps(envelope.to_dict()).encode())
    os.rename(tmp, out_dir / f"{message_id}.env")
    batch.dirs.add(out_dir)


def _digest(path: Path) -> tuple[int, bytes]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.digest()


def _outgoing(batch: _Batch, out_dir: Path) -> list[Outgoing]:
    if not out_dir.is_dir():
        return []
    found: list[tuple[float, Outgoing]] = []
    for env_path in out_dir.glob("*.env"):
        message_id = env_path.name[: -len(".env")]
        envelope = Envelope.from_dict(json.loads(env_path.read_bytes()))
        size, digest = _digest(out_dir / f"{message_id}.text")
        found.append((envelope.arrival, Outgoing(message_id, envelope, size, digest)))
    found.sort(key=lambda pair: (pair[0], pair[1].message_id))
    return [message for _, message in found]


def _read_at(batch: _Batch, path: Path, offset: int, max_bytes: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(max_bytes)


def _settle(batch: _Batch, out_dir: Path, message_id: str, replies: tuple[Reply, ...]) -> None:
    env_path = out_dir / f"{message_id}.env"
    envelope = Envelope.from_dict(json.loads(env_path.read_bytes()))
    left = still_to_do(envelope, replies)
    if left is None:
        os.unlink(env_path)  # the envelope first: without it the text is no message
        os.unlink(out_dir / f"{message_id}.text")
    else:
        tmp = out_dir / f"{message_id}.env.tmp"
        _write_file(tmp, json.dumps(left.to_dict()).encode())
        os.rename(tmp, env_path)
    batch.dirs.add(out_dir)


def _accept(
    batch: _Batch, mail: Path, partial: Path, message_id: str, envelope: Envelope, size: int
) -> Acceptance:
    env_path = mail / f"{message_id}.env"
    if env_path.exists():
        # this store accepts every recipient, so the committed envelope is the whole of
        # the first answer: each of its recipients was answered AOK
        held = Envelope.from_dict(json.loads(env_path.read_bytes()))
        return held_acceptance(envelope, {r.address.smtp_path(): _AOK for r in held.recipients})
    offset = 0
    path = partial / message_id
    if path.exists():
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # what we name as held must be on disk
            offset = os.fstat(fd).st_size
            if offset > size:
                os.ftruncate(fd, 0)
                offset = 0
        finally:
            os.close(fd)
    return Acceptance(replies=(_AOK,) * len(envelope.recipients), offset=offset)


def _write_at(batch: _Batch, partial: Path, message_id: str, offset: int, data: bytes) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial / message_id, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if offset == 0 or os.fstat(fd).st_size != offset:
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        write_all(fd, data)
    finally:
        os.close(fd)


def _commit(
    batch: _Batch,
    mail: Path,
    partial: Path,
    message_id: str,
    envelope: Envelope,
    size: int,
    digest: bytes,
) -> None:
    env_path = mail / f"{message_id}.env"
    if env_path.exists():
        return  # committed already (the same id proposed again in one call)
    text_path = partial / message_id
    if not text_path.exists() and size == 0:
        partial.mkdir(parents=True, exist_ok=True)
        text_path.touch()
    held, held_digest = _digest(text_path)
    if held != size or held_digest != digest:
        os.unlink(text_path)
        raise DigestMismatch(f"{message_id}: {held} bytes held, {size} announced, or hash differs")
    fd = os.open(text_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    mail.mkdir(parents=True, exist_ok=True)
    os.rename(text_path, mail / f"{message_id}.text")
    tmp = mail / f"{message_id}.env.tmp"
    _write_file(tmp, json.dumps(envelope.to_dict()).encode())
    batch.dirs.update((mail, partial))

    # the text's new name is durable (the batch's directory sync) before the envelope's
    # name commits the message
    def commit_point() -> None:
        os.rename(tmp, env_path)
        batch.dirs.add(mail)

    batch.after_sync.append(commit_point)


def _older(path: Path, before: float) -> bool:
    try:
        return path.stat().st_mtime < before
    except FileNotFoundError:
        return False


def _forget(batch: _Batch, root: Path, before: float) -> int:
    if not root.is_dir():
        return 0
    forgotten = 0
    for site_dir in root.iterdir():
        mail = site_dir / "in" / "mail"
        if mail.is_dir():
            for env_path in mail.glob("*.env"):
                message_id = env_path.name[: -len(".env")]
                if (mail / f"{message_id}.text").exists() or not _older(env_path, before):
                    continue
                env_path.unlink(missing_ok=True)
                batch.dirs.add(mail)
                forgotten += 1
        partial = site_dir / "in" / "partial"
        if partial.is_dir():
            for part in partial.iterdir():
                if _older(part, before):
                    part.unlink(missing_ok=True)
                    batch.dirs.add(partial)
    return forgotten

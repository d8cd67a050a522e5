"""The daemon's side of the maildrop: take dropped files into the spool, at once.

Theory of operation
-------------------
A *pass* lists the drop directory and takes its finished files (not dot-names) in
batches of at most :data:`BATCH_FILES` files: a thread opens and reads each
(``O_NOFOLLOW | O_NONBLOCK``: a symlink or a FIFO cannot trick it; it must be a regular
file with one link, no larger than a message may be) and parses it
(:mod:`relay.maildrop.dropfile`); the reactor thread hands every good one to the spool
at once, so they share the spool writer's group commit (one fsync for the batch, never in
this thread); once the spool says they are durable, a thread unlinks their files and
renames the bad ones to ``quarantine/``, then fsyncs the directories, once per batch.
A crash between the store and the unlink leaves the file to be taken again (a
duplicate, never a loss), as Postfix's pickup does.

What starts a pass: the service starting (mail dropped while the relay was down),
inotify saying a file was renamed into (or written in) the drop directory, and a rescan
every :data:`RESCAN_INTERVAL` seconds (every :data:`POLL_INTERVAL` where inotify is
missing).  Events during a pass make it go round once more; passes never overlap.

A file is *bad* (quarantined, with one log line whose file name and reason are
escaped, since a user wrote them) if it cannot be opened as a regular file or does not
parse.  A file whose store fails (spool full) stays where it is and is tried at the
next pass.  Nothing here raises into the reactor: a defect in a pass is logged and the
next trigger starts a fresh one.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from relay.address import Address
from relay.config import Config
from relay.envelope import BodyType, Destination, Envelope, Recipient, Submitter
from relay.fileio import fsync_directory
from relay.instruments.series import received
from relay.interfaces import IStore, QueueSource
from relay.maildrop.dropfile import MAX_ENVELOPE, DropFile, DropFileError, parse_drop_file
from relay.maildrop.layout import MaildropLayout, is_drop_name
from relay.policy.routing import NoRoute
from relay.received import local_received_header

__all__ = ["BATCH_FILES", "POLL_INTERVAL", "RESCAN_INTERVAL", "PickupService", "build_pickup"]

_log = Logger()

BATCH_FILES = 64  # files read, stored and removed together
POLL_INTERVAL = 1.0  # seconds between scans where there is no inotify
RESCAN_INTERVAL = 60.0  # seconds between scans with inotify (events can be lost)


@dataclass(frozen=True, slots=True)
class _Taken:
    """A file read and parsed: what to store, and who owns the file."""

    name: str
    uid: int
    drop: DropFile


@dataclass(frozen=True, slots=True)
class _Bad:
    """A file to quarantine, and why."""

    name: str
    uid: int | None
    reason: str


_Read = _Taken | _Bad | None  # None: gone meanwhile, or unreadable for now


class PickupService(Service):
    """Takes files from the drop directory into the spool (see the module docstring)."""

    def __init__(
        self,
        layout: MaildropLayout,
        queue: QueueSource,
        reactor: Any,
        *,
        hostname: str,
        max_text: int,
        route: Callable[[Address], Destination] | None = None,
        inotify: bool = True,
    ) -> None:
        """``queue`` is the spool, once open; ``max_text`` the largest text taken.

        ``route`` is the relay's router: recipients are stored with their destination, as
        the gateway stores them (one it cannot route is left to the deliverer, which
        fails it with the reason).
        """
        self._route = route
        self.layout = layout
        self._queue_source = queue
        self._reactor = reactor
        self._hostname = hostname
        self._max_text = max_text
        self._use_inotify = inotify
        self._queue: IStore | None = None
        self._notifier: Any = None
        self._rescan: LoopingCall | None = None
        self._running_pass: Deferred[None] | None = None
        self._again = False
        self.stored = 0  # files taken into the spool, for tests and the log
        self.quarantined = 0  # files set aside
        self._stuck: set[str] = set()  # stored, but the unlink failed: never taken again

    # --- service ----------------------------------------------------------------------

    def startService(self) -> None:
        """Make the directories, then watch them once the spool is open."""
        super().startService()  # type: ignore[no-untyped-call]
        prepared = self._in_thread(self._prepare)
        d = defer.gatherResults([prepared, self._queue_source.when_ready()], consumeErrors=True)
        d.addCallbacks(self._ready, self._not_ready)

    def _prepare(self) -> None:
        """In a thread: make the directories; refuse a drop directory we could not empty.

        In a sticky directory only a file's owner or the directory's may remove it: a
        relay that does not own the drop directory (say ``relay sendmail`` run as root
        made it before the relay, running as its own user, ever started) could store
        files but not remove them, and would store them again on every pass.
        """
        self.layout.prepare()
        owner = self.layout.drop_dir.stat().st_uid
        if owner != os.geteuid() and os.geteuid() != 0:
            raise PermissionError(
                f"{self.layout.drop_dir} belongs to uid {owner}, not to this relay "
                f"(uid {os.geteuid()}): chown it (and its maildrop) to the relay's user"
            )

    def _not_ready(self, failure: Failure) -> None:
        inner = getattr(failure.value, "subFailure", failure)  # gatherResults' FirstError
        _log.critical(
            "pickup: not taking mail from {path}: {why}",
            path=str(self.layout.drop_dir),
            why=inner.getErrorMessage(),
        )

    def _ready(self, results: list[Any]) -> None:
        if not self.running:
            return
        self._queue = results[1]
        interval = POLL_INTERVAL
        if self._use_inotify and self._watch():
            interval = RESCAN_INTERVAL
        self._rescan = LoopingCall(self.wake)
        self._rescan.clock = self._reactor
        self._rescan.start(interval, now=True)

    def _watch(self) -> bool:
        """Ask inotify about the drop directory; False where there is none."""
        try:
            from twisted.internet import inotify
        except ImportError:
            return False
        try:
            notifier = inotify.INotify(self._reactor)  # type: ignore[no-untyped-call]
            notifier.startReading()  # type: ignore[no-untyped-call]
            mask = inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE
            drop_dir = FilePath(str(self.layout.drop_dir))
            notifier.watch(drop_dir, mask, callbacks=[self._event])  # type: ignore[no-untyped-call]
        except Exception as e:
            _log.warn("pickup: no inotify ({error}); scanning every {s}s", error=e, s=POLL_INTERVAL)
            return False
        self._notifier = notifier
        return True

    def _event(self, watch: object, path: FilePath[str], mask: int) -> None:
        self.wake()

    def stopService(self) -> Deferred[None]:
        """Stop watching; let the pass in progress finish (its stores and removals)."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._rescan is not None and self._rescan.running:
            self._rescan.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        running = self._running_pass
        if running is None:
            return defer.succeed(None)
        done: Deferred[None] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done

    # --- passes -----------------------------------------------------------------------

    def wake(self) -> None:
        """Take whatever is in the drop directory now (or right after the pass running)."""
        if not self.running or self._queue is None:
            return
        if self._running_pass is not None:
            self._again = True
            return
        self._running_pass = ensureDeferred(self._passes(self._queue))
        self._running_pass.addErrback(lambda f: _log.failure("pickup: a pass failed", f))
        self._running_pass.addBoth(self._pass_ended)

    def _pass_ended(self, _: object) -> None:
        self._running_pass = None

    async def _passes(self, queue: IStore) -> None:
        while True:
            self._again = False
            names = await self._in_thread(self._list)
            for start in range(0, len(names), BATCH_FILES):
                if not await self._batch(queue, names[start : start + BATCH_FILES]):
                    return  # the spool refused: leave the rest for the next pass
            if not (self._again and self.running):
                return

    def _list(self) -> list[str]:
        """In a thread: the finished files of the drop directory, oldest name first."""
        names = os.listdir(self.layout.drop_dir)
        return sorted(n for n in names if is_drop_name(n) and n not in self._stuck)

    async def _batch(self, queue: IStore, names: list[str]) -> bool:
        """Read, store and remove one batch; False if the spool failed a store."""
        read: list[_Read] = await self._in_thread(self._read_all, names)
        taken = [r for r in read if isinstance(r, _Taken)]
        bad = [r for r in read if isinstance(r, _Bad)]
        now = self._reactor.seconds()
        stores = [queue.store(*self._message(t, now)) for t in taken]
        results = await defer.DeferredList(stores, consumeErrors=True)
        done: list[str] = []
        spool_ok = True
        for t, (ok, outcome) in zip(taken, results, strict=True):
            if ok:
                done.append(t.name)
                self.stored += 1
                _log.info(
                    "pickup: {queue_id} stored from=<{sender}> nrcpt={nrcpt} size={size} uid={uid}",
                    queue_id=outcome,
                    sender="" if t.drop.sender is None else str(t.drop.sender),
                    nrcpt=len(t.drop.recipients),
                    size=len(t.drop.text),
                    uid=t.uid,
                )
            else:
                spool_ok = False
                _log.warn(
                    "pickup: cannot store {name} yet: {error}",
                    name=ascii(t.name),
                    error=outcome.getErrorMessage() if isinstance(outcome, Failure) else outcome,
                )
        quarantined: list[_Bad] = []
        if done or bad:
            quarantined = await self._in_thread(self._finish, done, bad)
        for b in quarantined:
            self.quarantined += 1
            received("local", "quarantined").inc()
            _log.error(
                "pickup: {name} (uid {uid}) quarantined in {where}: {reason}",
                name=ascii(b.name),
                uid="?" if b.uid is None else b.uid,
                where=str(self.layout.quarantine_dir),
                reason=ascii(b.reason),
            )
        return spool_ok

    def _message(self, taken: _Taken, now: float) -> tuple[Envelope, bytes]:
        drop = taken.drop
        header = local_received_header(
            uid=taken.uid,
            hostname=self._hostname,
            when=now,
            helo=drop.helo,
            protocol=None if drop.protocol == "local" else drop.protocol,
        )
        text = header + drop.text
        everyone: list[Address | None] = [drop.sender, *drop.recipients]
        envelope = Envelope(
            return_path=drop.sender,
            recipients=tuple(Recipient(a, self._destination(a)) for a in drop.recipients),
            arrival=now,
            submitter=Submitter(protocol="local", helo=drop.helo),
            body_type=BodyType.SEVEN_BIT if text.isascii() else BodyType.EIGHT_BIT_MIME,
            smtputf8=any(a is not None and a.needs_smtputf8 for a in everyone),
        )
        return envelope, text

    def _destination(self, address: Address) -> Destination | None:
        if self._route is None:
            return None
        try:
            return self._route(address)
        except NoRoute:
            return None

    # --- in a thread ------------------------------------------------------------------

    def _read_all(self, names: list[str]) -> list[_Read]:
        return [self._read(name) for name in names]

    def _read(self, name: str) -> _Read:
        """Open, check and parse one file (blocking)."""
        path = self.layout.drop_dir / name
        limit = self._max_text + MAX_ENVELOPE + 4096
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None  # its owner took it back
            if e.errno == errno.ELOOP:
                return _Bad(name, _owner(path), "a symbolic link")
            if e.errno in (errno.EACCES, errno.EPERM, errno.ENXIO):
                return _Bad(name, _owner(path), f"cannot open: {e.strerror}")
            _log.warn("pickup: cannot open {name} now: {error}", name=ascii(name), error=e)
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return _Bad(name, info.st_uid, "not a regular file")
            if info.st_nlink != 1:
                return _Bad(name, info.st_uid, f"has {info.st_nlink} links")
            if info.st_size > limit:
                return _Bad(name, info.st_uid, f"{info.st_size} octets: too large")
            data = _read_up_to(fd, limit + 1)
        except OSError as e:
            _log.warn("pickup: cannot read {name} now: {error}", name=ascii(name), error=e)
            return None
        finally:
            os.close(fd)
        try:
            return _Taken(name, info.st_uid, parse_drop_file(data, max_text=self._max_text))
        except DropFileError as e:
            return _Bad(name, info.st_uid, str(e))

    def _finish(self, done: list[str], bad: list[_Bad]) -> list[_Bad]:
        """Remove the stored files, quarantine the bad ones (those it could: returned);
        one fsync per directory."""
        moved: list[_Bad] = []
        drop_dir, quarantine = self.layout.drop_dir, self.layout.quarantine_dir
        for name in done:
            try:
                os.unlink(drop_dir / name)
            except FileNotFoundError:
                pass
            except OSError as e:
                # Stored already: taking it again would deliver it twice.  Skipped from
                # now on (until a restart), and said so: the operator removes it.
                self._stuck.add(name)
                _log.critical(
                    "pickup: {name} is stored but cannot be removed ({e}); remove it by "
                    "hand or it is taken again when the relay restarts",
                    name=ascii(name),
                    e=e,
                )
        for b in bad:
            try:
                # the time keeps names apart; the cut keeps them under NAME_MAX
                os.rename(drop_dir / b.name, quarantine / f"{time.time_ns():x}-{b.name[:200]}")
            except OSError as e:  # left where it is, and said so: tried again next pass
                _log.error("pickup: cannot quarantine {name}: {e}", name=ascii(b.name), e=e)
            else:
                moved.append(b)
        fsync_directory(drop_dir)
        if moved:
            fsync_directory(quarantine)
        return moved

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)


def _owner(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def build_pickup(
    config: Config,
    queue: QueueSource,
    reactor: Any,
    route: Callable[[Address], Destination] | None = None,
) -> PickupService:
    """The pickup for ``config``'s maildrop, storing into ``queue`` once it is open."""
    return PickupService(
        MaildropLayout(config.relay.maildrop),
        queue,
        reactor,
        hostname=config.relay.hostname,
        max_text=config.smtp.max_message_size,
        route=route,
    )

"""The spool as a twistd service: it owns the spool while running and lets go on stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface import directlyProvides, providedBy

from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLock, SpoolLocked
from relay.queue.service import SpoolService
from relay.queue.store import SpoolQueue

from queue_helpers import make_envelope


@pytest_twisted.ensureDeferred
async def test_the_service_owns_the_spool_while_it_runs(tmp_path: Path) -> None:
    """Started, it holds the lock and serves the socket; stopped, both are gone."""
    layout = SpoolLayout(tmp_path / "spool")
    service = SpoolService(layout.root, reactor)
    service.startService()
    queue = await service.when_ready()
    try:
        qid = await queue.store(make_envelope(), b"text")
        assert layout.control_path.exists()
        assert oct(layout.control_path.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(SpoolLocked):
            SpoolLock(layout.lock_path).acquire()
        assert await service.when_ready() is queue
    finally:
        await service.stopService()
    assert not layout.control_path.exists()
    with SpoolLock(layout.lock_path):
        pass
    service = SpoolService(layout.root, reactor)
    service.startService()
    try:
        assert await (await service.when_ready()).list_messages() == [qid]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_spool_that_cannot_be_opened_fails_when_ready(tmp_path: Path) -> None:
    """If the spool directory cannot be made, waiters hear of it instead of waiting forever."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    service = SpoolService(blocker / "spool", reactor)
    waiting = service.when_ready()
    service.startService()
    with pytest.raises(OSError):
        await waiting
    await service.stopService()


class _TriggerLog:
    """The running reactor, except that shutdown triggers are written down, not added."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.triggers: list[tuple[str, str]] = []
        directlyProvides(self, *providedBy(real))

    def addSystemEventTrigger(self, phase: str, event: str, call: Any, *args: Any) -> object:
        self.triggers.append((phase, event))
        return len(self.triggers)

    def removeSystemEventTrigger(self, trigger: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_the_service_closes_the_queue_in_its_turn_not_at_reactor_shutdown(
    tmp_path: Path,
) -> None:
    """A queue opened by the service leaves closing to it (after the deliverer has stopped)."""
    alone = _TriggerLog(reactor)
    queue = await SpoolQueue.open(tmp_path / "alone", alone)
    await queue.close()
    assert alone.triggers == [("before", "shutdown")]  # nobody else would close it
    owned = _TriggerLog(reactor)
    service = SpoolService(tmp_path / "owned", owned)
    service.startService()
    try:
        await service.when_ready()
        assert owned.triggers == []
    finally:
        await service.stopService()

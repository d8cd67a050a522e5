"""The spool as a twistd service: it owns the spool while running and lets go on stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from relay.queue.layout import SpoolLayout
from relay.queue.lock import SpoolLock, SpoolLocked
from relay.queue.service import SpoolService

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

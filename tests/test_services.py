"""The relay's service container: children stop one at a time, last added first."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from relay.runtime.services import OrderedMultiService, attach, named_multiservice

from support.reactor_helpers import logged_events


class _Child(Service):
    """Records when its stop begins; the stop ends when the test fires its Deferred."""

    def __init__(self, journal: list[str], *, synchronous: bool = False) -> None:
        self.journal = journal
        self.synchronous = synchronous
        self.stopping: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.journal.append(f"start {self.name}")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.journal.append(f"stop {self.name}")
        if self.synchronous:
            return None
        self.stopping = Deferred()
        return self.stopping


class _Failing(Service):
    """A child whose stop fails at once."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.journal.append(f"stop {self.name}")
        raise RuntimeError("cannot stop")


def _tree(journal: list[str], *children: Any) -> OrderedMultiService:
    parent = named_multiservice("top")
    for child, name in children:
        attach(child, parent, name)
    return parent


def _finish(child: _Child) -> None:
    """End the stop ``child`` began."""
    assert child.stopping is not None, f"{child.name} was not asked to stop"
    child.stopping.callback(None)


def _fired(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(results.append)
    return bool(results)


def test_children_start_in_order_and_stop_in_reverse_each_awaited() -> None:
    """The next child's stop begins only after the previous one's Deferred has fired."""
    journal: list[str] = []
    spool, deliverer, smtp = _Child(journal), _Child(journal), _Child(journal)
    parent = _tree(journal, (spool, "spool"), (deliverer, "deliverer"), (smtp, "smtp"))
    parent.startService()  # type: ignore[no-untyped-call]
    assert journal == ["start spool", "start deliverer", "start smtp"]
    journal.clear()

    stopped = parent.stopService()
    assert journal == ["stop smtp"]
    _finish(smtp)
    assert journal == ["stop smtp", "stop deliverer"]
    assert not _fired(stopped)
    _finish(deliverer)
    assert journal == ["stop smtp", "stop deliverer", "stop spool"]
    assert not _fired(stopped)
    _finish(spool)
    assert _fired(stopped)
    assert not parent.running


def test_a_child_that_stops_at_once_lets_the_next_stop_at_once() -> None:
    """A child whose stopService returns None counts as stopped when it returns."""
    journal: list[str] = []
    first, second = _Child(journal, synchronous=True), _Child(journal, synchronous=True)
    parent = _tree(journal, (first, "first"), (second, "second"))
    parent.startService()  # type: ignore[no-untyped-call]
    journal.clear()
    assert _fired(parent.stopService())
    assert journal == ["stop second", "stop first"]


def test_a_failed_stop_is_logged_and_the_rest_still_stop() -> None:
    """A child whose stop fails is logged; the children before it are stopped all the same."""
    journal: list[str] = []
    spool = _Child(journal)
    parent = _tree(journal, (spool, "spool"), (_Failing(journal), "deliverer"))
    parent.startService()  # type: ignore[no-untyped-call]
    journal.clear()
    with logged_events() as events:
        stopped = parent.stopService()
        assert journal == ["stop deliverer", "stop spool"]
        _finish(spool)
    assert _fired(stopped)
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["child"] == "deliverer"
    failures[0]["log_failure"].trap(RuntimeError)


def test_a_nested_container_is_awaited_as_a_whole() -> None:
    """A container child (the gateway) has stopped all its own children before the next."""
    journal: list[str] = []
    spool, listener, workers = _Child(journal), _Child(journal), _Child(journal)
    inner = named_multiservice("smtp")
    attach(listener, inner, "listener")
    attach(workers, inner, "workers")
    parent = _tree(journal, (spool, "spool"), (inner, "smtp"))
    parent.startService()  # type: ignore[no-untyped-call]
    journal.clear()
    stopped = parent.stopService()
    assert journal == ["stop workers"]
    _finish(workers)
    assert journal == ["stop workers", "stop listener"]
    _finish(listener)
    assert journal == ["stop workers", "stop listener", "stop spool"]
    assert not _fired(stopped)
    _finish(spool)
    assert _fired(stopped)

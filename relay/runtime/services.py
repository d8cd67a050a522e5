"""The relay's service container, and typed helpers for Twisted's service tree.

Twisted's ``MultiService`` starts its children in order, but its ``stopService`` starts
every child's stop at once and waits for none of them before the next begins: a spool
would close while the deliverer is still finishing (and recording) the transactions in
flight.  :class:`OrderedMultiService` stops its children one after another, in the
reverse of the order they were added, each stop waited for before the next begins, so a
parent can rely on what it started before a child still being there while that child
stops.  Every container in the relay's tree is one (:func:`named_multiservice`).

Keeping Twisted's untyped calls here means the rest of the relay stays under
``mypy --strict`` without scattering ``type: ignore`` comments wherever a service is
named or attached.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger

__all__ = ["OrderedMultiService", "attach", "named_multiservice"]

_log = Logger()


class OrderedMultiService(MultiService):
    """A ``MultiService`` whose children stop one at a time, last added first.

    A child whose stop fails is logged and the next child is stopped all the same (a
    deliverer that failed to stop cleanly must not keep the spool open forever); a child
    whose stop never ends holds up the ones before it, so each child bounds its own stop
    (the deliverer its grace, the gateway workers their SIGKILL).
    """

    def stopService(self) -> Deferred[None]:
        """Stop the children in reverse order, each after the previous one has stopped."""
        Service.stopService(self)  # type: ignore[no-untyped-call]
        children: list[IService] = list(self)
        children.reverse()
        return ensureDeferred(self._stop_each(children))

    async def _stop_each(self, children: list[IService]) -> None:
        for child in children:
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure(
                    "{parent}: service {child} failed to stop; stopping the others",
                    parent=self.name,
                    child=child.name,
                )


def named_multiservice(name: str) -> OrderedMultiService:
    """A new, empty :class:`OrderedMultiService` with a name."""
    service = OrderedMultiService()  # type: ignore[no-untyped-call]
    service.setName(name)  # type: ignore[no-untyped-call]
    return service


def attach(child: IService, parent: MultiService, name: str) -> IService:
    """Name ``child`` and make it a child of ``parent``; returns the child."""
    child.setName(name)  # type: ignore[no-untyped-call]
    child.setServiceParent(parent)  # type: ignore[no-untyped-call]
    return child

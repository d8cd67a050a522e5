"""Typed helpers for Twisted's service tree, whose own module has no annotations.

Keeping the untyped calls here means the rest of the relay stays under ``mypy --strict``
without scattering ``type: ignore`` comments wherever a service is named or attached.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService

__all__ = ["attach", "named_multiservice"]


def named_multiservice(name: str) -> MultiService:
    """A new, empty ``MultiService`` with a name."""
    service = MultiService()  # type: ignore[no-untyped-call]
    service.setName(name)  # type: ignore[no-untyped-call]
    return service


def attach(child: IService, parent: MultiService, name: str) -> IService:
    """Name ``child`` and make it a child of ``parent``; returns the child."""
    child.setName(name)  # type: ignore[no-untyped-call]
    child.setServiceParent(parent)  # type: ignore[no-untyped-call]
    return child

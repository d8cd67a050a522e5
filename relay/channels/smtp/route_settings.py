"""Per-destination settings of the SMTP channel: TLS policy and SMTP AUTH credentials.

The deliverer hands the channel a :class:`relay.envelope.Destination` whose host is the
key routing made: the recipient domain (MX delivery) or ``str(smarthost)`` for a route
with a smarthost.  :class:`RoutePolicies` maps that key back to the ``[[route]]`` it came
from, for its ``tls``, ``auth_user`` and ``auth_password_file``: a smarthost key by
exact match (the first route naming that smarthost wins), a domain by the routes'
domain patterns, in order, as routing matched it.  Everything else gets the default:
opportunistic TLS and no AUTH.

Passwords are read once, when the policies are built (start-up), so a missing file is
an error then, and the reactor never blocks on it later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.config import Channel, Route, TlsPolicy

__all__ = ["Credentials", "RoutePolicies", "RoutePolicy"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login for SMTP AUTH; ``require_tls`` keeps the password off clear-text links."""

    user: str
    password: str
    require_tls: bool = True

    def __repr__(self) -> str:
        """Never show the password."""
        return f"Credentials(user={self.user!r}, require_tls={self.require_tls})"


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """How to talk to one destination."""

    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    credentials: Credentials | None = None


DEFAULT_POLICY = RoutePolicy()


class RoutePolicies:
    """Looks up the :class:`RoutePolicy` of a destination key, from the SMTP routes."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._by_smarthost: dict[str, RoutePolicy] = {}
        self._by_domain: list[tuple[Route, RoutePolicy]] = []
        for route in routes:
            if route.channel is not Channel.SMTP:
                continue
            policy = RoutePolicy(route.tls, _credentials(route))
            if route.smarthost is not None:
                self._by_smarthost.setdefault(str(route.smarthost), policy)
            else:
                self._by_domain.append((route, policy))

    def for_destination(self, host: str) -> RoutePolicy:
        """The policy for destination key ``host``."""
        found = self._by_smarthost.get(host)
        if found is not None:
            return found
        for route, policy in self._by_domain:
            if route.matches(host):
                return policy
        return DEFAULT_POLICY


def _credentials(route: Route) -> Credentials | None:
    if route.auth_user is None or route.auth_password_file is None:
        return None
    text = route.auth_password_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    return Credentials(route.auth_user, lines[0] if lines else "")

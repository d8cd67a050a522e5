"""Endpoints from transport descriptions: serial ports here, the rest Twisted's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

from relay.transport.description import TransportError, is_serial, is_stdio, parse_serial
from relay.transport.lock import DEFAULT_LOCK_DIR
from relay.transport.serial import SerialEndpoint

__all__ = ["client_endpoint", "server_endpoint"]


def client_endpoint(
    reactor: Any, description: str, lock_dir: Path | str = DEFAULT_LOCK_DIR
) -> IStreamClientEndpoint:
    """The endpoint a call goes out through: ``serial:...`` or a Twisted client string."""
    if is_serial(description):
        return SerialEndpoint(reactor, parse_serial(description), lock_dir)
    if is_stdio(description):
        raise TransportError("stdio answers calls; it cannot place one")
    try:
        endpoint: IStreamClientEndpoint = clientFromString(  # type: ignore[no-untyped-call]
            reactor, description
        )
    except (ValueError, TypeError, KeyError) as error:
        raise TransportError(f"bad transport {description!r}: {error}") from error
    return endpoint


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """A Twisted server endpoint for a non-serial ``answer`` entry (``tcp:2600``)."""
    if is_serial(description) or is_stdio(description):
        raise TransportError(f"{description!r} is not a listening endpoint")
    try:
        endpoint: IStreamServerEndpoint = serverFromString(  # type: ignore[no-untyped-call]
            reactor, description
        )
    except (ValueError, TypeError, KeyError) as error:
        raise TransportError(f"bad answer endpoint {description!r}: {error}") from error
    return endpoint

"""Endpoints from transport descriptions: serial ports here, the rest Twisted's own."""

from __future__ import annotations

from collections.abc import Callable
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
    endpoint: IStreamClientEndpoint = _parsed(clientFromString, reactor, description)
    return endpoint


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """A Twisted server endpoint for a non-serial ``answer`` entry (``tcp:2600``)."""
    if is_serial(description) or is_stdio(description):
        raise TransportError(f"{description!r} is not a listening endpoint")
    endpoint: IStreamServerEndpoint = _parsed(serverFromString, reactor, description)
    return endpoint


def _parsed(parse: Callable[..., Any], reactor: Any, description: str) -> Any:
    """Twisted's parser's endpoint, its complaints as a TransportError."""
    try:
        return parse(reactor, description)
    except (ValueError, TypeError, KeyError) as error:
        raise TransportError(f"bad endpoint {description!r}: {error}") from error

"""The command's side of the control socket: one blocking request, one response.

A command does one thing and exits, so a plain blocking socket is the simplest correct
client; the daemon's side (:mod:`relay.queue.control`) is Twisted.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from relay.queue.protocol import ProtocolError, Request, decode_line, encode_line

__all__ = ["request"]


def request(path: Path, req: Request, *, timeout: float = 60.0) -> dict[str, Any]:
    """Send ``req`` to the daemon listening at ``path``; the response object.

    Raises OSError if the daemon cannot be reached, ProtocolError if it answers nonsense.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(encode_line(req.to_json()))
        received = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ProtocolError("the daemon closed the connection without answering")
            received += chunk
            if b"\n" in chunk:
                break
    line, _, _ = bytes(received).partition(b"\n")
    response = decode_line(line)
    if not isinstance(response, dict) or "ok" not in response:
        raise ProtocolError("the daemon's answer is not a response object")
    return response

"""The two SMTP tables as data: the diagram drawn from them, and their shape."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest

from relay.sansio.smtp.errors import LocalProtocolError
from relay.sansio.smtp.events import Data, Quit
from relay.sansio.smtp.state import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    ClientState,
    ServerInput,
    ServerState,
    diagram,
    server_move,
)


@pytest.mark.parametrize(
    ("which", "states", "table"),
    [("server", ServerState, SERVER_TRANSITIONS), ("client", ClientState, CLIENT_TRANSITIONS)],
)
def test_the_diagram_draws_every_state_and_move(
    which: str, states: type, table: Mapping[Any, Any]
) -> None:
    """The dot text names every state that has a move, and one edge per (source, target)."""
    text = diagram(which)
    assert text.startswith(f'digraph "{which}" {{') and text.endswith("}\n")
    edges = set(re.findall(r"^  (\w+) -> (\w+) ", text, re.MULTILINE))
    assert {source for source, _ in edges} == {state.name for state, _ in table}
    expected = set()
    for (state, _), target in table.items():
        targets = (target.positive, target.negative) if which == "server" else (target,)
        expected |= {(state.name, t.name) for t in targets}
    assert edges == expected


def test_server_move_raises_for_a_pair_not_in_the_table() -> None:
    """server_move answers the table's Move, and LocalProtocolError for a missing pair."""
    assert server_move(ServerState.RCPT, Data).positive is ServerState.DATA
    assert server_move(ServerState.CONNECTED, Quit).negative is ServerState.CLOSED
    with pytest.raises(LocalProtocolError, match="GREETING in state READY"):
        server_move(ServerState.READY, ServerInput.GREETING)


def test_closed_is_left_by_no_move() -> None:
    """Once closed, a session stays closed in both tables."""
    assert {m.positive for (s, _), m in SERVER_TRANSITIONS.items() if s is ServerState.CLOSED} == {
        ServerState.CLOSED
    }
    assert {t for (s, _), t in CLIENT_TRANSITIONS.items() if s is ClientState.CLOSED} <= {
        ClientState.CLOSED,
        ClientState.ERROR,
    }

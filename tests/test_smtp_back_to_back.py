"""The client engine wired to the server engine, back to back, with no sockets.

Both engines speak the same events (:mod:`relay.sansio.smtp.events`): what the client is
given to send is what the server hands its adapter.  A small harness plays both
adapters: it sends the client's events when the client's table and pipelining rules
allow, carries the bytes each way (whole, split once at every position, or one byte at
a time), and answers the server's events the way the gateway would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.address import Address
from relay.sansio.smtp.client import ClientEvent, SmtpClient
from relay.sansio.smtp.errors import CLOSED, NEED_DATA, PAUSED, LocalProtocolError
from relay.sansio.smtp.events import (
    Auth,
    AuthCredentials,
    AuthResponse,
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Greeting,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Respond,
    Rset,
    ServerReply,
    StartTls,
)
from relay.sansio.smtp.server import Limits, ServerConnection, ServerSettings
from relay.sansio.smtp.state import CLIENT_TRANSITIONS, ClientState, ServerState
from relay.sansio.smtp.wire import SmtpReply

SETTINGS = ServerSettings(
    "mx.test",
    Limits(max_message_size=100_000, max_recipients=5),
    tls_available=True,
    auth_available=True,
    auth_requires_tls=False,
)
ALICE = Address("alice", "example.test")
BOB = Address("bob", "example.test")
NOBODY = Address("nobody", "example.test")  # the server's policy refuses this one
SENDER = Address("sender", "client.test")
TEXT = b"Subject: hi\r\n\r\n.a line with a leading dot\r\nsecond line\r\n"
_TEXT_STATES = (ServerState.DATA, ServerState.BDAT)  # the server is reading a message's text


@dataclass
class Pair:
    """Both engines and both adapters; ``cut`` splits one direction's stream at an offset."""

    cut_up: int | None = None  # an offset in the client-to-server stream
    cut_down: int | None = None  # an offset in the server-to-client stream
    bytewise: bool = False
    line_length_limit: int = 998
    server: ServerConnection = field(init=False)
    client: SmtpClient = field(init=False)
    replies: list[tuple[str, int]] = field(default_factory=list)
    asked: list[object] = field(default_factory=list)  # what the server asked its adapter
    messages: list[tuple[tuple[Address, ...], bytes]] = field(default_factory=list)
    _up: int = 0
    _down: int = 0
    _text: bytearray = field(default_factory=bytearray)
    _recipients: list[Address] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = ServerConnection(SETTINGS)
        self.client = SmtpClient(line_length_limit=self.line_length_limit)
        self._to_client(self.server.send(Greeting()))

    # --- carrying bytes --------------------------------------------------------------

    def _pieces(self, data: bytes, start: int, cut: int | None) -> list[bytes]:
        if self.bytewise:
            return [data[i : i + 1] for i in range(len(data))]
        if cut is not None and start < cut < start + len(data):
            return [data[: cut - start], data[cut - start :]]
        return [data]

    def _to_server(self, data: bytes) -> None:
        pieces = self._pieces(data, self._up, self.cut_up)
        self._up += len(data)
        for piece in pieces:
            self.server.receive_data(piece)
            self._run_server()

    def _to_client(self, data: bytes) -> None:
        pieces = self._pieces(data, self._down, self.cut_down)
        self._down += len(data)
        for piece in pieces:
            self.client.receive_data(piece)
            self._run_client()

    # --- the server's adapter ----------------------------------------------------------

    def _run_server(self) -> None:
        while True:
            event = self.server.next_event()
            if event is NEED_DATA or event is PAUSED or event is CLOSED:
                return
            if isinstance(event, MessageData):
                self._text += event.data
                continue
            if not isinstance(event, Respond):
                self.asked.append(event)
            data = self.server.send(self._answer(event))
            if self.server.state not in _TEXT_STATES:
                # as the gateway does: once a reply ends the text (RSET between BDAT
                # chunks, a refused DATA text, the end of a message), its octets are void
                self._text.clear()
            self._to_client(data)

    def _answer(self, event: object) -> SmtpReply:
        if isinstance(event, Respond):
            return event.reply
        if isinstance(event, MailFrom):
            assert not self._text  # the server's state showed where the last text ended
            self._recipients = []
            return SmtpReply(250, "2.1.0", ("Ok",))
        if isinstance(event, RcptTo):
            if event.address == NOBODY:
                return SmtpReply(550, "5.1.1", ("no such user",))
            self._recipients.append(event.address)
            return SmtpReply(250, "2.1.5", ("Ok",))
        if isinstance(event, StartTls):
            return SmtpReply(454, "4.7.0", ("TLS not available now",))
        if isinstance(event, AuthCredentials):
            if (event.username, event.password) == ("alice", "secret"):
                return SmtpReply(235, "2.7.0", ("Authenticated",))
            return SmtpReply(535, "5.7.8", ("Authentication failed",))
        if isinstance(event, EndOfMessage):
            assert event.size == len(self._text)
            self.messages.append((tuple(self._recipients), bytes(self._text)))
            self._text.clear()
            return SmtpReply(250, "2.0.0", ("Ok: queued",))
        raise AssertionError(f"unexpected event {event!r}")

    # --- the client's adapter ----------------------------------------------------------

    def _run_client(self) -> None:
        while True:
            event = self.client.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, ServerReply)
            name = "unasked" if event.command is None else event.command.name
            self.replies.append((name, event.reply.code))

    def allowed(self, event: ClientEvent) -> bool:
        """Whether the client's table allows ``event`` now (pipelining aside)."""
        return (self.client.state, type(event)) in CLIENT_TRANSITIONS

    def send(self, event: ClientEvent) -> None:
        """Send ``event`` once the client may (its replies have come back as needed)."""
        assert self.allowed(event), (self.client.state, event)
        assert self.client.may_send_now(event), (self.client.unanswered, event)
        self._to_server(self.client.send(event))

    def transcript(self) -> tuple[object, ...]:
        """Everything both sides saw: the same however the bytes were cut."""
        return (tuple(self.replies), tuple(map(repr, self.asked)), tuple(self.messages))


def _plain(user: str, password: str) -> bytes:
    """The PLAIN response before base64 (the client engine encodes it)."""
    return f"\0{user}\0{password}".encode()


WHOLE_SESSION: list[ClientEvent] = [
    Ehlo("client.test"),
    StartTls(),  # the server's adapter refuses it: 454, and the session goes on in clear
    Auth("LOGIN"),
    AuthResponse(b"alice"),
    AuthResponse(b"wrong"),  # 535
    Auth("PLAIN", _plain("alice", "secret")),  # 235
    MailFrom(SENDER, size=len(TEXT)),
    RcptTo(ALICE),
    RcptTo(NOBODY),  # refused: 550
    RcptTo(BOB),
    Data(),
    MessageData(TEXT),
    EndOfMessage(),
    MailFrom(SENDER),
    RcptTo(NOBODY),
    Rset(),  # abandon it
    MailFrom(None),
    RcptTo(BOB),
    Bdat(10, False),
    MessageData(TEXT[:10]),
    Bdat(len(TEXT) - 10, True),
    MessageData(TEXT[10:]),
    Noop(),
    Quit(),
]

EXPECTED_REPLIES = [
    ("GREETING", 220),
    ("EHLO", 250),
    ("STARTTLS", 454),
    ("AUTH", 334),
    ("AUTH", 334),
    ("AUTH", 535),
    ("AUTH", 235),
    ("MAIL", 250),
    ("RCPT", 250),
    ("RCPT", 550),
    ("RCPT", 250),
    ("DATA", 354),
    ("END_OF_DATA", 250),
    ("MAIL", 250),
    ("RCPT", 550),
    ("RSET", 250),
    ("MAIL", 250),
    ("RCPT", 250),
    ("BDAT", 250),
    ("BDAT_LAST", 250),
    ("NOOP", 250),
    ("QUIT", 221),
]


def converse(script: Sequence[ClientEvent], pair: Pair) -> Pair:
    """Run ``script``: each event waits for the replies it must (a pipelining client)."""
    for event in script:
        pair.send(event)
    return pair


def test_a_whole_session_between_the_two_engines() -> None:
    """EHLO, STARTTLS refused, AUTH LOGIN and PLAIN, RCPTs partly refused, DATA, RSET,
    BDAT and QUIT: both engines agree on every reply, every message and the end."""
    pair = converse(WHOLE_SESSION, Pair())
    assert pair.replies == EXPECTED_REPLIES
    assert pair.messages == [((ALICE, BOB), TEXT), ((BOB,), TEXT)]
    assert pair.client.state is ClientState.CLOSED
    assert pair.server.state is ServerState.CLOSED
    assert pair.server.authenticated_user == "alice"


def _whole_streams() -> tuple[int, int]:
    pair = converse(WHOLE_SESSION, Pair())
    return pair._up, pair._down  # the lengths of the two streams


def test_the_session_is_the_same_split_at_every_position() -> None:
    """Cutting either direction's byte stream anywhere changes nothing either side sees."""
    whole = converse(WHOLE_SESSION, Pair()).transcript()
    up, down = _whole_streams()
    for cut in range(1, up):
        assert converse(WHOLE_SESSION, Pair(cut_up=cut)).transcript() == whole, cut
    for cut in range(1, down):
        assert converse(WHOLE_SESSION, Pair(cut_down=cut)).transcript() == whole, cut


def test_the_session_is_the_same_one_byte_at_a_time() -> None:
    """Both directions delivered one octet at a time: the same session."""
    whole = converse(WHOLE_SESSION, Pair()).transcript()
    assert converse(WHOLE_SESSION, Pair(bytewise=True)).transcript() == whole


def _one_message(text: list[ClientEvent]) -> list[ClientEvent]:
    """A session sending one message to ALICE with DATA, ``text`` its pieces."""
    envelope: list[ClientEvent] = [Ehlo("client.test"), MailFrom(SENDER), RcptTo(ALICE)]
    return [*envelope, Data(), *text, EndOfMessage(), Quit()]


def test_long_text_lines_pass_whole_when_the_client_does_not_break_them() -> None:
    """A 5000-octet line crosses in pieces and arrives whole (line_length_limit=0)."""
    text = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"
    pieces = [MessageData(text[:3000]), MessageData(text[3000:])]
    pair = converse(_one_message(pieces), Pair(line_length_limit=0, bytewise=True))
    assert pair.messages == [((ALICE,), text)]


def test_the_client_breaks_long_lines_by_default() -> None:
    """With the default line_length_limit the server receives lines of at most 998."""
    text = b"Subject: long\r\n\r\n" + b"y" * 2500 + b"\r\n"
    pair = converse(_one_message([MessageData(text)]), Pair())
    [(_, stored)] = pair.messages
    assert max(len(line) for line in stored.split(b"\r\n")) <= 998
    assert stored.count(b"y") == 2500  # broken, not cut


# --- any sequence of commands ----------------------------------------------------------

_ACTIONS: list[list[ClientEvent]] = [
    [Ehlo("client.test")],
    [StartTls()],
    [Auth("PLAIN", _plain("alice", "secret"))],
    [Auth("PLAIN", _plain("alice", "nope"))],
    [Auth("LOGIN"), AuthResponse(b"alice"), AuthResponse(b"secret")],
    [Auth("LOGIN"), AuthResponse(None)],
    [MailFrom(SENDER)],
    [MailFrom(None, size=10)],
    [MailFrom(SENDER), RcptTo(ALICE)],
    [MailFrom(SENDER), RcptTo(NOBODY)],
    [RcptTo(ALICE)],
    [RcptTo(NOBODY)],
    [Data(), MessageData(TEXT), EndOfMessage()],
    [Bdat(5, False), MessageData(b"12345")],
    [Bdat(3, True), MessageData(b"xyz")],
    [Bdat(0, True)],
    [Rset()],
    [Noop()],
    [Quit()],
]

# Which server states may face each client state once nothing is outstanding.
_AGREE: dict[ClientState, set[ServerState]] = {
    ClientState.HELLO: {ServerState.CONNECTED},
    # a refused DATA or BDAT LAST ends the client's transaction, not the server's
    ClientState.READY: {ServerState.READY, ServerState.MAIL},
    ClientState.MAIL: {ServerState.MAIL},
    ClientState.RCPT: {ServerState.MAIL, ServerState.RCPT},  # every RCPT may be refused
    ClientState.TEXT: {ServerState.DATA},
    ClientState.BDAT: {ServerState.BDAT, ServerState.MAIL},  # chunks refused: no recipient
    ClientState.AUTH_CHALLENGE: {
        ServerState.AUTH_PLAIN,
        ServerState.AUTH_LOGIN_USER,
        ServerState.AUTH_LOGIN_PASSWORD,
    },
    ClientState.CLOSED: {ServerState.CLOSED},
}


def _try(pair: Pair, action: list[ClientEvent]) -> None:
    """Send ``action``'s events while the client allows them (the rest is skipped)."""
    for event in action:
        if not pair.allowed(event) or not pair.client.may_send_now(event):
            return
        try:
            pair.send(event)
        except LocalProtocolError:
            return  # an extension the server did not offer (before EHLO, say)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(range(len(_ACTIONS))), max_size=25), st.booleans())
@example(picks=[8, 13, 16, 8, 12], bytewise=False)  # a BDAT chunk, RSET, then a DATA message
def test_any_command_sequence_keeps_the_two_tables_in_step(
    picks: list[int], bytewise: bool
) -> None:
    """Whatever the client sends, every command gets its reply and both engines agree on
    where the session is."""
    pair = Pair(bytewise=bytewise)
    pair.send(Ehlo("client.test"))  # (EHLO is also among the picks, for the other states)
    for pick in picks:
        _try(pair, _ACTIONS[pick])
        client_state = pair.client.state
        assert client_state is not ClientState.ERROR
        assert not pair.client.unanswered or pair.server.closed
        if client_state in _AGREE:
            assert pair.server.state in _AGREE[client_state], (client_state, pair.replies)


@pytest.mark.parametrize("cut", [None, 1, 7, 30])
def test_a_pipelined_envelope_crosses_in_one_write(cut: int | None) -> None:
    """With PIPELINING, MAIL and every RCPT leave in one write: still one reply each."""
    pair = Pair(cut_down=cut)
    pair.send(Ehlo("client.test"))
    envelope = [MailFrom(SENDER), RcptTo(ALICE), RcptTo(NOBODY), RcptTo(BOB)]
    up = b""
    for event in envelope:
        assert pair.client.may_send_now(event)  # before any reply: pipelined
        up += pair.client.send(event)
    assert len(pair.client.unanswered) == 4
    pair._to_server(up)  # one write, as a pipelining client does
    assert pair.replies[-4:] == [("MAIL", 250), ("RCPT", 250), ("RCPT", 550), ("RCPT", 250)]
    assert not pair.client.unanswered

"""The sans-I/O SMTP server engine: bytes in, events and replies out, no sockets.

A small scripted adapter (:class:`Driver`) answers the engine's events the way the
gateway does; conversations are fed as the groups a client sends between replies, and
each group is also fed split at every position, since TCP may deliver it so.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.address import Address
from relay.envelope import BodyType
from relay.sansio.smtp.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthCredentials,
    AuthResponse,
    Bdat,
    Data,
    Ehlo,
    EndOfMessage,
    Greeting,
    Helo,
    Help,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Refuse,
    Respond,
    Rset,
    Shutdown,
    StartTls,
    Vrfy,
)
from relay.sansio.smtp.server import (
    CLOSED,
    Limits,
    LocalProtocolError,
    ServerConnection,
    ServerSettings,
)
from relay.sansio.smtp.state import SERVER_TRANSITIONS, ServerInput, ServerState
from relay.sansio.smtp.wire import ReplyParser, SmtpReply, dot_stuff

SETTINGS = ServerSettings(
    "mx.test",
    Limits(max_message_size=4096, max_recipients=3, max_errors=5),
    tls_available=True,
    auth_available=True,
    auth_requires_tls=False,
    postmaster=Address("postmaster", "example.test"),
)


class Driver:
    """Plays the gateway: greets, answers events, collects replies and message texts."""

    def __init__(
        self,
        settings: ServerSettings = SETTINGS,
        *,
        greet: bool = True,
        rcpt: Callable[[Address], SmtpReply] | None = None,
    ) -> None:
        self.conn = ServerConnection(settings)
        self.out = bytearray()
        self.events: list[object] = []
        self.messages: list[bytes] = []
        self.closed = False
        self._text = bytearray()
        self._rcpt = rcpt or (lambda a: SmtpReply(250, "2.1.5", ("Ok",)))
        if greet:
            self.out += self.conn.send(Greeting())

    def feed(self, data: bytes) -> None:
        """Give the engine bytes and answer everything it asks (b"" is no bytes, not EOF)."""
        if data:
            self.conn.receive_data(data)
        self.pump()

    def eof(self) -> None:
        """The client closed its side."""
        self.conn.receive_data(b"")
        self.pump()

    def pump(self) -> None:
        """Answer events until the engine needs data (or is closed)."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            if event is CLOSED:
                self.closed = True
                return
            self.events.append(event)
            self.out += self._answer(event)

    def _answer(self, event: object) -> bytes:
        conn = self.conn
        if isinstance(event, Respond):
            return conn.send(event.reply)
        if isinstance(event, MessageData):
            self._text += event.data
            return b""
        if isinstance(event, EndOfMessage):
            assert event.size == len(self._text)
            self.messages.append(bytes(self._text))
            self._text.clear()
            return conn.send(SmtpReply(250, "2.0.0", ("Ok: queued as X",)))
        if isinstance(event, MailFrom):
            self._text.clear()  # a new transaction: text of an abandoned one is void
            return conn.send(SmtpReply(250, "2.1.0", ("Ok",)))
        if isinstance(event, RcptTo):
            return conn.send(self._rcpt(event.address))
        if isinstance(event, AuthCredentials):
            ok = event.username == "alice" and event.password == "secret"
            return conn.send(
                SmtpReply(235, "2.7.0", ("ok",)) if ok else SmtpReply(535, "5.7.8", ("no",))
            )
        if isinstance(event, StartTls):
            return conn.send(SmtpReply(220, "2.0.0", ("go",)))
        raise AssertionError(f"unexpected event {event!r}")

    def replies(self) -> list[SmtpReply]:
        """Every reply written so far, parsed by the strict reply parser."""
        parser = ReplyParser()
        replies = parser.feed(bytes(self.out))
        parser.close()
        return replies

    def codes(self) -> list[tuple[int, str | None]]:
        """(code, enhanced) of every reply after the greeting."""
        return [(r.code, r.enhanced) for r in self.replies()[1:]]


def converse(groups: Sequence[bytes], **kwargs: object) -> Driver:
    """A driver fed each group in turn (a client waiting for replies between groups)."""
    driver = Driver(**kwargs)  # type: ignore[arg-type]
    for group in groups:
        driver.feed(group)
    return driver


def converse_split(groups: Sequence[bytes], **kwargs: object) -> list[Driver]:
    """The same conversation with one group split in two, for every group and position."""
    drivers = []
    for index, group in enumerate(groups):
        for cut in range(len(group) + 1):
            driver = Driver(**kwargs)  # type: ignore[arg-type]
            for other, data in enumerate(groups):
                if other == index:
                    driver.feed(data[:cut])
                    driver.feed(data[cut:])
                else:
                    driver.feed(data)
            drivers.append(driver)
    return drivers


def assert_same_everywhere(groups: Sequence[bytes], **kwargs: object) -> Driver:
    """Feed whole and split at every position: the replies and texts never differ."""
    whole = converse(groups, **kwargs)
    for split in converse_split(groups, **kwargs):
        assert split.out == whole.out
        assert split.messages == whole.messages
    return whole


HELLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"


# --------------------------------------------------------------------------- sessions


def test_a_pipelined_transaction_delivers_the_text_exactly() -> None:
    """EHLO, a pipelined MAIL/RCPT/DATA, stuffed text, QUIT: replies and text exact."""
    text = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    driver = assert_same_everywhere([HELLO, ENVELOPE, dot_stuff(text) + b"QUIT\r\n"])
    assert driver.messages == [text]
    assert [c for c, _ in driver.codes()] == [250, 250, 250, 354, 250, 221]
    assert driver.closed


def test_greeting_and_ehlo_advertise_the_extensions() -> None:
    """The greeting names the host; EHLO lists PIPELINING, SIZE, 8BITMIME, SMTPUTF8..."""
    driver = converse([HELLO])
    greeting, ehlo = driver.replies()
    assert (greeting.code, greeting.lines) == (220, ("mx.test ESMTP relay",))
    assert ehlo.lines[1:] == (
        "PIPELINING",
        "SIZE 4096",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
    )


def test_auth_is_not_offered_in_clear_when_tls_is_required() -> None:
    """With auth_requires_tls, EHLO in clear has no AUTH line, and AUTH gets 538 5.7.11."""
    settings = ServerSettings("mx.test", tls_available=True, auth_available=True)
    driver = converse([HELLO, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"], settings=settings)
    assert "AUTH PLAIN LOGIN" not in driver.replies()[1].lines
    assert driver.codes()[-1] == (538, "5.7.11")


def test_helo_session_has_no_extensions_and_refuses_parameters() -> None:
    """After HELO the reply is one line and MAIL parameters get 555 5.5.4."""
    driver = converse([b"HELO client.test\r\n", b"MAIL FROM:<a@b.test> SIZE=10\r\n"])
    assert driver.replies()[1].lines == ("mx.test Hello client.test",)
    assert driver.codes()[-1] == (555, "5.5.4")
    assert driver.conn.protocol_name == "SMTP"


def test_rset_abandons_the_transaction() -> None:
    """After RSET a RCPT needs a new MAIL (503 5.5.1)."""
    driver = converse([HELLO, b"MAIL FROM:<a@b.test>\r\n", b"RSET\r\n", b"RCPT TO:<c@d.test>\r\n"])
    assert driver.codes()[-2:] == [(250, "2.0.0"), (503, "5.5.1")]


def test_noop_vrfy_help_and_unknown_commands() -> None:
    """NOOP 250, VRFY 252 (never confirms), HELP 214, EXPN 502, nonsense 500."""
    driver = converse(
        [HELLO, b"NOOP\r\n", b"VRFY bob\r\n", b"HELP\r\n", b"EXPN list\r\n", b"FOO\r\n"]
    )
    assert driver.codes()[1:] == [
        (250, "2.0.0"),
        (252, "2.5.0"),
        (214, "2.0.0"),
        (502, "5.5.1"),
        (500, "5.5.2"),
    ]


def test_mail_parameters_are_decoded() -> None:
    """SIZE, BODY, SMTPUTF8 and AUTH= reach the adapter's MailFrom decoded."""
    driver = converse(
        [HELLO, "MAIL FROM:<é@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8 AUTH=a+2Bb\r\n".encode()]
    )
    (mail,) = [e for e in driver.events if isinstance(e, MailFrom)]
    assert mail == MailFrom(Address("é", "b.test"), 100, BodyType.EIGHT_BIT_MIME, True, "a+b")
    assert driver.codes()[-1] == (250, "2.1.0")


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        (b"MAIL FROM:<a@b.test> SIZE=4097\r\n", 552, "5.3.4"),
        (b"MAIL FROM:<a@b.test> SIZE=big\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.test> FOO=1\r\n", 555, "5.5.4"),
        (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<a@@b.test>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:a@b.test\r\n", 501, "5.5.4"),
        ("MAIL FROM:<é@b.test>\r\n".encode(), 553, "5.6.7"),
        (b"MAIL TO:<a@b.test>\r\n", 501, "5.5.4"),
    ],
)
def test_bad_mail_commands(command: bytes, code: int, enhanced: str) -> None:
    """Each malformed or over-limit MAIL FROM gets its exact reply."""
    driver = assert_same_everywhere([HELLO, command])
    assert driver.codes()[-1] == (code, enhanced)
    assert not any(isinstance(e, MailFrom) for e in driver.events)


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        (b"RCPT TO:<>\r\n", 501, "5.1.3"),
        (b"RCPT TO:<c@d.test> NOTIFY=NEVER\r\n", 555, "5.5.4"),
        ("RCPT TO:<é@d.test>\r\n".encode(), 553, "5.6.7"),
        (b"RCPT TO:<c@-bad-.test>\r\n", 501, "5.1.3"),
    ],
)
def test_bad_rcpt_commands(command: bytes, code: int, enhanced: str) -> None:
    """Each malformed RCPT TO gets its exact reply and never reaches the policy."""
    driver = assert_same_everywhere([HELLO, b"MAIL FROM:<a@b.test>\r\n", command])
    assert driver.codes()[-1] == (code, enhanced)
    assert not any(isinstance(e, RcptTo) for e in driver.events)


def test_rcpt_postmaster_without_domain_is_the_configured_postmaster() -> None:
    """RCPT TO:<Postmaster> (RFC 5321 4.5.1) reaches the policy as the postmaster address."""
    driver = converse([HELLO, b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<Postmaster>\r\n"])
    assert RcptTo(Address("postmaster", "example.test")) in driver.events


def test_data_without_accepted_recipients_is_out_of_sequence() -> None:
    """When every RCPT was refused, DATA gets 503 5.5.1 and no text is read."""
    refuse = lambda a: SmtpReply(550, "5.1.1", ("unknown",))  # noqa: E731
    driver = converse([HELLO, ENVELOPE], rcpt=refuse)
    assert driver.codes()[1:] == [(250, "2.1.0"), (550, "5.1.1"), (503, "5.5.1")]
    assert driver.conn.state is ServerState.MAIL


# --------------------------------------------------------------------------- the table

_ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
_GOOD_PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"
_ALICE = base64.b64encode(b"alice") + b"\r\n"

_COMMANDS: dict[type, bytes] = {
    Helo: b"HELO c.test\r\n",
    Ehlo: b"EHLO c.test\r\n",
    MailFrom: b"MAIL FROM:<a@b.test>\r\n",
    RcptTo: b"RCPT TO:<c@d.test>\r\n",
    Data: b"DATA\r\n",
    Rset: b"RSET\r\n",
    Noop: b"NOOP\r\n",
    Quit: b"QUIT\r\n",
    Vrfy: b"VRFY x\r\n",
    Help: b"HELP\r\n",
    StartTls: b"STARTTLS\r\n",
    Auth: _GOOD_PLAIN,  # answered at once: 235
    Bdat: b"BDAT 4\r\nab",  # half a chunk: the engine is reading it
}
_REACH: dict[ServerState, list[bytes]] = {
    ServerState.CONNECTED: [],
    ServerState.READY: [HELLO],
    ServerState.MAIL: [HELLO, b"MAIL FROM:<a@b.test>\r\n"],
    ServerState.RCPT: [HELLO, _ENVELOPE],
    ServerState.BDAT: [HELLO, _ENVELOPE + b"BDAT 2\r\nxy"],
    ServerState.DATA: [HELLO, _ENVELOPE, b"DATA\r\n"],
    ServerState.CHUNK: [HELLO, _ENVELOPE + b"BDAT 4\r\nab"],
    ServerState.AUTH_PLAIN: [HELLO, b"AUTH PLAIN\r\n"],
    ServerState.AUTH_LOGIN_USER: [HELLO, b"AUTH LOGIN\r\n"],
    ServerState.AUTH_LOGIN_PASSWORD: [HELLO, b"AUTH LOGIN\r\n", _ALICE],
    ServerState.TLS: [HELLO, b"STARTTLS\r\n"],
    ServerState.CLOSED: [b"QUIT\r\n"],
}
_COMMAND_STATES = [ServerState.CONNECTED, ServerState.READY, ServerState.MAIL]
_COMMAND_STATES += [ServerState.RCPT, ServerState.BDAT]

# The bytes that make each input that is not a command (by state where it differs).
_I = ServerInput
_PEER_INPUTS: dict[ServerInput | type, bytes] = {
    _I.EARLY_INPUT: b"EHLO c.test\r\n",
    _I.LINE_TOO_LONG: b"X" * 13000 + b"\r\n",
    _I.BAD_COMMAND: b"FOO\r\n",
    _I.NOT_SMTP: b"GET / HTTP/1.0\r\n",
    _I.BAD_BDAT: b"BDAT x\r\n",
    _I.CHUNK_DISCARDED: b"BDAT 3\r\nabc",
    _I.SYNC_ERROR: b"EHLO c.test\r\nNOOP\r\n",
    _I.TEXT_END: b"text\r\n.\r\n",
    _I.CHUNK_END: b"cd",
    _I.LAST_CHUNK_END: b"cd",
    _I.AUTH_PLAIN: b"AUTH PLAIN\r\n",
    _I.AUTH_LOGIN: b"AUTH LOGIN\r\n",
    _I.AUTH_LOGIN_USER: b"AUTH LOGIN " + _ALICE,
    _I.TOO_MANY_ERRORS: b"FOO\r\n" * 5,
    AuthResponse: b"*\r\n",
}
_PEER_INPUTS_IN: dict[tuple[ServerState, ServerInput | type], bytes] = {
    (ServerState.AUTH_LOGIN_USER, _I.AUTH_LOGIN_USER): _ALICE,
    (ServerState.AUTH_PLAIN, _I.SYNC_ERROR): b"=\r\nNOOP\r\n",
    (ServerState.AUTH_LOGIN_USER, _I.SYNC_ERROR): b"=\r\nNOOP\r\n",
    (ServerState.AUTH_LOGIN_PASSWORD, _I.SYNC_ERROR): b"=\r\nNOOP\r\n",
    (ServerState.AUTH_PLAIN, _I.TOO_MANY_ERRORS): (b"X" * 13000 + b"\r\n") * 5,
    (ServerState.AUTH_LOGIN_USER, _I.TOO_MANY_ERRORS): (b"X" * 13000 + b"\r\n") * 5,
    (ServerState.AUTH_LOGIN_PASSWORD, _I.TOO_MANY_ERRORS): (b"X" * 13000 + b"\r\n") * 5,
}


def _driver_in(state: ServerState, key: ServerInput | type) -> Driver:
    """A driver whose engine is in ``state``, reached the way ``key`` needs."""
    if state is ServerState.GREETING:
        return Driver(greet=False)
    settings = SETTINGS
    if (state, key) == (ServerState.RCPT, _I.CHUNK_DISCARDED):
        settings = ServerSettings("mx.test", SETTINGS.limits, chunking=False)
    groups = _REACH[state]
    if (state, key) == (ServerState.CHUNK, _I.LAST_CHUNK_END):
        groups = [HELLO, _ENVELOPE + b"BDAT 4 LAST\r\nab"]
    driver = converse(groups, settings=settings)
    assert driver.conn.state is state
    return driver


def _apply(driver: Driver, state: ServerState, key: ServerInput | type) -> None:
    """Make the engine take input ``key`` (bytes from the client, or the adapter's call)."""
    conn = driver.conn
    if key is _I.GREETING:
        driver.out += conn.send(Greeting())
    elif key is _I.REFUSE:
        driver.out += conn.send(Refuse(SmtpReply(421, "4.7.0", ("busy",))))
    elif key is _I.SHUTDOWN:
        driver.out += conn.send(Shutdown(SmtpReply(421, "4.4.2", ("bye",))))
    elif key is _I.TLS_STARTED:
        conn.tls_started()
    elif key is _I.END_OF_STREAM:
        driver.eof()
    elif isinstance(key, type) and key is not AuthResponse:
        driver.feed(_COMMANDS[key])
    else:
        driver.feed(_PEER_INPUTS_IN.get((state, key), _PEER_INPUTS[key]))


_ADAPTER_INPUTS = [_I.GREETING, _I.REFUSE, _I.SHUTDOWN, _I.TLS_STARTED]


@pytest.mark.parametrize("key", list(SERVER_TRANSITIONS), ids=lambda k: f"{k[0].name}-{k[1]}")
def test_every_pair_in_the_table_moves_as_it_says(key: tuple[ServerState, object]) -> None:
    """Each (state, input) of the table, made from bytes or the adapter, moves as written."""
    state, what = key
    assert isinstance(what, ServerInput | type)
    move = SERVER_TRANSITIONS[key]
    driver = _driver_in(state, what)
    before = len(driver.replies())
    _apply(driver, state, what)
    replies = driver.replies()[before:]
    positive = not replies or replies[0].is_positive
    assert driver.conn.state is (move.positive if positive else move.negative)
    if what is _I.TOO_MANY_ERRORS:
        assert replies[-1].code == 421


@pytest.mark.parametrize("state", list(ServerState), ids=lambda s: s.name)
@pytest.mark.parametrize("key", _ADAPTER_INPUTS, ids=lambda k: k.name)
def test_adapter_inputs_missing_from_the_table_raise(state: ServerState, key: ServerInput) -> None:
    """An adapter call the table does not allow in a state is a LocalProtocolError."""
    if (state, key) in SERVER_TRANSITIONS:
        return  # walked above
    driver = _driver_in(state, key)
    with pytest.raises(LocalProtocolError):
        _apply(driver, state, key)
    assert driver.conn.state is state


@pytest.mark.parametrize("state", _COMMAND_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("command", list(_COMMANDS), ids=lambda c: c.__name__)
def test_commands_missing_from_the_table_are_503(state: ServerState, command: type) -> None:
    """A command the table does not list in a state is 503 5.5.1 and moves nothing."""
    if (state, command) in SERVER_TRANSITIONS:
        return  # walked above
    driver = _driver_in(state, command)
    driver.feed(_COMMANDS[command] + (b"cd" if command is Bdat else b""))  # the whole chunk
    assert driver.codes()[-1] == (503, "5.5.1")
    assert driver.conn.state is state


def test_commands_are_read_only_in_command_states() -> None:
    """Only the states where lines are commands have commands in the table."""
    command_classes = set(_COMMANDS)
    states_with_commands = {s for s, k in SERVER_TRANSITIONS if k in command_classes}
    assert states_with_commands == set(_COMMAND_STATES) | {ServerState.READY}


def test_every_state_is_reached_and_left() -> None:
    """No state of the table is unreachable or a dead end (but CLOSED)."""
    targets = {ServerState.GREETING}
    for move in SERVER_TRANSITIONS.values():
        targets |= {move.positive, move.negative}
    assert targets == set(ServerState)
    sources = {s for (s, _), move in SERVER_TRANSITIONS.items() if move.positive is not s}
    assert sources == set(ServerState) - {ServerState.CLOSED}


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "smuggled",
    [
        b"\n.\n",  # LF . LF (the classic)
        b"\r.\r",  # CR . CR
        b"\n.\r\n",  # LF . CRLF
        b"\r\n.\n",  # CRLF . LF
        b"\r\n.\r",  # CRLF . CR
        b"\r.\r\n",  # CR . CRLF
    ],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF"],
)
def test_smtp_smuggling_is_rejected_and_never_executed(smuggled: bytes) -> None:
    """A fake end of data is text: the message gets 554 5.5.0, the smuggled MAIL never runs."""
    payload = (
        b"Subject: real\r\n\r\nhello"
        + smuggled
        + b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@d.test>\r\nDATA\r\n"
        + b"Subject: forged\r\n\r\n.\r\n"
    )
    driver = assert_same_everywhere([HELLO, ENVELOPE, payload, b"QUIT\r\n"])
    assert driver.codes()[-2:] == [(554, "5.5.0"), (221, "2.0.0")]
    senders = [e.reverse_path for e in driver.events if isinstance(e, MailFrom)]
    assert senders == [Address("a", "b.test")]
    assert driver.messages == []


def test_bare_lf_alone_in_text_is_rejected() -> None:
    """A message with any bare LF is refused whole (554 5.5.0), not silently fixed."""
    driver = assert_same_everywhere([HELLO, ENVELOPE, b"line one\nline two\r\n.\r\n"])
    assert driver.codes()[-1] == (554, "5.5.0")
    assert driver.messages == []


def test_overlong_command_line_is_500_and_never_buffered() -> None:
    """A 1 MiB line without CRLF costs 500 5.5.2 once, the engine holds under 512 bytes."""
    driver = converse([HELLO])
    for _ in range(1024):
        driver.feed(b"x" * 1024)
        assert driver.conn.buffered < 512
    driver.feed(b"tail\r\nNOOP\r\n")
    assert driver.codes()[1:] == [(500, "5.5.2"), (250, "2.0.0")]


def test_command_line_limit_is_512_including_crlf() -> None:
    """A 512-octet command line is fine; 513 is 500 5.5.2."""
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    too_long = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    assert len(ok) == 512
    driver = assert_same_everywhere([HELLO, ok, too_long])
    assert driver.codes()[1:] == [(250, "2.0.0"), (500, "5.5.2")]


def test_a_4000_octet_text_line_is_accepted_whole() -> None:
    """A 4 000-octet text line (fed whole and split at every byte) is stored as it came."""
    text = b"Subject: long\r\n\r\n" + b"y" * 4000 + b"\r\n.end\r\n"
    assert len(text) <= SETTINGS.limits.max_message_size
    driver = assert_same_everywhere([HELLO, ENVELOPE, dot_stuff(text) + b"NOOP\r\n"])
    assert driver.codes()[-2:] == [(250, "2.0.0"), (250, "2.0.0")]
    assert driver.messages == [text]


def test_a_line_as_long_as_the_size_limit_is_accepted_one_octet_more_is_552() -> None:
    """One line filling max_message_size exactly is kept; one octet longer is 552 5.3.4."""
    limit = SETTINGS.limits.max_message_size
    fits = b"z" * (limit - 2) + b"\r\n"
    driver = converse([HELLO, ENVELOPE, dot_stuff(fits)])
    assert driver.codes()[-1] == (250, "2.0.0")
    assert driver.messages == [fits]
    driver = converse([HELLO, ENVELOPE, dot_stuff(b"z" + fits)])
    assert driver.codes()[-1] == (552, "5.3.4")
    assert driver.messages == []


def test_a_long_line_is_passed_on_in_pieces_not_buffered() -> None:
    """A 16 MiB line fed in 64 KiB pieces: each piece comes out at once, nothing piles up."""
    settings = ServerSettings("mx.test", Limits(max_message_size=32 * 1024 * 1024))
    driver = Driver(settings)
    driver.feed(HELLO)
    driver.feed(ENVELOPE)
    piece = b"w" * 65536
    for _ in range(256):
        before = len(driver._text)
        driver.feed(piece)
        assert driver.conn.buffered == 0
        assert len(driver._text) - before >= len(piece) - 4  # at most a terminator's start
    driver.feed(b"\r\n.\r\n")
    assert driver.codes()[-1] == (250, "2.0.0")
    assert driver.messages == [piece * 256 + b"\r\n"]


def test_oversized_text_is_552_after_the_end_and_not_kept() -> None:
    """Text over max_message_size is read and dropped; 552 5.3.4 after the end."""
    driver = converse([HELLO, ENVELOPE])
    for _ in range(100):
        driver.feed(b"z" * 100 + b"\r\n")
    text = b"".join(e.data for e in driver.events if isinstance(e, MessageData))
    assert len(text) <= 4096
    driver.feed(b".\r\nNOOP\r\n")
    assert driver.codes()[-2:] == [(552, "5.3.4"), (250, "2.0.0")]
    assert driver.messages == []


def test_client_talking_before_the_greeting_is_refused() -> None:
    """Input before the greeting (pregreet) gets 554 5.5.0 and the session closes."""
    driver = Driver(greet=False)
    driver.feed(b"EHLO spammer.test\r\n")
    assert [(r.code, r.enhanced) for r in driver.replies()] == [(554, "5.5.0")]
    assert driver.closed
    with pytest.raises(LocalProtocolError):
        driver.conn.send(Greeting())


@pytest.mark.parametrize(
    ("groups", "verb"),
    [
        ([b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"], "EHLO"),
        ([b"HELO c.test\r\nNOOP\r\n"], "HELO"),
        ([HELLO, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nSubject: x\r\n"], "DATA"),
        ([HELLO, b"STARTTLS\r\nEHLO injected.test\r\n"], "STARTTLS"),
        ([HELLO, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.test>\r\n"], "AUTH"),
        ([HELLO, b"AUTH LOGIN\r\n", b"YWxpY2U=\r\nc2VjcmV0\r\n"], "AUTH"),
    ],
)
def test_pipelining_past_a_sync_point_closes(groups: list[bytes], verb: str) -> None:
    """Bytes after EHLO/HELO/DATA/STARTTLS/AUTH before the reply: 554 5.5.0, closed, unrun.

    Not fed split: a split right after the sync command is a client that did wait.
    """
    driver = converse(groups)
    last = driver.replies()[-1]
    assert (last.code, last.enhanced) == (554, "5.5.0")
    assert driver.closed
    assert not any(isinstance(e, StartTls | AuthCredentials | MessageData) for e in driver.events)
    if verb == "EHLO":
        assert not any(isinstance(e, MailFrom) for e in driver.events)


def test_starttls_then_session_starts_over() -> None:
    """After the TLS handshake, HELO/auth/transaction are forgotten: MAIL needs EHLO again."""
    driver = converse([HELLO, b"STARTTLS\r\n"])
    assert driver.codes()[-1] == (220, "2.0.0")
    assert driver.conn.state is ServerState.TLS
    driver.conn.tls_started()
    driver.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert driver.codes()[-1] == (503, "5.5.1")
    driver.feed(HELLO)
    assert "STARTTLS" not in driver.replies()[-1].lines
    assert driver.conn.tls_active and driver.conn.protocol_name == "ESMTPS"


def test_plaintext_during_the_handshake_is_refused() -> None:
    """Bytes the engine sees between the 220 and the handshake's end close the session."""
    driver = converse([HELLO, b"STARTTLS\r\n", b"EHLO x\r\n"])
    assert driver.codes()[-1] == (554, "5.5.0")
    assert driver.closed


def test_too_many_recipients_is_452_and_not_an_error() -> None:
    """Past max_recipients each RCPT gets 452 4.5.3, and the session goes on."""
    rcpts = b"".join(b"RCPT TO:<r%d@d.test>\r\n" % i for i in range(8))
    driver = assert_same_everywhere([HELLO, b"MAIL FROM:<a@b.test>\r\n" + rcpts + b"DATA\r\n"])
    codes = driver.codes()
    assert codes[2:5] == [(250, "2.1.5")] * 3
    assert codes[5:10] == [(452, "4.5.3")] * 5
    assert codes[10] == (354, None)
    assert driver.conn.errors == 0


def test_too_many_errors_is_421_and_close() -> None:
    """The max_errors-th 5xx reply is followed by 421 4.7.0 and the session ends."""
    driver = assert_same_everywhere([HELLO, b"BOGUS\r\n" * 4, b"BOGUS\r\n", b"NOOP\r\n"])
    assert driver.codes()[1:] == [(500, "5.5.2")] * 5 + [(421, "4.7.0")]
    assert driver.closed


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"NO\x00OP\r\n", 500, "5.5.2"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 500, "5.5.2"),  # a TLS hello
        (b"\xff\xfb\x01\r\n", 500, "5.5.2"),  # telnet negotiation
        ("VRFY jörg\r\n".encode(), 501, "5.5.4"),
        ("NOOP é\r\n".encode(), 501, "5.5.4"),
        (b"EHLO\r\n", 501, "5.5.4"),
        (b"EHLO bad name\r\n", 501, "5.5.4"),
        (b"DATA now\r\n", 501, "5.5.4"),
        (b"AUTH CRAM-MD5\r\n", 504, "5.5.4"),
    ],
)
def test_garbage_gets_an_error_reply(line: bytes, code: int, enhanced: str) -> None:
    """NUL, binary, non-ASCII without SMTPUTF8 and bad arguments get exact error replies."""
    driver = assert_same_everywhere([HELLO, line])
    assert driver.codes()[-1] == (code, enhanced)
    assert not driver.closed


def test_http_request_closes_the_session() -> None:
    """A web request (cross-protocol attack) gets 421 4.7.0 and the session closes."""
    driver = assert_same_everywhere([HELLO, b"POST / HTTP/1.1\r\n"])
    assert driver.codes()[-1] == (421, "4.7.0")
    assert driver.closed


def test_eof_closes_the_session() -> None:
    """b"" from the client ends the session; a half-received message is dropped."""
    driver = converse([HELLO, ENVELOPE, b"partial text\r\n"])
    driver.eof()
    assert driver.closed and driver.messages == []


# --------------------------------------------------------------------------- AUTH


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@pytest.mark.parametrize(
    "groups",
    [
        [HELLO, b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n"],
        [HELLO, b"AUTH PLAIN\r\n", _b64("\0alice\0secret") + b"\r\n"],
        [HELLO, b"AUTH LOGIN\r\n", _b64("alice") + b"\r\n", _b64("secret") + b"\r\n"],
        [HELLO, b"AUTH LOGIN " + _b64("alice") + b"\r\n", _b64("secret") + b"\r\n"],
    ],
    ids=["plain-initial", "plain-challenge", "login", "login-initial"],
)
def test_auth_mechanisms_succeed(groups: list[bytes]) -> None:
    """PLAIN and LOGIN, with and without initial response, end in 235 and a user."""
    driver = assert_same_everywhere(groups)
    assert driver.codes()[-1] == (235, "2.7.0")
    assert driver.conn.authenticated_user == "alice"
    assert driver.conn.protocol_name == "ESMTPA"


@pytest.mark.parametrize(
    ("groups", "reply"),
    [
        ([b"AUTH PLAIN " + _b64("\0alice\0wrong") + b"\r\n"], (535, "5.7.8")),
        ([b"AUTH PLAIN not-base64!\r\n"], (501, "5.5.2")),
        ([b"AUTH PLAIN " + _b64("alice-secret") + b"\r\n"], (501, "5.5.2")),
        ([b"AUTH PLAIN\r\n", b"*\r\n"], (501, "5.0.0")),
        ([b"AUTH LOGIN\r\n", b"%%%\r\n"], (501, "5.5.2")),
        ([b"AUTH PLAIN =\r\n"], (501, "5.5.2")),
    ],
)
def test_auth_failures(groups: list[bytes], reply: tuple[int, str]) -> None:
    """Wrong password 535 5.7.8; malformed response 501 5.5.2; '*' cancels with 501 5.0.0."""
    driver = converse([HELLO, *groups])
    assert driver.codes()[-1] == reply
    assert driver.conn.authenticated_user is None
    assert driver.conn.state is ServerState.READY


def test_auth_twice_and_inside_a_transaction_are_refused() -> None:
    """A second AUTH is 503 5.5.1, and so is AUTH after MAIL."""
    good = b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n"
    driver = converse([HELLO, good, good, b"MAIL FROM:<a@b.test>\r\n", good])
    assert driver.codes()[1:] == [(235, "2.7.0"), (503, "5.5.1"), (250, "2.1.0"), (503, "5.5.1")]


def test_auth_credentials_never_show_the_password() -> None:
    """The repr of credentials (as a log would show it) has no password."""
    assert "secret" not in repr(AuthCredentials("PLAIN", "alice", "secret"))


# --------------------------------------------------------------------------- adapter misuse


def test_adapter_cannot_reply_when_nothing_is_due() -> None:
    """send() with no pending event is the adapter's bug: LocalProtocolError."""
    driver = converse([HELLO])
    with pytest.raises(LocalProtocolError):
        driver.conn.send(SmtpReply(250, None, ("Ok",)))


def test_refuse_and_shutdown_close_the_session() -> None:
    """Refuse at connect, and Shutdown at any time, write the reply and close."""
    conn = ServerConnection(SETTINGS)
    assert conn.send(Refuse(SmtpReply(421, "4.7.0", ("busy",)))) == b"421 4.7.0 busy\r\n"
    assert conn.closed and conn.next_event() is CLOSED
    driver = converse([HELLO, ENVELOPE])
    bye = driver.conn.send(Shutdown(SmtpReply(421, "4.4.2", ("timeout",))))
    assert bye == b"421 4.4.2 timeout\r\n" and driver.conn.closed


# --------------------------------------------------------------------------- properties


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_any_byte_stream_gives_replies_never_an_exception(data: bytes, cuts: list[int]) -> None:
    """Whatever bytes arrive, split anyhow, the engine answers with well-formed replies."""
    driver = Driver(rcpt=lambda a: SmtpReply(250, "2.1.5", ("Ok",)))
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        driver.feed(data[start:cut])
        start = max(start, cut)
        assert driver.conn.buffered <= 12288 + 2000
    driver.replies()


_command_words = st.sampled_from(
    [
        b"EHLO c.test\r\n",
        b"HELO c.test\r\n",
        b"MAIL FROM:<a@b.test>\r\n",
        b"RCPT TO:<c@d.test>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"AUTH LOGIN\r\n",
        b"text\r\n",
        b".\r\n",
        b"\n.\n",
        b"x" * 600,
        b"\x00\xff\r\n",
        b"BDAT 5\r\n",
        b"BDAT 3 LAST\r\n",
        b"BDAT x\r\n",
    ]
)


@settings(max_examples=300)
@given(st.lists(_command_words, max_size=25))
def test_any_command_sequence_gives_replies_never_an_exception(words: list[bytes]) -> None:
    """Random sequences of real commands and hostile pieces keep the engine consistent."""
    driver = Driver()
    for word in words:
        driver.feed(word)
        if driver.conn.state is ServerState.TLS:
            driver.conn.tls_started()
    replies = driver.replies()
    assert all(200 <= r.code <= 559 for r in replies)
    if driver.closed:  # QUIT, too many errors, a protocol violation, or an unreadable BDAT
        assert replies[-1].code in (221, 421, 554, 501)


_text_line = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=990, max_size=4200),  # around and far past RFC 5321's 998 octets
    st.builds(lambda n, dots: b"." * dots + b"q" * n, st.integers(990, 4200), st.integers(0, 2)),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=200)
@given(
    st.lists(_text_line, max_size=8),
    st.lists(st.integers(0, 12000), max_size=6),
)
def test_any_crlf_text_is_delivered_exactly(lines: list[bytes], cuts: list[int]) -> None:
    """Any CRLF text, long lines too, stuffed and split anywhere, arrives byte-identical."""
    text = b"".join(line + b"\r\n" for line in lines)
    driver = converse([HELLO, ENVELOPE])
    wire = dot_stuff(text) + b"NOOP\r\n"
    start = 0
    for cut in [*sorted(cuts), len(wire)]:
        driver.feed(wire[start:cut])
        start = max(start, cut)
        assert driver.conn.buffered <= 512
    if len(text) <= 4096:
        assert driver.messages == [text]
        assert driver.codes()[-2:] == [(250, "2.0.0"), (250, "2.0.0")]
    else:
        assert driver.codes()[-2:] == [(552, "5.3.4"), (250, "2.0.0")]


# --------------------------------------------------------------------------- CHUNKING (BDAT)


def test_bdat_chunks_deliver_the_octets_exactly() -> None:
    """BDAT chunks (pipelined, split anywhere) arrive as sent: no stuffing, bare LF kept."""
    body = b"Subject: b\r\n\r\n.dot\nbare LF\r\n"
    first, second = body[:10], body[10:]
    groups = [
        HELLO,
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
        + b"BDAT %d\r\n" % len(first)
        + first
        + b"BDAT %d LAST\r\n" % len(second)
        + second
        + b"QUIT\r\n",
    ]
    driver = assert_same_everywhere(groups)
    assert driver.messages == [body]
    assert driver.codes()[1:] == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (250, "2.0.0"),
        (250, "2.0.0"),
        (221, "2.0.0"),
    ]


def test_bdat_zero_last_ends_the_message() -> None:
    """'BDAT 0 LAST' ends a message whose octets came in earlier chunks."""
    driver = converse([HELLO, ENVELOPE.replace(b"DATA\r\n", b"BDAT 3\r\nabcBDAT 0 LAST\r\n")])
    assert driver.messages == [b"abc"]


def test_bdat_out_of_sequence_is_consumed_then_503() -> None:
    """BDAT before RCPT: its octets are read and dropped (never run as commands), then 503."""
    smuggled = b"MAIL FROM:<evil@x.test>\r\n"
    driver = assert_same_everywhere(
        [HELLO, b"BDAT %d LAST\r\n" % len(smuggled) + smuggled, b"NOOP\r\n"]
    )
    assert driver.codes()[1:] == [(503, "5.5.1"), (250, "2.0.0")]
    assert not any(isinstance(e, MailFrom) for e in driver.events)


def test_bdat_syntax_error_closes() -> None:
    """A BDAT whose size cannot be read gets 501 5.5.4 and the session ends."""
    driver = converse([HELLO, b"BDAT lots\r\nwhatever"])
    assert driver.codes()[-1] == (501, "5.5.4")
    assert driver.closed


def test_bdat_over_the_size_limit_is_552_at_last() -> None:
    """Chunks past max_message_size are consumed and dropped; LAST gets 552 5.3.4."""
    envelope = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
    chunks = b"".join(b"BDAT 1000\r\n" + b"x" * 1000 for _ in range(5)) + b"BDAT 0 LAST\r\n"
    driver = converse([HELLO, envelope + chunks, b"NOOP\r\n"])
    assert driver.codes()[-2:] == [(552, "5.3.4"), (250, "2.0.0")]
    assert driver.messages == []
    assert sum(len(e.data) for e in driver.events if isinstance(e, MessageData)) <= 4096


def test_data_inside_a_bdat_transaction_is_503_and_rset_recovers() -> None:
    """DATA after a BDAT chunk is out of sequence; RSET abandons the transaction."""
    driver = converse(
        [HELLO, ENVELOPE.replace(b"DATA\r\n", b"BDAT 1\r\nx"), b"DATA\r\n", b"RSET\r\n"]
    )
    assert driver.codes()[-2:] == [(503, "5.5.1"), (250, "2.0.0")]
    assert driver.conn.state is ServerState.READY


def test_chunks_of_a_transaction_abandoned_by_rset_are_no_part_of_the_next() -> None:
    """RFC 3030: RSET between BDAT chunks voids them; the next message counts only its own."""
    envelope = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
    driver = assert_same_everywhere(
        [HELLO, envelope + b"BDAT 5\r\n12345RSET\r\n", envelope + b"BDAT 3 LAST\r\nxyz"]
    )
    assert [e.size for e in driver.events if isinstance(e, EndOfMessage)] == [3]
    assert driver.messages == [b"xyz"]

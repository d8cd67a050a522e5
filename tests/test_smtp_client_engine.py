"""The sans-I/O ESMTP client engine: transitions, pipelining, replies, hostile input."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.address import Address
from relay.envelope import BodyType
from relay.sansio.smtp.client import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ClientEvent,
    ClientState,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    LocalProtocolError,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Rset,
    ServerReply,
    SmtpClient,
    StartTls,
    decode_challenge,
)
from relay.sansio.smtp.events import Bdat
from relay.sansio.smtp.state import (
    CLIENT_STATELESS,
    CLIENT_TRANSITIONS,
    ClientInput,
    ReplyKind,
)
from relay.sansio.smtp.wire import DataDecoder, SmtpReply, dot_stuff

S = ClientState
ALL_EXTENSIONS = (
    "PIPELINING",
    "SIZE 1000",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "STARTTLS",
    "AUTH PLAIN LOGIN",
    "CHUNKING",
)
ALICE = Address("alice", "example.test")
BOB = Address("bob", "example.test")


def ehlo_reply(extensions: tuple[str, ...]) -> bytes:
    lines = ["server.test", *extensions]
    return b"".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n".encode() for i, x in enumerate(lines)
    )


def events(client: SmtpClient) -> list[ServerReply | ConnectionClosed]:
    out: list[ServerReply | ConnectionClosed] = []
    while (event := client.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        out.append(event)
    return out


def feed(client: SmtpClient, data: bytes) -> list[ServerReply | ConnectionClosed]:
    client.receive_data(data)
    return events(client)


def ready(extensions: tuple[str, ...] = ALL_EXTENSIONS, **options: int) -> SmtpClient:
    client = SmtpClient(**options)
    [greeting] = feed(client, b"220 server.test ESMTP\r\n")
    assert isinstance(greeting, ServerReply) and greeting.command is Command.GREETING
    assert client.send(Ehlo("client.test")) == b"EHLO client.test\r\n"
    feed(client, ehlo_reply(extensions))
    assert client.state is S.READY
    return client


def test_a_pipelined_transaction_from_greeting_to_final_reply() -> None:
    """MAIL, RCPTs and DATA go out back to back; replies come out matched to their commands."""
    client = ready()
    assert client.size_limit == 1000
    assert client.auth_mechanisms == {"PLAIN", "LOGIN"}
    out = client.send(MailFrom(ALICE, size=42))
    out += client.send(RcptTo(ALICE))
    out += client.send(RcptTo(BOB))
    out += client.send(Data())
    assert out == (
        b"MAIL FROM:<alice@example.test> SIZE=42\r\n"
        b"RCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"DATA\r\n"
    )
    replies = feed(
        client,
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n",
    )
    assert [(e.command, e.reply.code) for e in replies if isinstance(e, ServerReply)] == [
        (Command.MAIL, 250),
        (Command.RCPT, 250),
        (Command.RCPT, 550),
        (Command.DATA, 354),
    ]
    assert client.state is S.TEXT
    wire = client.send(MessageData(b".hidden\r\nline\r")) + client.send(MessageData(b"\n.x"))
    wire += client.send(EndOfMessage())
    assert wire == b"..hidden\r\nline\r\n..x\r\n.\r\n"
    [final] = feed(client, b"250 2.0.0 queued\r\n")
    assert isinstance(final, ServerReply) and final.command is Command.END_OF_DATA
    assert client.state is S.READY


def test_without_pipelining_a_command_waits_for_the_previous_reply() -> None:
    """A server without PIPELINING gets one command at a time; the engine refuses more."""
    client = ready(("SIZE 1000",))
    client.send(MailFrom(ALICE))
    assert not client.may_send_now(RcptTo(ALICE))
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        client.send(RcptTo(ALICE))
    feed(client, b"250 ok\r\n")
    assert client.may_send_now(RcptTo(ALICE))
    client.send(RcptTo(ALICE))


def test_pipelining_groups_end_at_data_and_ehlo() -> None:
    """With PIPELINING, nothing may follow DATA or EHLO before its reply (RFC 2920)."""
    client = ready()
    client.send(Noop())
    assert not client.may_send_now(MailFrom(ALICE))
    feed(client, b"250 ok\r\n")
    client.send(MailFrom(ALICE))
    client.send(RcptTo(ALICE))
    assert client.may_send_now(RcptTo(BOB))
    client.send(Data())
    with pytest.raises(LocalProtocolError):
        client.send(Rset())


# --- the table, walked ---------------------------------------------------------------

SAMPLES: list[ClientEvent] = [
    Ehlo("client.test"),
    Helo("client.test"),
    StartTls(),
    Auth("PLAIN", b"\0u\0p"),
    AuthResponse(b"x"),
    MailFrom(None),
    RcptTo(ALICE),
    Data(),
    Bdat(1, False),
    MessageData(b"x"),
    EndOfMessage(),
    Rset(),
    Noop(),
    Quit(),
]


def _in(state: ClientState) -> SmtpClient:
    """An engine brought to ``state`` through its public API."""
    client = SmtpClient()
    if state is S.GREETING:
        return client
    if state is S.REFUSED:
        feed(client, b"554 go away\r\n")
        return client
    feed(client, b"220 hi\r\n")
    if state is S.HELLO:
        return client
    client.send(Ehlo("c.test"))
    if state is S.HELLO_SENT:
        return client
    feed(client, ehlo_reply(ALL_EXTENSIONS))
    mail = [MailFrom(None), RcptTo(ALICE)]
    text: list[ClientEvent | bytes] = [*mail, Data(), b"250 ok\r\n250 ok\r\n354 go\r\n"]
    steps: dict[ClientState, list[ClientEvent | bytes]] = {
        S.READY: [],
        S.STARTTLS_SENT: [StartTls()],
        S.TLS_HANDSHAKE: [StartTls(), b"220 go\r\n"],
        S.AUTH: [Auth("LOGIN")],
        S.AUTH_CHALLENGE: [Auth("LOGIN"), b"334 VXNlcg==\r\n"],
        S.MAIL: [MailFrom(None)],
        S.RCPT: mail,
        S.DATA_SENT: [*mail, Data()],
        S.TEXT: text,
        S.CHUNK: [*mail, Bdat(2, False)],
        S.BDAT: [*mail, Bdat(2, False), MessageData(b"xy")],
        S.END_OF_TEXT: [*text, EndOfMessage()],
        S.QUIT_SENT: [Quit()],
        S.CLOSED: [b"421 bye\r\n"],
    }
    if state is S.ERROR:
        with pytest.raises(RemoteProtocolError):
            feed(client, b"garbage\r\n")
    for step in steps.get(state, []):
        if isinstance(step, bytes):
            feed(client, step)
        else:
            client.send(step)
    assert client.state is state
    return client


def _to_text(client: SmtpClient) -> None:
    client.send(MailFrom(None))
    client.send(RcptTo(ALICE))
    client.send(Data())
    feed(client, b"250 ok\r\n250 ok\r\n354 go\r\n")


@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
def test_every_state_and_event_pair_follows_the_table(state: ClientState) -> None:
    """Each (state, event sent) pair in the table moves as written; every other is refused."""
    for sample in SAMPLES:
        client = _in(state)
        key = (state, type(sample))
        if key in CLIENT_TRANSITIONS:
            client.send(sample)
            assert client.state is CLIENT_TRANSITIONS[key]
        else:
            with pytest.raises(LocalProtocolError):
                client.send(sample)


_REPLY_OF_KIND = {
    ReplyKind.POSITIVE: b"250 ok\r\n",
    ReplyKind.INTERMEDIATE: b"354 go on\r\n",
    ReplyKind.NEGATIVE: b"554 no\r\n",
}


@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(ReplyKind), ids=lambda k: k.name)
def test_every_state_and_reply_pair_follows_the_table(state: ClientState, kind: ReplyKind) -> None:
    """A reply to the command outstanding moves as the table says, or is a protocol error.

    Replies to the commands in CLIENT_STATELESS move nothing but must not be 3xx.
    """
    client = _in(state)
    if not client.unanswered:
        return  # no reply is expected here (a reply would be one nobody asked for)
    command = client.unanswered[0]
    key = (state, (command, kind))
    if key in CLIENT_TRANSITIONS:
        feed(client, _REPLY_OF_KIND[kind])
        assert client.state is CLIENT_TRANSITIONS[key]
    elif command in CLIENT_STATELESS and kind is not ReplyKind.INTERMEDIATE:
        feed(client, _REPLY_OF_KIND[kind])
        assert client.state is state
    else:
        with pytest.raises(RemoteProtocolError):
            feed(client, _REPLY_OF_KIND[kind])
        assert client.state is S.ERROR


@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
def test_every_state_and_other_input_follows_the_table(state: ClientState) -> None:
    """tls_started, a 421 and the end of the stream move as the table says (or are refused)."""
    client = _in(state)
    if (state, ClientInput.TLS_STARTED) in CLIENT_TRANSITIONS:
        client.tls_started()
        assert client.state is CLIENT_TRANSITIONS[state, ClientInput.TLS_STARTED]
    else:
        with pytest.raises(LocalProtocolError):
            client.tls_started()
        assert client.state is state
    for key, data in ((ClientInput.END_OF_STREAM, b""), (ClientInput.CLOSING_REPLY, b"421 x\r\n")):
        client = _in(state)
        if state in (S.ERROR, S.CLOSED, S.TLS_HANDSHAKE) or (
            key is ClientInput.CLOSING_REPLY and state is S.QUIT_SENT
        ):
            continue  # nothing is read there (or it is the expected reply to QUIT)
        feed(client, data)
        assert client.state is CLIENT_TRANSITIONS[state, key]


def test_the_reply_table_names_only_real_states_and_commands() -> None:
    """Every reply transition starts in a state where that command can be outstanding."""
    waiting_states = {S.GREETING, S.HELLO_SENT, S.STARTTLS_SENT, S.AUTH, S.DATA_SENT}
    waiting_states |= {S.END_OF_TEXT, S.QUIT_SENT}
    replies = {state for state, key in CLIENT_TRANSITIONS if isinstance(key, tuple)}
    assert replies == waiting_states


# --- replies that change things ------------------------------------------------------------


def test_unexpected_replies_are_remote_protocol_errors() -> None:
    """A 354 to RCPT, a 250 to DATA, or a reply nobody asked for breaks the session."""
    client = ready()
    client.send(MailFrom(None))
    client.send(RcptTo(ALICE))
    with pytest.raises(RemoteProtocolError, match="RCPT"):
        feed(client, b"250 ok\r\n354 what\r\n")
    assert client.state is S.ERROR
    with pytest.raises(RemoteProtocolError):
        client.next_event()  # stays broken

    client = ready()
    client.send(MailFrom(None))
    client.send(RcptTo(ALICE))
    client.send(Data())
    with pytest.raises(RemoteProtocolError, match="DATA"):
        feed(client, b"250 ok\r\n250 ok\r\n250 ok\r\n")

    client = ready()
    with pytest.raises(RemoteProtocolError, match="nobody asked"):
        feed(client, b"250 surprise\r\n")


def test_421_ends_the_session_and_leaves_commands_unanswered() -> None:
    """A 421 to RCPT closes the engine; the pipelined DATA is reported unanswered."""
    client = ready()
    client.send(MailFrom(None))
    client.send(RcptTo(ALICE))
    client.send(Data())
    replies = feed(client, b"250 ok\r\n421 4.3.2 shutting down\r\n")
    assert [(e.command, e.reply.code) for e in replies if isinstance(e, ServerReply)] == [
        (Command.MAIL, 250),
        (Command.RCPT, 421),
    ]
    assert client.state is S.CLOSED
    assert client.unanswered == (Command.DATA,)
    with pytest.raises(LocalProtocolError):
        client.send(Rset())
    [closed] = feed(client, b"")
    assert closed == ConnectionClosed((Command.DATA,))


def test_an_unsolicited_421_is_reported_without_a_command() -> None:
    """A server timing out an idle connection says 421 unasked: an event with no command."""
    client = ready()
    [event] = feed(client, b"421 4.4.2 idle too long\r\n")
    assert isinstance(event, ServerReply) and event.command is None
    assert client.state is S.CLOSED


def test_end_of_stream_reports_the_unanswered_commands() -> None:
    """A dropped connection gives one ConnectionClosed naming what never got a reply."""
    client = ready()
    client.send(MailFrom(None))
    client.send(RcptTo(ALICE))
    assert feed(client, b"250 ok\r\n250 o") == [
        ServerReply(Command.MAIL, SmtpReply(250, None, ("ok",)))
    ]
    assert feed(client, b"") == [ConnectionClosed((Command.RCPT,))]
    assert client.next_event() is NEED_DATA


def test_bytes_after_the_starttls_reply_are_refused() -> None:
    """Replies sent with the 220 to STARTTLS (the CVE-2011-0411 injection) break the session."""
    client = ready()
    client.send(StartTls())
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        feed(client, b"220 go ahead\r\n250 injected\r\n")

    client = ready()
    client.send(StartTls())
    feed(client, b"220 go ahead\r\n")
    client.receive_data(b"250 too early\r\n")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        client.next_event()


def test_after_tls_the_session_starts_again_from_ehlo() -> None:
    """tls_started() forgets the extensions and only EHLO/HELO may follow."""
    client = ready()
    client.send(StartTls())
    feed(client, b"220 go ahead\r\n")
    assert client.state is S.TLS_HANDSHAKE
    client.tls_started()
    assert client.state is S.HELLO
    assert client.extensions == {}
    with pytest.raises(LocalProtocolError):
        client.send(MailFrom(None))
    client.send(Ehlo("c.test"))
    feed(client, ehlo_reply(("PIPELINING",)))
    assert client.offers("PIPELINING") and not client.offers("STARTTLS")


def test_helo_after_a_refused_ehlo_means_no_extensions() -> None:
    """EHLO 502 then HELO: a plain SMTP session, where ESMTP parameters are refused."""
    client = SmtpClient()
    feed(client, b"220 old server\r\n")
    client.send(Ehlo("c.test"))
    feed(client, b"502 5.5.1 what is EHLO\r\n")
    assert client.state is S.HELLO
    assert client.send(Helo("c.test")) == b"HELO c.test\r\n"
    feed(client, b"250 old.test\r\n")
    assert client.state is S.READY and not client.esmtp and client.server_name == "old.test"
    with pytest.raises(LocalProtocolError, match="SIZE"):
        client.send(MailFrom(None, size=10))


def test_mail_and_rcpt_parameters_need_their_extensions() -> None:
    """BODY, SMTPUTF8, ENVID and ORCPT are sent only when offered; UTF-8 needs SMTPUTF8."""
    client = ready()
    line = client.send(
        MailFrom(
            Address("jörg", "example.test"),
            size=5,
            body=BodyType.EIGHT_BIT_MIME,
            smtputf8=True,
            env_id="id+1=",
        )
    )
    assert (
        line
        == (
            "MAIL FROM:<jörg@example.test> SIZE=5 BODY=8BITMIME SMTPUTF8 ENVID=id+2B1+3D\r\n"
        ).encode()
    )
    assert client.send(RcptTo(ALICE, original="Alice@Example.test")) == (
        b"RCPT TO:<alice@example.test> ORCPT=rfc822;Alice@Example.test\r\n"
    )

    plain = ready(("PIPELINING",))
    for event in (
        MailFrom(None, body=BodyType.EIGHT_BIT_MIME),
        MailFrom(None, smtputf8=True),
        MailFrom(None, env_id="x"),
        MailFrom(Address("jörg", "example.test")),
    ):
        with pytest.raises(LocalProtocolError):
            plain.send(event)
    plain.send(MailFrom(None))
    assert plain.send(RcptTo(ALICE, original="a@b")) == b"RCPT TO:<alice@example.test>\r\n"


def test_a_source_route_is_never_sent() -> None:
    """An address kept with a source route goes out as the plain mailbox (RFC 5321 §3.3)."""
    client = ready()
    client.send(MailFrom(None))
    routed = Address("alice", "example.test", ("relay.test",))
    assert client.send(RcptTo(routed)) == b"RCPT TO:<alice@example.test>\r\n"


def test_auth_exchanges_are_base64() -> None:
    """AUTH PLAIN carries its initial response, LOGIN answers challenges, * cancels."""
    client = ready()
    assert client.send(Auth("PLAIN", b"\0u\0p")) == b"AUTH PLAIN AHUAcA==\r\n"
    feed(client, b"235 2.7.0 ok\r\n")
    client.send(Auth("LOGIN"))
    [challenge] = feed(client, b"334 VXNlcm5hbWU6\r\n")
    assert isinstance(challenge, ServerReply)
    assert decode_challenge(challenge.reply) == b"Username:"
    assert client.send(AuthResponse(b"user")) == base64.b64encode(b"user") + b"\r\n"
    feed(client, b"334 UGFzc3dvcmQ6\r\n")
    assert client.send(AuthResponse(None)) == b"*\r\n"
    feed(client, b"501 cancelled\r\n")
    assert client.state is S.READY
    with pytest.raises(LocalProtocolError, match="CRAM-MD5"):
        client.send(Auth("CRAM-MD5"))
    assert "p" not in repr(Auth("PLAIN", b"\0u\0secret"))


def test_bad_names_and_lines_are_local_errors() -> None:
    """A HELO name with a space or an over-long command is refused before it is sent."""
    client = SmtpClient()
    feed(client, b"220 hi\r\n")
    with pytest.raises(LocalProtocolError):
        client.send(Ehlo("bad name"))


# --- hostile input ---------------------------------------------------------------------

WELL_FORMED = st.sampled_from(
    [
        b"250 ok\r\n",
        b"250-first\r\n250 last\r\n",
        b"354 go\r\n",
        b"421 4.3.2 bye\r\n",
        b"450 4.2.0 busy\r\n",
        b"550 5.1.1 unknown\r\n",
        b"220 hello\r\n",
        b"334 VXNlcm5hbWU6\r\n",
        b"250 2.0.0 \xc3\xa9t\xc3\xa9\r\n",
    ]
)
GARBAGE = st.binary(max_size=40) | st.sampled_from(
    [
        b"\r\n",
        b"25",
        b"250",
        b"2500 x\r\n",
        b"250\n",
        b"999 x\r\n",
        b"250-a\r\n251 b\r\n",
        b"x" * 600,
    ]
)


def _drive(client: SmtpClient, pieces: list[bytes], end: bool) -> None:
    """Feed pieces; every outcome is an event, NEED_DATA or a RemoteProtocolError."""
    try:
        for piece in pieces:
            client.receive_data(piece)
            events(client)
        if end:
            client.receive_data(b"")
            events(client)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            client.next_event()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [p for p in out if p]


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(WELL_FORMED | GARBAGE, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    start=st.sampled_from(["greeting", "transaction", "starttls", "text"]),
    end=st.booleans(),
)
def test_arbitrary_server_bytes_give_events_or_a_remote_error(
    replies: list[bytes], cuts: list[int], start: str, end: bool
) -> None:
    """Whatever the server sends, split anywhere: events or a RemoteProtocolError, no crash."""
    if start == "greeting":
        client = SmtpClient()
    else:
        client = ready()
        if start == "transaction":
            for event in (MailFrom(None), RcptTo(ALICE), RcptTo(BOB), Data()):
                client.send(event)
        elif start == "starttls":
            client.send(StartTls())
        else:
            _to_text(client)
    _drive(client, _split(b"".join(replies), cuts), end)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_replies_split_anywhere_give_the_same_events(count: int, cuts: list[int]) -> None:
    """How the reply bytes are split into reads never changes the events."""
    stream = b"250 2.1.0 ok\r\n" + b"250-2.1.5 a\r\n250 2.1.5 b\r\n" * count + b"354 go\r\n"

    def run(pieces: list[bytes]) -> list[ServerReply | ConnectionClosed]:
        client = ready()
        client.send(MailFrom(None))
        for _ in range(count):
            client.send(RcptTo(ALICE))
        client.send(Data())
        out: list[ServerReply | ConnectionClosed] = []
        for piece in pieces:
            out.extend(feed(client, piece))
        return out

    assert run(_split(stream, cuts)) == run([stream])


@settings(max_examples=200, deadline=None)
@given(
    text=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    limit=st.sampled_from([998, 0, 2, 9, 40]),
)
def test_text_is_stuffed_the_same_however_it_is_chunked(
    text: bytes, cuts: list[int], limit: int
) -> None:
    """The engine's text bytes equal wire.dot_stuff of the whole text at the engine's line
    length limit, and decode back (to the text itself when no line was broken)."""
    client = ready(line_length_limit=limit)
    _to_text(client)
    wire = b"".join(client.send(MessageData(p)) for p in _split(text, cuts))
    wire += client.send(EndOfMessage())
    assert wire == dot_stuff(text, limit)
    decoded, rest = DataDecoder().feed(wire)
    assert rest == b""
    expected = text if not text or text.endswith(b"\r\n") else text + b"\r\n"
    if limit in (0, 998):  # no line of 300 octets is broken
        assert decoded == expected
    else:
        assert decoded.replace(b"\r\n ", b"") == expected.replace(b"\r\n ", b"")


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (None, b"x" * 998 + b"\r\n" + b" " + b"x" * 997 + b"\r\n" + b" " + b"x" * 5),
        (1000, b"x" * 1000 + b"\r\n" + b" " + b"x" * 999 + b"\r\n" + b" x"),
        (0, b"x" * 2000),
    ],
)
def test_long_text_lines_are_broken_at_the_configured_limit(
    limit: int | None, expected: bytes
) -> None:
    """By default a 2 000-octet line leaves as 998 + SP 997 + SP 5; 0 sends it whole."""
    client = ready() if limit is None else ready(line_length_limit=limit)
    _to_text(client)
    wire = client.send(MessageData(b"x" * 1500)) + client.send(MessageData(b"x" * 500 + b"\r\n"))
    assert wire + client.send(EndOfMessage()) == expected + b"\r\n.\r\n"


def test_a_limit_that_cannot_break_lines_is_refused_at_once() -> None:
    """SmtpClient(line_length_limit=1) raises ValueError before any byte is exchanged."""
    with pytest.raises(ValueError, match="line length limit"):
        SmtpClient(line_length_limit=1)

"""The chat engine: UUCP chat scripts parsed and run, sans-I/O, on a clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sansio.chat import (
    BREAK,
    Chat,
    ChatError,
    ChatEvent,
    ChatFailed,
    ChatFailure,
    ChatScript,
    ChatSucceeded,
    Pause,
    Send,
    SendBreak,
    parse_chat,
    parse_send,
)
from relay.sansio.chatscript import MAX_EXPECT

LOGIN = r'"" \r\c ogin:-BREAK-ogin: nuucp ssword: \P'


def _drain(chat: Chat) -> list[ChatEvent]:
    events = []
    while (event := chat.next_event()) is not None:
        events.append(event)
    return events


def _feed(chat: Chat, chunks: list[bytes]) -> tuple[list[ChatEvent], bytes]:
    """Feed chunks as a line setup does: once the chat is done, bytes go to the call."""
    events: list[ChatEvent] = []
    passed_on = b""
    for chunk in chunks:
        if not chunk:  # a transport never delivers nothing; b"" would mean the end
            continue
        if chat.done:
            passed_on += chunk
            continue
        chat.receive_data(chunk, 1.0)
        for event in _drain(chat):
            if isinstance(event, ChatSucceeded):
                passed_on += event.rest
            events.append(event)
    return events, passed_on


def test_send_escapes_become_bytes_pauses_and_breaks() -> None:
    """Send strings: \\r \\n \\s \\t \\N \\ooo \\xhh bytes, \\d and \\p pauses, \\K a break."""
    send = parse_send(r"a\sb\t\N\101\x42\d\p\Kz")
    assert send.pieces == (b"a b\t\0AB", Pause(1.0), Pause(0.25), BREAK, b"z\r")


def test_a_send_ends_in_cr_unless_it_says_c() -> None:
    """Every send string ends with a carriage return unless \\c appears in it."""
    assert parse_send("nuucp").pieces == (b"nuucp\r",)
    assert parse_send(r"nuucp\c").pieces == (b"nuucp",)
    assert parse_send("").pieces == (b"\r",)
    assert parse_send("BREAK").pieces == (BREAK,)
    assert parse_send("EOT").pieces == (b"\x04\n\x04\n",)


def test_substitutions_fill_phone_number_login_and_password() -> None:
    """\\D and \\T are the number, \\L and \\P the login and password given by the caller."""
    subs = {"D": b"5551234", "L": b"nuucp", "P": b"pw"}
    assert parse_send(r"ATDT\T", subs).pieces == (b"ATDT5551234\r",)
    assert parse_send(r"\L:\P", subs).pieces == (b"nuucp:pw\r",)
    with pytest.raises(ChatError, match=r"\\P has no value"):
        parse_send(r"\P")


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("", "empty"),
        (r"ogin: \E", r"\\E .*not supported"),
        (r"ogin: \q", "unknown escape"),
        ("ogin:-x", "pairs"),
        (r"ogin\d: x", "cannot be used in an expect"),
        ('"ogin: x', "unbalanced"),
        ("x\\", "backslash at the end"),
        (r"\x: y", "needs digits"),
        ("x" * (MAX_EXPECT + 1) + " y", "longer than"),
        ("ögin: x\u20ac", "8-bit"),
    ],
)
def test_bad_scripts_are_refused_with_a_clear_error(script: str, message: str) -> None:
    """A script that cannot be run as written raises ChatError saying what is wrong."""
    with pytest.raises(ChatError, match=message):
        parse_chat(script)


def test_a_login_chat_runs_expect_send_pairs_to_the_end() -> None:
    """The script waits for each expect and sends its send; the rest after the last match."""
    chat = Chat(parse_chat(LOGIN, {"P": b"secret"}), 0.0)
    assert _drain(chat) == [Send(b"\r")]
    chat.receive_data(b"\r\nremote login: ", 1.0)
    assert _drain(chat) == [Send(b"nuucp\r")]
    chat.receive_data(b"Password: ", 2.0)
    assert _drain(chat) == [Send(b"secret\r"), ChatSucceeded(b" ")]
    assert chat.done


def test_an_expect_timeout_runs_the_alternate_send_and_expects_again() -> None:
    """``ogin:-BREAK-ogin:``: after the timeout a break is sent and ogin: awaited anew."""
    chat = Chat(parse_chat(LOGIN, {"P": b"pw"}), 0.0, default_timeout=5.0)
    _drain(chat)
    assert chat.next_deadline() == 5.0
    chat.tick(4.9)
    assert _drain(chat) == []
    chat.tick(5.0)
    assert _drain(chat) == [SendBreak()]
    assert chat.next_deadline() == 10.0
    chat.receive_data(b"login:", 6.0)
    assert _drain(chat) == [Send(b"nuucp\r")]


def test_a_modem_that_never_answers_times_out() -> None:
    """With no alternates left, silence ends the chat with a timeout naming the expect."""
    chat = Chat(parse_chat("OK ATDT1"), 0.0, default_timeout=3.0)
    chat.receive_data(b"garbage", 1.0)
    chat.tick(3.0)
    events = _drain(chat)
    assert events == [ChatFailed(ChatFailure.TIMEOUT, b"OK")]
    assert "timed out waiting for b'OK'" in events[0].reason  # type: ignore[union-attr]
    assert chat.next_deadline() is None


def test_a_fail_string_ends_the_chat_at_once() -> None:
    """A fail string seen before the expect ends the chat, naming it."""
    script = parse_chat("CONNECT").with_fail({b"BUSY": "BUSY"})
    chat = Chat(script, 0.0)
    chat.receive_data(b"\r\nBU", 1.0)
    chat.receive_data(b"SY\r\nCONNECT", 1.0)
    assert _drain(chat) == [ChatFailed(ChatFailure.FAIL_STRING, b"CONNECT", "BUSY")]


def test_the_line_closing_ends_the_chat() -> None:
    """End of input while expecting is a failure of its own kind."""
    chat = Chat(parse_chat("ogin: x"), 0.0)
    chat.receive_data(b"", 1.0)
    assert _drain(chat) == [ChatFailed(ChatFailure.CLOSED, b"ogin:")]


def test_pauses_hold_the_rest_of_a_send_until_ticked() -> None:
    """\\d holds what follows it until a second has passed."""
    chat = Chat(parse_chat(r'"" a\db'), 10.0)
    assert _drain(chat) == [Send(b"a")]
    assert chat.next_deadline() == 11.0
    chat.tick(10.5)
    assert _drain(chat) == []
    chat.tick(11.0)
    assert _drain(chat) == [Send(b"b\r"), ChatSucceeded(b"")]


def test_matching_ignores_parity_and_keeps_the_rest_raw() -> None:
    """The eighth bit is ignored when matching; the bytes after the match are passed on raw."""
    chat = Chat(parse_chat("ogin:"), 0.0)
    chat.receive_data(bytes(b | 0x80 for b in b"login:") + b"\xff\x00frame", 1.0)
    assert _drain(chat) == [ChatSucceeded(b"\xff\x00frame")]


def test_an_empty_expect_matches_at_once_and_keeps_what_came() -> None:
    """``""`` expects nothing, so bytes already there stay for the next expect."""
    chat = Chat(parse_chat(r'"" x ogin: y'), 0.0)
    chat.receive_data(b"login:", 0.5)
    assert _drain(chat) == [Send(b"x\r"), Send(b"y\r"), ChatSucceeded(b"")]


@pytest.mark.parametrize("cut", range(len(b"junk\r\nlogin: Password:tail")))
def test_input_split_anywhere_gives_the_same_run(cut: int) -> None:
    """The same bytes split in two anywhere: the same actions, the same bytes passed on."""
    data = b"junk\r\nlogin: Password:tail"
    chat = Chat(parse_chat("ogin: me ssword: pw"), 0.0)
    events, passed_on = _feed(chat, [data[:cut], data[cut:]])
    assert [e for e in events if not isinstance(e, ChatSucceeded)] == [
        Send(b"me\r"),
        Send(b"pw\r"),
    ]
    assert chat.done and passed_on == b"tail"


def test_input_split_at_every_byte_gives_the_same_run() -> None:
    """One byte at a time is the same as all at once."""
    data = b"\r\nBUSY? no: login: Password:\x7e\x01"
    chat = Chat(parse_chat("ogin: me ssword: pw").with_fail({b"NO CARRIER": "NC"}), 0.0)
    events, passed_on = _feed(chat, [bytes([byte]) for byte in data])
    assert events == [Send(b"me\r"), Send(b"pw\r"), ChatSucceeded(b"")]
    assert passed_on == b"\x7e\x01"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40))
def test_hostile_input_never_raises_and_memory_stays_bounded(chunks: list[bytes]) -> None:
    """Any bytes in any pieces: the engine never raises and keeps less than its longest string."""
    script = parse_chat("ogin:-BREAK-ogin: me ssword: pw").with_fail({b"NO CARRIER": "NC"})
    chat = Chat(script, 0.0)
    for index, chunk in enumerate(chunks):
        chat.receive_data(chunk or b"x", float(index))
        chat.tick(float(index))
        assert len(chat._buffer) <= len(b"NO CARRIER")
        _drain(chat)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_any_script_text_parses_or_raises_chat_error(text: str) -> None:
    """The parser answers any text with a script or a ChatError, nothing else."""
    try:
        script = parse_chat(text)
    except ChatError:
        return
    assert isinstance(script, ChatScript) and script.steps

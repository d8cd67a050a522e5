"""The Hayes modem engine, sans-I/O: dialling, result codes, answering, hanging up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.reply import Action, ReplyCode
from relay.sansio.chat import Chat, ChatError, Pause, Send, SetDTR
from relay.sansio.modem import (
    RESULT_REPLIES,
    Connected,
    ModemChat,
    ModemEvent,
    ModemFailed,
    answer_script,
    dial_command,
    dial_script,
    hangup_script,
)


def _drain(modem: ModemChat) -> list[ModemEvent]:
    events = []
    while (event := modem.next_event()) is not None:
        events.append(event)
    return events


def _dialled(init: tuple[str, ...] = ("ATZ", "ATE0")) -> ModemChat:
    modem = ModemChat(dial_script(init, "5551234"), 0.0)
    assert _drain(modem) == [Send(b"ATZ\r")]
    modem.receive_data(b"ATZ\r\r\nOK\r\n", 0.1)
    assert _drain(modem) == [Send(b"ATE0\r")]
    modem.receive_data(b"\r\nOK\r\n", 0.2)
    assert _drain(modem) == [Send(b"ATDT5551234\r")]
    return modem


def test_dial_commands_from_a_setting() -> None:
    """A dial setting starting with AT is sent as is; a bare number gets ATDT; junk is refused."""
    assert dial_command("ATDP123") == b"ATDP123\r"
    assert dial_command("9,555-1234") == b"ATDT9,555-1234\r"
    for bad in ("555\r\nATH", "", "AT\x00", "x" * 70):
        with pytest.raises(ChatError):
            dial_command(bad)


def test_connect_reports_the_rate_and_passes_on_the_bytes_after_it() -> None:
    """CONNECT 115200/ARQ: the rate is read and the bytes after its line belong to the call."""
    modem = _dialled()
    modem.receive_data(b"\r\nCONNECT 1152", 5.0)
    assert _drain(modem) == []
    modem.receive_data(b"00/ARQ\r\n\x7e\x01frame", 5.1)
    assert _drain(modem) == [Connected(115200, b"\x7e\x01frame")]
    assert modem.done and modem.next_deadline() is None


def test_a_connect_line_that_never_ends_still_connects() -> None:
    """A CONNECT whose line end does not come within its time connects with no rate lost."""
    modem = _dialled()
    modem.receive_data(b"\r\nCONNECT", 5.0)
    assert _drain(modem) == []
    deadline = modem.next_deadline()
    assert deadline is not None
    modem.tick(deadline)
    assert _drain(modem) == [Connected(None, b"")]


@pytest.mark.parametrize(
    ("result", "code"),
    [
        ("BUSY", ReplyCode.AGN),
        ("NO CARRIER", ReplyCode.DHST),
        ("NO ANSWER", ReplyCode.DHST),
        ("NO DIALTONE", ReplyCode.NIO),
        ("ERROR", ReplyCode.LIO),
    ],
)
def test_each_result_code_maps_to_its_reply(result: str, code: ReplyCode) -> None:
    """Each failing result code ends the dial with the reply the deliverer acts on."""
    modem = _dialled()
    modem.receive_data(f"\r\n{result}\r\n".encode(), 5.0)
    events = _drain(modem)
    assert len(events) == 1 and isinstance(events[0], ModemFailed)
    assert events[0].reply.code is code
    assert result in events[0].reply.text


def test_busy_is_a_retry_and_no_answer_marks_the_site_down() -> None:
    """BUSY keeps the mail queued without marking the site dead; NO ANSWER marks it dead."""
    assert RESULT_REPLIES["BUSY"].action is Action.RETRY
    assert RESULT_REPLIES["NO ANSWER"].action is Action.HOST_DEAD
    assert RESULT_REPLIES["NO CARRIER"].action is Action.HOST_DEAD


def test_an_init_command_refused_fails_before_dialling() -> None:
    """ERROR to an init command: no dial command is sent, the reply is a local fault."""
    modem = ModemChat(dial_script(["AT&Q9"], "1"), 0.0)
    assert _drain(modem) == [Send(b"AT&Q9\r")]
    modem.receive_data(b"\r\nERROR\r\n", 0.1)
    events = _drain(modem)
    assert isinstance(events[0], ModemFailed) and events[0].reply.code is ReplyCode.LIO
    assert len(events) == 1


def test_a_modem_that_never_answers_the_dial_times_out() -> None:
    """No result code within the dial timeout: TIME, which marks the site down."""
    modem = ModemChat(dial_script([], "1", dial_timeout=45.0), 0.0)
    assert _drain(modem) == [Send(b"ATDT1\r")]
    assert modem.next_deadline() == 45.0
    modem.tick(44.0)
    assert _drain(modem) == []
    modem.tick(45.0)
    events = _drain(modem)
    assert isinstance(events[0], ModemFailed) and events[0].reply.code is ReplyCode.TIME


def test_a_silent_modem_times_out_on_init() -> None:
    """No OK to the init command within the command timeout: TIME."""
    modem = ModemChat(dial_script(["ATZ"], "1", command_timeout=2.0), 0.0)
    _drain(modem)
    modem.tick(2.0)
    events = _drain(modem)
    assert isinstance(events[0], ModemFailed) and events[0].reply.code is ReplyCode.TIME


def test_answering_waits_for_ring_for_ever_then_sends_ata() -> None:
    """The answer script has no deadline while waiting for RING, then ATA and CONNECT."""
    modem = ModemChat(answer_script(["ATZ"]), 0.0)
    assert _drain(modem) == [Send(b"ATZ\r")]
    modem.receive_data(b"OK\r\n", 0.1)
    assert modem.next_deadline() is None
    modem.receive_data(b"\r\nRING\r\n", 1e6)
    assert _drain(modem) == [Send(b"ATA\r")]
    modem.receive_data(b"\r\nCONNECT 9600\r\nx", 1e6 + 5)
    assert _drain(modem) == [Connected(9600, b"x")]


def test_hangup_drops_dtr_then_escapes_and_sends_ath0() -> None:
    """The hang-up script: DTR low and high again, +++ after the guard, ATH0 after OK."""
    steps = hangup_script(1.0).steps
    assert steps[0].send is not None
    assert steps[0].send.pieces == (SetDTR(False), Pause(0.5), SetDTR(True), Pause(1.0), b"+++")
    modem_events = []
    chat = Chat(hangup_script(1.0), 0.0)
    chat.tick(0.5)
    chat.tick(1.5)
    while (event := chat.next_event()) is not None:
        modem_events.append(event)
    assert modem_events == [SetDTR(False), SetDTR(True), Send(b"+++")]
    chat.tick(4.5)  # no OK: the modem had hung up on DTR already; ATH0 anyway
    assert chat.next_event() == Send(b"ATH0\r")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_any_modem_chatter_is_answered_without_raising(chunks: list[bytes]) -> None:
    """Whatever a modem says, in any pieces, the dialler acts, connects or fails; never raises."""
    modem = ModemChat(dial_script(["ATZ"], "1"), 0.0)
    events: list[ModemEvent] = []
    for index, chunk in enumerate(chunks):
        modem.receive_data(chunk or b"\r", float(index))
        modem.tick(float(index))
        events += _drain(modem)
    for _ in range(4):
        modem.tick(1e9)
        events += _drain(modem)
    assert modem.done and isinstance(events[-1], Connected | ModemFailed)

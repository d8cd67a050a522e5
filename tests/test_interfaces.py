"""The channel contract: reference channels in both modes satisfy it and behave by it."""

from __future__ import annotations

from typing import TypeVar

import pytest
from zope.interface.verify import verifyClass, verifyObject

from relay.address import parse_forward_path, parse_reverse_path
from relay.channels.discard import DiscardChannel, DiscardSession
from relay.envelope import Destination, Envelope, Recipient, Submitter
from relay.interfaces import (
    IChannel,
    IChannelSession,
    IHandoffStore,
    IMessage,
    IQueue,
    IStore,
    ITextReader,
    SequencingMode,
)
from relay.reply import Reply, ReplyCode

from support.deferreds import fired
from support.fakes import BytesMessage

T = TypeVar("T")
TEXT = b"Subject: hi\r\n\r\n" + b"x" * 200_000 + b"\r\n"


def _message() -> BytesMessage:
    envelope = Envelope(
        return_path=parse_reverse_path("<a@example.test>"),
        recipients=(
            Recipient(parse_forward_path("<b@example.test>")),
            Recipient(parse_forward_path("<c@example.test>")),
        ),
        arrival=0.0,
        submitter=Submitter("ESMTP"),
    )
    return BytesMessage("q1", envelope, TEXT)


@pytest.mark.parametrize("mode", list(SequencingMode))
def test_reference_channel_provides_the_contract(mode: SequencingMode) -> None:
    """The discard channel and its session verify against IChannel/IChannelSession."""
    channel = DiscardChannel(mode)
    assert verifyObject(IChannel, channel)
    assert verifyClass(IChannelSession, DiscardSession)
    session = fired(channel.open_session(Destination("discard", "")))
    assert verifyObject(IChannelSession, session)
    message = _message()
    assert verifyObject(IMessage, message)
    assert verifyObject(ITextReader, message.open_text())


def _answers(channel: DiscardChannel, message: BytesMessage) -> tuple[list[Reply], Reply | None]:
    """Drive one message through a session in the channel's mode, as the deliverer will."""
    session = fired(channel.open_session(Destination("discard", "")))
    assert fired(session.begin_message("m", message.envelope.return_path, message)) is None
    replies = [fired(session.add_recipient(r)) for r in message.envelope.recipients]
    assert fired(session.end_recipients()) is None
    final = None
    if channel.mode is SequencingMode.ADDRESS_THEN_TEXT:
        assert fired(session.begin_text()) is None
        for start in range(0, len(message.text), 4096):
            assert fired(session.write_text(message.text[start : start + 4096])) is None
        final = fired(session.end_text())
    assert fired(session.end_session()) is None
    return replies, final


def test_address_then_text_answers_aok_then_one_final_reply() -> None:
    """In list mode every address gets AOK and the text gets one final OK."""
    channel = DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT)
    replies, final = _answers(channel, _message())
    assert [r.code for r in replies] == [ReplyCode.AOK, ReplyCode.AOK]
    assert final is not None and final.code is ReplyCode.OK
    assert channel.octets_discarded == len(TEXT)
    assert channel.messages_discarded == 1


def test_text_per_address_reads_the_whole_text_for_each_address() -> None:
    """In per-address mode each address reads the whole text and answers MOK."""
    channel = DiscardChannel(SequencingMode.TEXT_PER_ADDRESS)
    message = _message()
    replies, final = _answers(channel, message)
    assert [r.code for r in replies] == [ReplyCode.MOK, ReplyCode.MOK]
    assert final is None
    assert channel.octets_discarded == 2 * len(TEXT)
    assert all(reader.closed for reader in message.readers)


@pytest.mark.parametrize("mode", list(SequencingMode))
def test_a_channel_never_answers_both_aok_and_mok(mode: SequencingMode) -> None:
    """A channel's positive address reply is fixed by its mode: AOK xor MOK."""
    replies, _ = _answers(DiscardChannel(mode), _message())
    expected = ReplyCode.AOK if mode is SequencingMode.ADDRESS_THEN_TEXT else ReplyCode.MOK
    assert {r.code for r in replies} == {expected}


def test_a_session_declares_whether_it_pipelines_addresses() -> None:
    """pipelines_addresses, which the deliverer reads, is part of IChannelSession."""
    assert "pipelines_addresses" in IChannelSession.names()
    assert (
        DiscardSession(DiscardChannel(SequencingMode.ADDRESS_THEN_TEXT)).pipelines_addresses
        is False
    )


def test_the_queue_stores_as_every_store_does() -> None:
    """IQueue's store is IStore's; the worker link's hooks are declared in IHandoffStore only."""
    assert IQueue["store"].interface is IStore
    assert IHandoffStore["store"].interface is IHandoffStore
    assert not IQueue.isOrExtends(IHandoffStore)

"""End to end: swaks → SMTP gateway → spool → deliverer → local channel → mailbox.

The real pieces, wired as ``relay.tap`` will wire them: the spool, the gateway asking
the local channel's :class:`LocalRecipients` at RCPT time, the deliverer driving the
local channel.  What lands in the mailbox must be the message swaks sent, byte for byte,
apart from the headers added on the way (the gateway's ``Received:``, the channel's
``Return-Path:`` and ``Delivered-To:``), LF line ends, and mboxrd quoting in an mbox.
"""

from __future__ import annotations

import mailbox
import os
import re
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue

from relay.channels.local import build_local_channel
from relay.config import parse_config
from relay.deliver import build_deliverer
from relay.gateway.service import RecordingEndpoint, build_gateway
from relay.mailbox.text import unquote_mboxrd
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue

SWAKS = "/usr/bin/swaks"
MESSAGE = (
    b"From: Sender <sender@client.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: end to end \xc3\xa9\r\n"
    b"\r\n"
    b"From the first line, which mbox must quote\r\n"
    b">From an already quoted one\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"\r\n"
    b"8bit: \xe2\x82\xac and a tab\there\r\n"
    b"last line\r\n"
)
RECEIVED = re.compile(rb"\AReceived: [^\n]*\n(?:[ \t][^\n]*\n)*")
ADDED = b"Return-Path: <sender@client.test>\nDelivered-To: alice@example.test\n"


async def _swaks(*args: str) -> tuple[int, str]:
    out, err, code = await getProcessOutputAndValue(
        SWAKS, args, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    )
    return code, (out + err).decode("utf-8", "replace")


def _delivered(mail_root: Path, mailbox_format: str) -> list[bytes]:
    """The messages in alice's mailbox, as a mail reader would get them."""
    path = mail_root / "alice"
    if mailbox_format == "maildir":
        new = path / "new"
        return [p.read_bytes() for p in new.iterdir()] if new.exists() else []
    if not path.exists():
        return []
    box = mailbox.mbox(path, create=False)
    try:
        return [unquote_mboxrd(box.get_bytes(key)) for key in box.iterkeys()]
    finally:
        box.close()


@pytest.mark.parametrize("mailbox_format", ["maildir", "mbox"])
@pytest_twisted.ensureDeferred
async def test_swaks_to_a_local_mailbox(tmp_path: Path, mailbox_format: str) -> None:
    """A message sent with swaks arrives in alice's mailbox, byte-identical but for the
    added headers; an unknown local user is refused at RCPT with 550 5.1.1."""
    config = parse_config(
        '[relay]\nhostname = "mx.example.test"\nlocal_domains = ["example.test"]\n'
        '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'[local]\nusers = ["alice"]\nformat = "{mailbox_format}"\n',
        tmp_path,
    )
    queue = await SpoolQueue.open(tmp_path / "spool", reactor)  # type: ignore[arg-type]
    ready = QueueReady.of(queue)
    channel = build_local_channel(config, ready, reactor)
    gateway = build_gateway(config, ready, channel.recipients, reactor)
    deliverer = build_deliverer(config, ready, {"local": channel}, reactor)
    gateway.startService()
    deliverer.startService()
    try:
        port = None
        for child in gateway:  # type: ignore[attr-defined]
            endpoint = getattr(child, "endpoint", None)
            if isinstance(endpoint, RecordingEndpoint):
                await threads.deferToThread(lambda: None)  # let the listen Deferred fire
                assert endpoint.port is not None
                port = endpoint.port.getHost().port
        assert port is not None
        message_file = tmp_path / "message.eml"
        message_file.write_bytes(MESSAGE.removesuffix(b"\r\n"))  # swaks adds CRLF . CRLF
        code, transcript = await _swaks(
            "--server", f"127.0.0.1:{port}",
            "--from", "sender@client.test", "--to", "alice@example.test",
            "--data", str(message_file),
        )  # fmt: skip
        assert code == 0, transcript
        code, transcript = await _swaks(
            "--server", f"127.0.0.1:{port}",
            "--from", "sender@client.test", "--to", "nobody@example.test",
        )  # fmt: skip
        assert code != 0 and "550 5.1.1" in transcript, transcript
        mail_root = tmp_path / "var/mail"
        for _ in range(2000):  # a bound, not a timing assertion: ~20 s at most
            if _delivered(mail_root, mailbox_format) and not await queue.list_messages():
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        [delivered] = _delivered(mail_root, mailbox_format)
        assert delivered.startswith(ADDED)
        rest = delivered[len(ADDED) :]
        received = RECEIVED.match(rest)
        assert received is not None, rest[:200]
        assert b"for <alice@example.test>" in received.group()
        assert rest[received.end() :] == MESSAGE.replace(b"\r\n", b"\n")
        assert await queue.list_messages() == []
    finally:
        await deliverer.stopService()
        await gateway.stopService()
        await channel.close()
        await queue.close()

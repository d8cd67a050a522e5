"""Long text lines through a real ``twistd relay``: smtplib and swaks in, mailbox and
smtp-sink out.

Lines longer than RFC 5321's 998 octets are accepted (Postfix and Exim take them),
stored as they came (the local mailbox holds them whole), and broken with ``CRLF SP``
when the SMTP channel relays them, as Postfix's ``smtp_line_length_limit`` does.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_process import RelayProcess, mailbox_texts, relay_routing_to, wait_for
from smtpsink import Sink, running_sink

SWAKS = "/usr/bin/swaks"
MAX_MESSAGE_SIZE = 10485760  # the shipped default of [smtp] max_message_size


@pytest.fixture
def sink() -> Iterator[Sink]:
    with running_sink() as sink:
        yield sink


@pytest.fixture
def relay(tmp_path: Path, sink: Sink) -> Iterator[RelayProcess]:
    """twistd relay on the shipped defaults but for paths, ports, users and one route."""
    with relay_routing_to(tmp_path, "sink.test", sink.port) as running:
        yield running


def _line(length: int, seed: str) -> bytes:
    """A line of ``length`` printable octets that differ from place to place."""
    unit = "".join(chr(33 + (i * 7 + len(seed)) % 94) for i in range(97)).encode()
    return (seed.encode() + unit * (length // 97 + 1))[:length]


def _postfix_pieces(line: bytes, limit: int = 998) -> bytes:
    """``line`` as Postfix sends it at ``limit`` (LF line ends, as smtp-sink dumps it)."""
    pieces = [line[:limit]]
    pieces += [b" " + line[at : at + limit - 1] for at in range(limit, len(line), limit - 1)]
    return b"\n".join(pieces)


def _send(client: str, port: int, text: bytes, tmp_path: Path) -> None:
    """``text`` (CRLF lines) from sender@client.test to alice here and rcpt@sink.test, by
    smtplib or by swaks; the client must report the 250 after DATA."""
    recipients = ["alice@example.test", "rcpt@sink.test"]
    if client == "smtplib":
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            smtp.ehlo("client.test")
            assert smtp.sendmail("sender@client.test", recipients, text) == {}
        return
    data = tmp_path / "message.eml"
    data.write_bytes(text.removesuffix(b"\r\n"))  # swaks ends it with CRLF . CRLF
    result = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--from", "sender@client.test",
         "--to", ",".join(recipients), "--data", str(data), "--suppress-data"],
        capture_output=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=300, check=False,
    )  # fmt: skip
    transcript = result.stdout.decode("utf-8", "replace") + result.stderr.decode()
    assert result.returncode == 0, transcript
    assert "250 2.0.0 Ok: queued as" in transcript


@pytest.mark.parametrize("client", ["smtplib", "swaks"])
def test_a_4000_octet_line_is_kept_whole_and_relayed_broken(
    tmp_path: Path, relay: RelayProcess, sink: Sink, client: str
) -> None:
    """A 4 000-octet line: 250 after DATA, whole in the mailbox, CRLF SP-broken at smtp-sink."""
    line = _line(4000, client)
    text = (
        b"From: sender@client.test\r\nTo: alice@example.test, rcpt@sink.test\r\n"
        b"Subject: a long line\r\n\r\nbefore\r\n" + line + b"\r\nafter\r\n"
    )
    _send(client, relay.port, text, tmp_path)
    wait_for(lambda: mailbox_texts(tmp_path), what="the mailbox copy")
    (stored,) = mailbox_texts(tmp_path)
    assert b"\nbefore\n" + line + b"\nafter\n" in stored
    wait_for(lambda: b"\nafter\n" in sink.dump.read_bytes(), what="the relayed copy")
    dumped = sink.dump.read_bytes()
    assert b"\nbefore\n" + _postfix_pieces(line) + b"\nafter\n" in dumped
    assert max(len(x) for x in dumped.split(b"\n")) <= 998


@pytest.mark.parametrize("client", ["smtplib", "swaks"])
def test_a_line_as_long_as_the_size_limit_allows(
    tmp_path: Path, relay: RelayProcess, sink: Sink, client: str
) -> None:
    """One body line filling max_message_size: accepted, kept whole, relayed broken."""
    headers = b"From: sender@client.test\r\nSubject: one huge line\r\n\r\n"
    line = _line(MAX_MESSAGE_SIZE - len(headers) - 2, client)
    _send(client, relay.port, headers + line + b"\r\n", tmp_path)
    wait_for(lambda: mailbox_texts(tmp_path), what="the mailbox copy")
    (stored,) = mailbox_texts(tmp_path)
    assert stored.endswith(b"\n\n" + line + b"\n")
    pieces = _postfix_pieces(line)
    wait_for(lambda: sink.dump.stat().st_size > len(pieces), limit=120, what="relayed copy")
    wait_for(lambda: pieces + b"\n" in sink.dump.read_bytes(), what="the whole relayed copy")


def test_one_octet_over_the_size_limit_is_552(relay: RelayProcess) -> None:
    """The same line one octet longer is refused with 552 5.3.4, not with a line error."""
    headers = b"Subject: one huge line\r\n\r\n"
    text = headers + _line(MAX_MESSAGE_SIZE - len(headers) - 1, "over") + b"\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo("client.test")
        assert client.mail("sender@client.test")[0] == 250  # no SIZE=: the text must tell
        assert client.rcpt("alice@example.test")[0] == 250
        code, reply = client.data(text)
    assert (code, reply.split()[0]) == (552, b"5.3.4")

"""postmaster through a real ``twistd relay`` (RFC 5321 section 4.5.1).

The local domain's one user is alice, and ``[relay] postmaster`` names her: mail to
``postmaster@`` the local domain (any case, or the domain-less ``<postmaster>``) is
accepted and lands in her mailbox, and so does a double bounce (a DSN this relay made
that could not be delivered).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_process import (
    RelayProcess,
    free_port,
    mailbox_texts,
    relay_routing_to,
    start_relay,
    wait_for,
    write_config,
)
from smtpsink import Sink, running_sink


@pytest.fixture
def refusing_sink() -> Iterator[Sink]:
    """smtp-sink refusing every RCPT with a 5xx: mail for it bounces at once."""
    with running_sink("-f", "RCPT") as sink:
        yield sink


@pytest.fixture
def relay(tmp_path: Path, refusing_sink: Sink) -> Iterator[RelayProcess]:
    """twistd relay with alice as postmaster and a route to the refusing smtp-sink."""
    with relay_routing_to(tmp_path, "bounce.test", refusing_sink.port) as running:
        yield running


def test_postmaster_is_accepted_and_delivered_to_the_configured_postmaster(
    tmp_path: Path, relay: RelayProcess
) -> None:
    """RCPT TO:<PostMaster@example.test> and <postmaster> get 250; both land with alice."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo("client.test")
        for rcpt, subject in (("PostMaster@example.test", b"one"), ("postmaster", b"two")):
            assert client.mail("someone@client.test")[0] == 250
            assert client.rcpt(rcpt) == (250, b"2.1.5 Ok")
            code, _ = client.data(b"Subject: to postmaster " + subject + b"\r\n\r\nhello\r\n")
            assert code == 250
    wait_for(lambda: len(mailbox_texts(tmp_path)) == 2, what="two messages for alice")
    texts = mailbox_texts(tmp_path)
    assert all(b"\nhello\n" in text for text in texts)
    assert sorted(text.split(b"Subject: to postmaster ")[1][:3] for text in texts) == [
        b"one",
        b"two",
    ]


def test_a_double_bounce_reaches_the_postmaster(tmp_path: Path, relay: RelayProcess) -> None:
    """Mail that bounces, from a sender nobody receives: the DSN fails, and the double
    bounce about it lands in the postmaster's (alice's) mailbox."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo("client.test")
        refused = client.sendmail(
            "ghost@example.test", ["someone@bounce.test"], b"Subject: doomed\r\n\r\nbody\r\n"
        )
        assert refused == {}
    wait_for(lambda: mailbox_texts(tmp_path), what="the double bounce")
    (text,) = mailbox_texts(tmp_path)
    assert b"Subject: Undeliverable Delivery Status Notification" in text
    assert b"ghost@example.test" in text


def test_twistd_warns_of_a_postmaster_nobody_receives(tmp_path: Path) -> None:
    """With users = ["alice"] and the default postmaster, the relay starts but logs why
    postmaster@ and double bounces would be lost (check-config fails on it)."""
    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(config.read_text().replace('postmaster = "alice@example.test"\n', ""))
    running = start_relay(config, port)
    try:
        wait_for(lambda: "relay.postmaster:" in running.log.read_text(), what="the warning")
    finally:
        running.stop()
    assert "postmaster@example.test is a local address but neither" in running.log.read_text()

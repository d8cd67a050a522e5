"""The Received: trace header (RFC 5321 section 4.4) the gateway prepends."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import SMTP

from hypothesis import given
from hypothesis import strategies as st

from relay.address import Address
from relay.received import local_received_header, received_header

WHEN = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def test_full_header_layout() -> None:
    """from/TLS/auth/by/with/for; date, folded one clause per line."""
    header = received_header(
        helo="client.test",
        client_ip="192.0.2.1",
        client_name=None,
        hostname="mx.example.test",
        protocol="ESMTPSA",
        when=WHEN,
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        auth_user="carol",
        recipient=Address("bob", "example.test"),
    )
    assert header == (
        b"Received: from client.test (unknown [192.0.2.1])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        b"\t(authenticated as carol)\r\n"
        b"\tby mx.example.test (relay) with ESMTPSA\r\n"
        b"\tfor <bob@example.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_minimal_header_without_recipient() -> None:
    """Several recipients (None here): no for clause; the date ends the by line."""
    header = received_header(
        helo="c.test",
        client_ip="2001:db8::1",
        client_name="c.example.test",
        hostname="mx.example.test",
        protocol="SMTP",
        when=WHEN,
    )
    assert header == (
        b"Received: from c.test (c.example.test [IPv6:2001:db8::1])\r\n"
        b"\tby mx.example.test (relay) with SMTP; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_ipv4_mapped_client_is_shown_as_ipv4() -> None:
    """A v4-mapped IPv6 peer (dual-stack listener) is written as the IPv4 literal."""
    header = received_header(
        helo="c", client_ip="::ffff:192.0.2.9", client_name=None, hostname="mx",
        protocol="ESMTP", when=WHEN,
    )  # fmt: skip
    assert header.startswith(b"Received: from c (unknown [192.0.2.9])\r\n")


@given(st.text(max_size=40), st.text(max_size=40))
def test_client_values_cannot_break_the_header(helo: str, user: str) -> None:
    """Whatever HELO name or user arrives, the result is one well-formed ASCII header."""
    header = received_header(
        helo=helo or None,
        client_ip="192.0.2.1",
        client_name=None,
        hostname="mx.example.test",
        protocol="ESMTPA",
        when=WHEN,
        auth_user=user or None,
    )
    header.decode("ascii")
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line[:1] in (b"\t",) for line in lines[1:-1])
    assert lines[0].count(b"(") == lines[0].count(b")") == 1
    message = message_from_bytes(header + b"\r\nbody\r\n", policy=SMTP)
    assert len(message.get_all("Received")) == 1


def test_local_submission_names_the_uid() -> None:
    """relay sendmail's mail is traced 'by host (relay, from userid N)', as Postfix does."""
    header = local_received_header(uid=1000, hostname="hub.example.test", when=WHEN)
    assert header.startswith(b"Received: by hub.example.test (relay, from userid 1000); ")
    assert header.endswith(b"\r\n") and header.count(b"\r\n") == 1


@given(st.text(max_size=40))
def test_a_bs_dialogue_adds_its_helo_and_protocol_safely(helo: str) -> None:
    """sendmail -bs: 'from HELO' and 'with ESMTP'; any HELO text stays one ASCII header."""
    header = local_received_header(
        uid=0, hostname="hub.example.test", when=WHEN, helo=helo or None, protocol="ESMTP"
    )
    header.decode("ascii")
    lines = header.split(b"\r\n")
    assert lines[-2].startswith((b"\tby ", b"Received: by ")) and b"with ESMTP; " in lines[-2]
    message = message_from_bytes(header + b"\r\nbody\r\n", policy=SMTP)
    assert len(message.get_all("Received")) == 1

"""The gateway over real sockets with real clients (smtplib, swaks) and the real spool.

Each message a client sends must be in the spool byte-identical, apart from the one
``Received:`` header the gateway prepends.  TLS uses a CA and a server certificate made
here with ``cryptography``; clients run in threads or subprocesses so the reactor runs.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface import implementer

from relay.address import Address
from relay.config import parse_config
from relay.envelope import Destination
from relay.gateway.auth import ScryptParams, make_user_line
from relay.gateway.service import RecordingEndpoint, build_gateway
from relay.interfaces import ILocalRecipients
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue
from relay.sansio.smtp.wire import ReplyParser

from support.auth_guesses import guess_in_parallel
from support.tlsfiles import TlsFiles, make_tls_files

SWAKS = "/usr/bin/swaks"
PASSWORD = "correct horse battery staple"

MESSAGE = (
    b"From: Sender <sender@client.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: interop \xc3\xa9\r\n"
    b"Message-ID: <interop@client.test>\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b".\r\n"
    b"\r\n"
    b"8bit: \xe2\x82\xac and a tab\there\r\n"
    b"last line\r\n"
)

_RECEIVED = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


@implementer(ILocalRecipients)
class LocalUsers:
    """alice and bob live here."""

    def exists(self, address: Address) -> bool:
        return address.local_part in {"alice", "bob"}


# --------------------------------------------------------------------------- TLS fixtures


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throw-away CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _client_context(tls: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca_file))


# --------------------------------------------------------------------------- the gateway


@dataclass
class Running:
    queue: SpoolQueue
    ports: dict[str, int]

    @property
    def port(self) -> int:
        return self.ports["listen"]

    async def texts(self) -> list[bytes]:
        """Every stored message's text, oldest first."""
        out = []
        for queue_id in await self.queue.list_messages():
            reader = self.queue.open_message(queue_id).open_text()
            parts = []
            while chunk := await reader.read(65536):
                parts.append(chunk)
            reader.close()
            out.append(b"".join(parts))
        return out

    async def single_text(self) -> bytes:
        """The one stored message, its Received: header checked and removed."""
        (text,) = await self.texts()
        match = _RECEIVED.match(text)
        assert match is not None, text[:200]
        return text[match.end() :]


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    smtp: str = "",
    *,
    tls: TlsFiles | None = None,
    users: bool = False,
    listen: str = 'listen = ["tcp:0:interface=127.0.0.1"]',
    greet_delay: float = 0.0,
) -> AsyncIterator[Running]:
    """A real spool and a gateway listening on an ephemeral port; stopped afterwards."""
    lines = [listen, smtp]
    if tls is not None:
        lines += [f'tls_cert_file = "{tls.cert_file}"', f'tls_key_file = "{tls.key_file}"']
    if users:
        users_file = tmp_path / "smtp-users"
        users_file.write_text(
            "# test users\n" + make_user_line("carol", PASSWORD, ScryptParams(log_n=10)) + "\n"
        )
        lines.append(f'auth_users_file = "{users_file}"')
    config = parse_config(
        '[relay]\nhostname = "mx.example.test"\nlocal_domains = ["example.test"]\n'
        "[smtp]\n" + "\n".join(lines) + "\n",
        tmp_path,
    )
    queue = await SpoolQueue.open(tmp_path / "spool", reactor)  # type: ignore[arg-type]
    service = build_gateway(
        config, QueueReady.of(queue), LocalUsers(), reactor, greet_delay=greet_delay
    )
    service.startService()
    ports: dict[str, int] = {}
    for child in service:  # type: ignore[attr-defined]
        endpoint = getattr(child, "endpoint", None)
        if isinstance(endpoint, RecordingEndpoint):
            await threads.deferToThread(lambda: None)  # let the listen Deferred fire
            assert endpoint.port is not None
            ports[child.name.split(":")[0]] = endpoint.port.getHost().port
    try:
        yield Running(queue, ports)
    finally:
        await service.stopService()
        await queue.close()


def in_thread(function: Callable[[], Any]) -> Any:
    """Run a blocking client in a thread, so the reactor serves it meanwhile."""
    return threads.deferToThread(function)


async def swaks(*args: str) -> tuple[int, str]:
    """Run swaks; return its exit status and its transcript."""
    out, err, code = await getProcessOutputAndValue(
        SWAKS, args, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    )
    return code, (out + err).decode("utf-8", "replace")


# --------------------------------------------------------------------------- smtplib


@pytest_twisted.ensureDeferred
async def test_smtplib_plain_message_is_stored_byte_identical(tmp_path: Path) -> None:
    """smtplib, plain ESMTP: the spool holds the exact text after one Received: header."""
    async with gateway(tmp_path) as running:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                return client.sendmail("sender@client.test", ["alice@example.test"], MESSAGE)

        assert await in_thread(send) == {}
        assert await running.single_text() == MESSAGE
        (text,) = await running.texts()
        assert b"with ESMTP\r\n" in text and b"for <alice@example.test>;" in text


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_and_auth_plain(tmp_path: Path, tls_files: TlsFiles) -> None:
    """STARTTLS (verified against the test CA), AUTH PLAIN, relay out: stored, with trace."""
    smtp = "trusted_networks = []"
    async with gateway(tmp_path, smtp, tls=tls_files, users=True) as running:

        def send() -> tuple[bool, dict[str, tuple[int, bytes]]]:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                client.ehlo("client.test")
                offered_auth_in_clear = client.has_extn("auth")
                client.starttls(context=_client_context(tls_files))
                client.ehlo("client.test")
                client.login("carol", PASSWORD)
                return offered_auth_in_clear, client.sendmail(
                    "carol@client.test", ["someone@far-away.test"], MESSAGE
                )

        assert await in_thread(send) == (False, {})
        assert await running.single_text() == MESSAGE
        (text,) = await running.texts()
        header = text[: _RECEIVED.match(text).end()]  # type: ignore[union-attr]
        assert b"(using TLSv1.3 with cipher " in header
        assert b"(authenticated as carol)" in header
        assert b"with ESMTPSA\r\n" in header
        (queue_id,) = await running.queue.list_messages()
        envelope, _ = await running.queue.load(queue_id)
        assert envelope.submitter.auth_user == "carol"
        assert envelope.submitter.tls is not None and envelope.submitter.tls.startswith("TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_smtplib_wrong_password_and_relay_denied(tmp_path: Path, tls_files: TlsFiles) -> None:
    """A bad password is 535 5.7.8; unauthenticated relaying is 554 5.7.1; nothing stored."""
    async with gateway(tmp_path, "trusted_networks = []", tls=tls_files, users=True) as running:

        def attempt() -> tuple[int, int]:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                client.starttls(context=_client_context(tls_files))
                try:
                    client.login("carol", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    auth_code = e.smtp_code
                client.mail("carol@client.test")
                rcpt_code, _ = client.rcpt("someone@far-away.test")
                return auth_code, rcpt_code

        assert await in_thread(attempt) == (535, 554)
        assert await running.texts() == []


@pytest_twisted.ensureDeferred
async def test_smtplib_auth_with_a_broken_users_file_is_454(tmp_path: Path) -> None:
    """A users file that cannot be parsed or read answers 454 4.7.0, never 535."""
    smtp = "trusted_networks = []\nauth_requires_tls = false"
    async with gateway(tmp_path, smtp, users=True) as running:
        users_file = tmp_path / "smtp-users"

        def attempt() -> tuple[int, int]:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                try:
                    client.login("carol", PASSWORD)
                except smtplib.SMTPAuthenticationError as e:
                    auth_code = e.smtp_code
                else:
                    auth_code = 235
                rcpt_code = client.mail("carol@client.test")[0]
                return auth_code, rcpt_code

        assert await in_thread(attempt) == (235, 250)
        users_file.write_text("carol:not-a-hash\n")
        assert await in_thread(attempt) == (454, 250)
        users_file.unlink()
        assert await in_thread(attempt) == (454, 250)


@pytest_twisted.ensureDeferred
async def test_smtplib_recipients_are_queued_with_their_destinations(tmp_path: Path) -> None:
    """The spool holds each recipient with its destination, and indexes it under it."""
    smtp = (
        'trusted_networks = ["127.0.0.0/8"]\n'
        '[[route]]\ndomain = "partner.test"\nsmarthost = "127.0.0.1:2526"\n'
        '[[route]]\ndomain = "*.sub.test"\n'
    )
    async with gateway(tmp_path, smtp) as running:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                recipients = ["alice@example.test", "p@partner.test", "q@x.sub.test", "r@far.test"]
                return client.sendmail("sender@client.test", recipients, MESSAGE)

        assert await in_thread(send) == {}
        (queue_id,) = await running.queue.list_messages()
        envelope, _ = await running.queue.load(queue_id)
        local, partner, sub, far = (
            Destination("local", ""),
            Destination("smtp", "[127.0.0.1]:2526"),
            Destination("smtp", "x.sub.test"),
            Destination("smtp", "far.test"),
        )
        assert [(str(r.address), r.destination) for r in envelope.recipients] == [
            ("alice@example.test", local),
            ("p@partner.test", partner),
            ("q@x.sub.test", sub),
            ("r@far.test", far),
        ]
        groups = await running.queue.due_by_destination(envelope.arrival + 1)
        assert {d: list(g) for d, g in groups.items()} == {
            local: [(queue_id, 0)],
            partner: [(queue_id, 1)],
            sub: [(queue_id, 2)],
            far: [(queue_id, 3)],
        }


@pytest_twisted.ensureDeferred
async def test_smtplib_implicit_tls_listener(tmp_path: Path, tls_files: TlsFiles) -> None:
    """A listen_tls endpoint speaks SMTP inside TLS from the first byte (SMTPS)."""
    smtp = 'listen_tls = ["tcp:0:interface=127.0.0.1"]'
    async with gateway(tmp_path, smtp, tls=tls_files) as running:

        def send() -> tuple[bool, dict[str, tuple[int, bytes]]]:
            context = _client_context(tls_files)
            with smtplib.SMTP_SSL("127.0.0.1", running.ports["listen_tls"], context=context) as c:
                c.ehlo("client.test")
                return c.has_extn("starttls"), c.sendmail(
                    "s@client.test", ["bob@example.test"], MESSAGE
                )

        assert await in_thread(send) == (False, {})
        assert await running.single_text() == MESSAGE


@pytest_twisted.ensureDeferred
async def test_the_server_closes_a_tls_session_after_quit(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """After QUIT over TLS the gateway closes the connection itself (its producer let go)."""
    smtp = 'listen_tls = ["tcp:0:interface=127.0.0.1"]'
    async with gateway(tmp_path, smtp, tls=tls_files) as running:

        def quit_and_wait() -> bytes:
            context = _client_context(tls_files)
            port = running.ports["listen_tls"]
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1024)  # the greeting
                tls.sendall(b"QUIT\r\n")
                received = b""
                try:
                    while chunk := tls.recv(1024):  # until the server closes
                        received += chunk
                except ssl.SSLEOFError:
                    pass
                return received

        assert (await in_thread(quit_and_wait)).startswith(b"221 2.0.0")


@pytest_twisted.ensureDeferred
async def test_smtplib_over_ipv6(tmp_path: Path) -> None:
    """An IPv6 listener works and the client shows as an IPv6 literal."""
    listen = 'listen = ["tcp6:0:interface=\\\\:\\\\:1"]'
    async with gateway(tmp_path, listen=listen) as running:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("::1", running.port) as client:
                return client.sendmail("s@client.test", ["alice@example.test"], MESSAGE)

        assert await in_thread(send) == {}
        assert await running.single_text() == MESSAGE
        (text,) = await running.texts()
        assert b"[IPv6:::1]" in text.split(b"\r\n", 1)[0]


# --------------------------------------------------------------------------- swaks


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    """MESSAGE for swaks, without its last CRLF: swaks always sends CRLF . CRLF after it."""
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE.removesuffix(b"\r\n"))
    return path


@pytest_twisted.ensureDeferred
async def test_swaks_pipelining(tmp_path: Path, message_file: Path) -> None:
    """swaks --pipeline: MAIL/RCPT/DATA in one group; the text arrives byte-identical."""
    async with gateway(tmp_path) as running:
        code, transcript = await swaks(
            "--server", f"127.0.0.1:{running.port}", "--pipeline",
            "--from", "sender@client.test", "--to", "alice@example.test,bob@example.test",
            "--data", str(message_file),
        )  # fmt: skip
        assert code == 0, transcript
        assert "250 2.0.0 Ok: queued as" in transcript
        assert await running.single_text() == MESSAGE


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_tls_and_auth(
    tmp_path: Path, tls_files: TlsFiles, message_file: Path, mechanism: str
) -> None:
    """swaks --tls --auth PLAIN/LOGIN: relays for the user, stores the exact text."""
    async with gateway(tmp_path, "trusted_networks = []", tls=tls_files, users=True) as running:
        code, transcript = await swaks(
            "--server", f"127.0.0.1:{running.port}", "--tls",
            "--auth", mechanism, "--auth-user", "carol", "--auth-password", PASSWORD,
            "--from", "carol@client.test", "--to", "someone@far-away.test",
            "--data", str(message_file),
        )  # fmt: skip
        assert code == 0, transcript
        assert "235 2.7.0 Authentication successful" in transcript
        assert await running.single_text() == MESSAGE
        (text,) = await running.texts()
        assert b"with ESMTPSA" in text and b"(authenticated as carol)" in text


@pytest_twisted.ensureDeferred
async def test_swaks_unknown_user_is_550(tmp_path: Path) -> None:
    """An unknown local user is refused during the dialogue with 550 5.1.1."""
    async with gateway(tmp_path) as running:
        code, transcript = await swaks(
            "--server", f"127.0.0.1:{running.port}",
            "--from", "s@client.test", "--to", "nobody@example.test",
        )  # fmt: skip
        assert code != 0
        assert "550 5.1.1" in transcript
        assert await running.texts() == []


# --------------------------------------------------------------------------- hostile, raw


def _raw_session(port: int, groups: list[bytes], *, wait_greeting: bool = True) -> bytes:
    """Send each group after reading the replies so far; return everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = b""
        if wait_greeting:
            received += sock.recv(4096)
        for group in groups:
            sock.sendall(group)
            try:
                received += _read_replies(sock)
            except ConnectionError:
                break
        while chunk := sock.recv(4096):  # every caller ends with something that closes
            received += chunk
        return received


def _read_replies(sock: socket.socket) -> bytes:
    """Read until at least one complete reply has arrived."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        if ReplyParser().feed(data):
            return data


def _codes(data: bytes) -> list[tuple[int, str | None]]:
    return [(r.code, r.enhanced) for r in ReplyParser().feed(data)]


@pytest_twisted.ensureDeferred
async def test_smuggling_over_a_socket_is_rejected(tmp_path: Path) -> None:
    """LF.LF smuggling over TCP: 554 5.5.0, the smuggled message never stored."""
    async with gateway(tmp_path) as running:
        payload = (
            b"Subject: real\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n"
        )
        groups = [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
            payload,
            b"QUIT\r\n",
        ]
        received = await in_thread(lambda: _raw_session(running.port, groups))
        codes = _codes(received)
        assert codes[-2:] == [(554, "5.5.0"), (221, "2.0.0")]
        assert await running.texts() == []


@pytest_twisted.ensureDeferred
async def test_starttls_injection_over_a_socket_is_refused(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """Plaintext pipelined after STARTTLS (CVE-2011-0411): 554 5.5.0 and the line drops."""
    async with gateway(tmp_path, tls=tls_files) as running:
        groups = [b"EHLO c.test\r\n", b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n"]
        received = await in_thread(lambda: _raw_session(running.port, groups))
        assert _codes(received)[-1] == (554, "5.5.0")
        assert b"220 2.0.0" not in received


@pytest_twisted.ensureDeferred
async def test_pregreet_over_a_socket_is_refused(tmp_path: Path) -> None:
    """A client that talks before the (delayed) greeting gets 554 5.5.0 and no 220."""
    async with gateway(tmp_path, "trusted_networks = []", greet_delay=0.5) as running:
        received = await in_thread(
            lambda: _raw_session(running.port, [b"EHLO fast.test\r\n"], wait_greeting=False)
        )
        assert _codes(received) == [(554, "5.5.0")]


@pytest_twisted.ensureDeferred
async def test_relay_denied_and_long_line_over_a_socket(tmp_path: Path) -> None:
    """Relay to a foreign domain from an untrusted client is 554 5.7.1; a 2 KiB line 500."""
    async with gateway(tmp_path, "trusted_networks = []") as running:
        groups = [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<s@c.test>\r\n",
            b"RCPT TO:<victim@elsewhere.test>\r\n",
            b"RCPT TO:<@example.test:victim@elsewhere.test>\r\n",
            b"RCPT TO:<victim%elsewhere.test@example.test>\r\n",
            b"NOOP " + b"x" * 2048 + b"\r\n",
            b"QUIT\r\n",
        ]
        received = await in_thread(lambda: _raw_session(running.port, groups))
        assert _codes(received)[3:] == [
            (554, "5.7.1"),
            (554, "5.7.1"),
            (550, "5.1.1"),
            (500, "5.5.2"),
            (221, "2.0.0"),
        ]


@pytest_twisted.ensureDeferred
async def test_per_client_session_limit_over_a_socket(tmp_path: Path) -> None:
    """Past max_sessions_per_client, an untrusted client's new connection gets 421 4.7.0."""
    async with gateway(tmp_path, "max_sessions_per_client = 1\ntrusted_networks = []") as running:

        def two_sessions() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as first:
                greeting = _read_replies(first)
                with socket.create_connection(("127.0.0.1", running.port), timeout=10) as second:
                    refused = _read_replies(second)
                return greeting, refused

        greeting, refused = await in_thread(two_sessions)
        assert _codes(greeting) == [(220, None)]
        assert _codes(refused) == [(421, "4.7.0")]


@pytest_twisted.ensureDeferred
async def test_bdat_over_a_socket_is_stored_byte_identical(tmp_path: Path) -> None:
    """CHUNKING: two pipelined BDAT chunks over TCP are stored exactly as sent."""
    async with gateway(tmp_path) as running:
        first, second = MESSAGE[:100], MESSAGE[100:]
        groups = [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\n"
            + b"BDAT %d\r\n" % len(first)
            + first
            + b"BDAT %d LAST\r\n" % len(second)
            + second,
            b"QUIT\r\n",
        ]
        received = await in_thread(lambda: _raw_session(running.port, groups))
        assert b"CHUNKING" in received
        assert [code for code, _ in _codes(received)][-5:] == [250, 250, 250, 250, 221]
        assert await running.single_text() == MESSAGE


# --------------------------------------------------------------------------- AUTH hardening


@pytest_twisted.ensureDeferred
async def test_smtplib_auth_plain_as_another_identity_is_535(tmp_path: Path) -> None:
    """AUTH PLAIN admin\\0carol\\0password fails with 535 (RFC 4616); carol\\0carol\\0… works."""
    smtp = "trusted_networks = []\nauth_requires_tls = false"
    async with gateway(tmp_path, smtp, users=True) as running:

        def attempt(authzid: str) -> int:
            with smtplib.SMTP("127.0.0.1", running.port) as client:
                client.ehlo("client.test")
                try:
                    code, _ = client.auth(
                        "PLAIN", lambda challenge=None: f"{authzid}\0carol\0{PASSWORD}"
                    )
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code
                return code

        assert await in_thread(lambda: attempt("admin")) == 535
        assert await in_thread(lambda: attempt("carol")) == 235
        assert await in_thread(lambda: attempt("")) == 235


@pytest_twisted.ensureDeferred
async def test_smtplib_parallel_auth_is_held_to_auth_max_failures(tmp_path: Path) -> None:
    """Twelve sessions guessing at once: five passwords are checked (535), seven get 454."""
    smtp = "trusted_networks = []\nauth_requires_tls = false\nauth_max_failures = 5"
    async with gateway(tmp_path, smtp, users=True) as running:
        # The shipped cost: each check takes long enough for all twelve to be waiting.
        (tmp_path / "smtp-users").write_text(make_user_line("carol", PASSWORD) + "\n")
        codes = await in_thread(lambda: guess_in_parallel(running.port, 12))
        assert sorted(codes) == [454] * 7 + [535] * 5

"""``[smtp_client]`` reaches the SMTP channel that build_smtp_channel makes.

Timers on a MemoryReactorClock (no sockets, time moves when the test says so); the
message cap, the name servers and the CA file against the scripted server, a test DNS
server and test certificates on loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from relay.channels.smtp import ReplyTimeouts, SmtpChannel, build_smtp_channel
from relay.config import Config, parse_config
from relay.envelope import Destination
from relay.errors import SessionFailed
from relay.interfaces import IChannelSession
from relay.reply import Action, ReplyCode

from support.dnsserver import a, mx, start_dns_server
from support.smtp_harness import Outcome, deliver, make_message, serving
from support.smtpserver import Script
from support.tlsfiles import TlsFiles, make_tls_files

T = TypeVar("T")
HEAD = '[relay]\nhostname = "relay.test"\n'
SMARTHOST = Destination("smtp", "[127.0.0.1]:2525")


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that must have fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def pending(d: Deferred[Any]) -> bool:
    """Whether ``d`` has not fired yet."""
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


def _config(tmp_path: Path, smtp_client: str, routes: str = "") -> Config:
    return parse_config(HEAD + "[smtp_client]\n" + smtp_client + routes, tmp_path)


def _channel_on_clock(tmp_path: Path, smtp_client: str) -> tuple[SmtpChannel, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return build_smtp_channel(_config(tmp_path, smtp_client), clock, resolver=object()), clock


def _open(channel: SmtpChannel, clock: MemoryReactorClock) -> tuple[IChannelSession, Any]:
    """Open a session to SMARTHOST over a StringTransport: greeting and EHLO answered."""
    opened = channel.open_session(SMARTHOST)
    proto = clock.tcpClients[-1][2].buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"220 server.test ESMTP\r\n")
    proto.dataReceived(b"250-server.test\r\n250 PIPELINING\r\n")
    session = result(opened)
    transport.clear()
    return session, (proto, transport)


def test_data_done_timeout_from_the_config_fires(tmp_path: Path) -> None:
    """data_done_timeout = 7s: no reply to the final dot for 7 s is TIME, not 10 minutes."""
    channel, clock = _channel_on_clock(tmp_path, 'data_done_timeout = "7s"\n')
    session, (proto, transport) = _open(channel, clock)
    message = make_message(["a@dest.test"])
    result(session.begin_message("m", message.envelope.return_path, message))
    accepted = session.add_recipient(message.envelope.recipients[0])
    result(session.end_recipients())
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert result(accepted).code is ReplyCode.AOK
    result(session.begin_text())
    result(session.write_text(message.text))
    final = session.end_text()
    clock.advance(6.9)
    assert pending(final)
    clock.advance(0.1)
    reply = result(final)
    assert reply.code is ReplyCode.TIME and "more than once" in reply.text
    assert transport.disconnecting


def test_connect_timeout_from_the_config_fires(tmp_path: Path) -> None:
    """connect_timeout = 4s: a connection that never completes fails the session after 4 s."""
    channel, clock = _channel_on_clock(tmp_path, 'connect_timeout = "4s"\n')
    opened = channel.open_session(SMARTHOST)
    clock.advance(3.9)
    assert pending(opened)
    clock.advance(0.1)
    with pytest.raises(SessionFailed) as caught:
        result(opened)
    assert caught.value.reply.code is ReplyCode.TIME


def test_connection_cache_time_from_the_config(tmp_path: Path) -> None:
    """connection_cache_time = 5s: an idle connection is QUIT 5 s after its session ended."""
    channel, clock = _channel_on_clock(tmp_path, 'connection_cache_time = "5s"\n')
    session, (_, transport) = _open(channel, clock)
    result(session.end_session())
    assert channel.idle_connections() == 1
    clock.advance(4.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value() == b"QUIT\r\n"
    assert channel.idle_connections() == 0


def test_connection_cache_time_zero_closes_at_once(tmp_path: Path) -> None:
    """connection_cache_time = 0: the connection is QUIT when its session ends, never cached."""
    channel, clock = _channel_on_clock(tmp_path, "connection_cache_time = 0\n")
    session, (_, transport) = _open(channel, clock)
    result(session.end_session())
    assert transport.value() == b"QUIT\r\n"
    assert channel.idle_connections() == 0


def test_explicit_options_win_over_the_config(tmp_path: Path) -> None:
    """Keyword options to build_smtp_channel replace what [smtp_client] says; the rest stays."""
    config = _config(tmp_path, 'max_messages_per_connection = 2\nrcpt_timeout = "9s"\n')
    configured = build_smtp_channel(config, MemoryReactorClock(), resolver=object())
    assert (configured.max_messages, configured.timeouts.rcpt) == (2, 9.0)
    assert configured.timeouts.data == 120.0
    chosen = build_smtp_channel(
        config, MemoryReactorClock(), resolver=object(), max_messages=5, timeouts=ReplyTimeouts()
    )
    assert (chosen.max_messages, chosen.timeouts) == (5, ReplyTimeouts())


@pytest_twisted.ensureDeferred
async def test_max_messages_per_connection_from_the_config_caps_reuse(tmp_path: Path) -> None:
    """max_messages_per_connection = 2: three messages to one destination use two connections."""
    async with serving(Script()) as (port, factory):
        config = _config(tmp_path, "max_messages_per_connection = 2\n")
        channel = build_smtp_channel(config, reactor, resolver=object())
        destination = Destination("smtp", f"[127.0.0.1]:{port}")
        outcomes: list[Outcome] = []
        for i in range(3):  # a session each: the second reuses the cached connection
            outcomes.append(await deliver(channel, destination, make_message([f"u{i}@d.test"])))
        await channel.close_idle()
    assert [o.actions() for o in outcomes] == [[Action.COMMIT]] * 3
    assert [len(s.transactions) for s in factory.sessions] == [2, 1]
    assert channel.connections_reused == 1


@pytest_twisted.ensureDeferred
async def test_dns_servers_from_the_config_answer_the_mx_lookups(tmp_path: Path) -> None:
    """dns_servers names the test's DNS server: the MX it serves is where the mail goes."""
    dns_server = start_dns_server(
        reactor, {"dest.test": [mx(10, "mx.dest.test")], "mx.dest.test": [a("127.0.0.1")]}
    )
    try:
        async with serving(Script()) as (port, factory):
            config = _config(tmp_path, f'dns_servers = ["127.0.0.1:{dns_server.port}"]\n')
            channel = build_smtp_channel(config, reactor, port=port)
            outcome = await deliver(channel, "dest.test", make_message(["a@dest.test"]))
            await channel.close_idle()
    finally:
        await dns_server.stop()
    assert outcome.actions() == [Action.COMMIT]
    assert ("dest.test", 15) in dns_server.queries  # 15: MX
    assert factory.sessions[0].transactions[0].accepted == ["a@dest.test"]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize(("trusted", "delivered"), [("ca_file", True), ("other_ca_file", False)])
@pytest_twisted.ensureDeferred
async def test_ca_file_from_the_config_verifies_required_tls(
    tmp_path: Path, tls_files: TlsFiles, trusted: str, delivered: bool
) -> None:
    """ca_file is the trust for tls = "required": its CA's certificate passes, another's not."""
    async with serving(Script(tls=tls_files.server_context())) as (port, factory):
        config = _config(
            tmp_path,
            f'ca_file = "{getattr(tls_files, trusted)}"\n',
            f'[[route]]\ndomain = "dest.test"\nsmarthost = "[127.0.0.1]:{port}"\n'
            'tls = "required"\n',
        )
        channel = build_smtp_channel(config, reactor, resolver=object())
        destination = Destination("smtp", f"[127.0.0.1]:{port}")
        outcome = await deliver(channel, destination, make_message(["a@dest.test"]))
        await channel.close_idle()
    if delivered:
        assert outcome.actions() == [Action.COMMIT]
        assert factory.sessions[0].tls
    else:
        assert outcome.session_failed and outcome.replies[0].effective_enhanced == "4.7.5"
        assert all(not s.transactions for s in factory.sessions)

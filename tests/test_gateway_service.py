"""build_gateway: listeners from the configuration, TLS files, and a spool that opens late."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import Address
from relay.config import parse_config
from relay.gateway.protocol import GatewayFactory
from relay.gateway.service import build_gateway
from relay.gateway.tls import load_server_tls
from relay.interfaces import ILocalRecipients
from relay.queue.ready import QueueReady
from relay.sansio.smtp.wire import ReplyParser


@implementer(ILocalRecipients)
class NoUsers:
    def exists(self, address: Address) -> bool:
        return False


class NeverQueue:
    def store(self, envelope: object, text: bytes) -> Any:
        raise AssertionError("not expected")


def _config(tmp_path: Path, smtp: str) -> Any:
    return parse_config(f'[relay]\nhostname = "mx.test"\n[smtp]\n{smtp}\n', tmp_path)


def _greeting(factory: GatewayFactory) -> list[tuple[int, str | None]]:
    address = IPv4Address("TCP", "127.0.0.1", 5000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return [(r.code, r.enhanced) for r in ReplyParser().feed(transport.value())]


def test_one_listener_per_endpoint_string(tmp_path: Path) -> None:
    """Each listen string becomes a named listener service; they listen when started."""
    config = _config(
        tmp_path, 'listen = ["tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\\\:\\\\:1"]'
    )
    reactor = MemoryReactorClock()
    service = build_gateway(config, QueueReady.of(NeverQueue()), NoUsers(), reactor)
    names = sorted(child.name for child in service)  # type: ignore[attr-defined]
    assert names == [
        "listen:tcp6:2526:interface=\\:\\:1",
        "listen:tcp:2525:interface=127.0.0.1",
        "sessions",
    ]
    service.startService()
    ports = sorted((port, interface) for port, _, _, interface in reactor.tcpServers)
    assert ports == [(2525, "127.0.0.1"), (2526, "::1")]
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, GatewayFactory)
    assert _greeting(factory) == [(220, None)]
    service.stopService()


def test_a_spool_that_opens_late_means_421_until_then(tmp_path: Path) -> None:
    """Until the spool has opened, sessions get 421 4.3.2."""
    reactor = MemoryReactorClock()
    ready: QueueReady[Any] = QueueReady()
    service = build_gateway(_config(tmp_path, ""), ready, NoUsers(), reactor)
    service.startService()
    factory = reactor.tcpServers[0][1]
    assert _greeting(factory) == [(421, "4.3.2")]
    ready.opened(NeverQueue())
    assert _greeting(factory) == [(220, None)]
    service.stopService()


class PendingQueue:
    """store() hands back a Deferred the test fires: a session stays busy with the spool."""

    def __init__(self) -> None:
        self.pending: list[Deferred[str]] = []

    def store(self, envelope: object, text: bytes) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.pending.append(d)
        return d


def test_stopping_the_service_ends_storing_sessions_after_their_reply(tmp_path: Path) -> None:
    """On stop, idle sessions get 421 4.3.2 at once; one waiting for the spool first gets
    the store's 250, then the 421, never a 421 for a message that was kept."""
    reactor = MemoryReactorClock()
    queue = PendingQueue()
    service = build_gateway(_config(tmp_path, ""), QueueReady.of(queue), NoUsers(), reactor)
    service.startService()
    factory = reactor.tcpServers[0][1]
    sessions = []
    for port in (1, 2):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        sessions.append((protocol, transport))
    busy_protocol, busy = sessions[1]
    busy_protocol.dataReceived(b"EHLO c.test\r\n")
    busy_protocol.dataReceived(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
    busy_protocol.dataReceived(b"text\r\n.\r\n")
    assert busy_protocol.busy and busy_protocol.storing
    service.stopService()
    idle = sessions[0][1]
    assert idle.value().endswith(b"421 4.3.2 mx.test Service shutting down\r\n")
    assert idle.disconnecting
    assert b"421" not in busy.value() and not busy.disconnecting
    queue.pending[0].callback("Q1")
    assert busy.value().endswith(
        b"250 2.0.0 Ok: queued as Q1\r\n421 4.3.2 mx.test Service shutting down\r\n"
    )
    assert busy.disconnecting


def test_a_spool_that_fails_to_open_keeps_refusing(tmp_path: Path) -> None:
    """If the spool fails to open, sessions keep getting 421 4.3.2 (and it is logged)."""
    reactor = MemoryReactorClock()
    ready: QueueReady[Any] = QueueReady()
    service = build_gateway(_config(tmp_path, ""), ready, NoUsers(), reactor)
    service.startService()
    ready.failed(Failure(OSError("spool locked")))
    assert _greeting(reactor.tcpServers[0][1]) == [(421, "4.3.2")]
    service.stopService()


def test_mismatched_key_is_refused_at_build(tmp_path: Path) -> None:
    """A key that does not belong to the certificate stops the relay at start."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name_, k in (("good.pem", key), ("other.pem", other)):
        (tmp_path / name_).write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    assert load_server_tls(tmp_path / "cert.pem", tmp_path / "good.pem") is not None
    with pytest.raises(ValueError, match="cannot use them together"):
        load_server_tls(tmp_path / "cert.pem", tmp_path / "other.pem")
    with pytest.raises(ValueError, match="no usable PEM certificate"):
        load_server_tls(tmp_path / "good.pem", tmp_path / "good.pem")
    with pytest.raises(ValueError, match="private key"):
        load_server_tls(tmp_path / "cert.pem", tmp_path / "cert.pem")


def test_listeners_share_the_text_budget_and_the_auth_throttle(tmp_path: Path) -> None:
    """All listeners count message text and failed AUTH in one place, with the given limits."""
    config = _config(
        tmp_path, 'listen = ["tcp:2525:interface=127.0.0.1", "tcp:2526:interface=127.0.0.1"]'
    )
    reactor = MemoryReactorClock()
    service = build_gateway(
        config,
        QueueReady.of(NeverQueue()),
        NoUsers(),
        reactor,
        max_text_in_memory=12345,
        auth_max_failures=7,
        auth_failure_window=60.0,
    )
    service.startService()
    first, second = (server[1] for server in reactor.tcpServers)
    assert first.text_budget is second.text_budget
    assert first.text_budget.limit == 12345
    assert first.auth_throttle is second.auth_throttle
    throttle = first.auth_throttle.throttle  # the relay's count, behind LocalAuthThrottle
    assert (throttle.max_failures, throttle.window) == (7, 60.0)
    service.stopService()


def test_limits_come_from_the_configuration(tmp_path: Path) -> None:
    """[smtp] greet_delay, max_text_in_memory and the AUTH throttle reach the listeners."""
    config = _config(
        tmp_path,
        'listen = ["tcp:2525:interface=127.0.0.1"]\n'
        'greet_delay = "3s"\nmax_text_in_memory = 4321\n'
        'auth_max_failures = 2\nauth_failure_window = "1m"',
    )
    reactor = MemoryReactorClock()
    service = build_gateway(config, QueueReady.of(NeverQueue()), NoUsers(), reactor)
    service.startService()
    factory = reactor.tcpServers[0][1]
    assert factory.text_budget.limit == 4321
    throttle = factory.auth_throttle.throttle  # the relay's count, behind LocalAuthThrottle
    assert (throttle.max_failures, throttle.window) == (2, 60.0)
    assert factory.timeouts.greet_delay == 3.0
    service.stopService()


@implementer(ILocalRecipients)
class Alice:
    def exists(self, address: Address) -> bool:
        return address.local_part == "alice"


class HeldQueue:
    """store() hands back a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[Deferred[str]] = []

    def store(self, envelope: object, text: bytes) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.calls.append(d)
        return d


def test_stop_answers_the_store_in_flight_and_ends_once_the_session_closed(
    tmp_path: Path,
) -> None:
    """Stopping: 250 for the store in flight, then 421; the stop ends once the session closed."""
    config = parse_config(
        '[relay]\nhostname = "mx.test"\nlocal_domains = ["example.test"]\n'
        '[smtp]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n',
        tmp_path,
    )
    reactor = MemoryReactorClock()
    queue = HeldQueue()
    service = build_gateway(config, QueueReady.of(queue), Alice(), reactor)
    service.startService()
    address = IPv4Address("TCP", "127.0.0.1", 5000)
    protocol = reactor.tcpServers[0][1].buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO c.test\r\n")
    protocol.dataReceived(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    protocol.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert len(queue.calls) == 1
    stopped = service.stopService()
    reactor.advance(1)
    assert not stopped.called  # the store has not answered yet
    queue.calls[0].callback("0123456789ABCD")
    assert [r.code for r in ReplyParser().feed(transport.value())][-2:] == [250, 421]
    assert transport.disconnecting
    reactor.advance(1)
    assert not stopped.called  # the answer has not left yet: the connection is open
    protocol.connectionLost()
    reactor.advance(1)
    assert stopped.called

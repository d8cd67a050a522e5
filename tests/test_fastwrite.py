"""fastwrite over real loopback sockets: Twisted's state it reads, ordering, TLS, fallbacks.

:func:`relay.runtime.fastwrite.write_now` reads private state of Twisted's ``tcp.Server``.
These tests open real TCP connections on 127.0.0.1 so that a Twisted release that
renames or changes that state fails here, loudly, instead of quietly sending every
reply the slow way (or worse, out of order).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import abstract, reactor, ssl, task, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from relay.gateway.tls import load_server_tls
from relay.runtime.fastwrite import is_idle_plain_tcp, write_now

from support.tlsfiles import TlsFiles, make_tls_files

# The state of tcp.Server that fastwrite reads: spelled out here on purpose (not
# imported from the module), so that this list is what Twisted is checked against.
TWISTED_STATE = (
    "TLS",
    "connected",
    "disconnecting",
    "_writeDisconnected",
    "_tempDataLen",
    "offset",
    "dataBuffer",
    "writeSomeData",
)


class ServerSide(Protocol):
    """The server end: hands itself to the test once connected."""

    def __init__(self, made: Deferred[ServerSide]) -> None:
        self._made = made

    def connectionMade(self) -> None:
        self._made.callback(self)


@dataclass
class ClientSide(Protocol):
    """The client end: keeps every byte received and wakes whoever waits for a total."""

    received: bytearray = field(default_factory=bytearray)
    waiting: list[tuple[int, Deferred[None]]] = field(default_factory=list)
    made: Deferred[None] = field(default_factory=Deferred)
    lost: Deferred[None] = field(default_factory=Deferred)

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._wake()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)

    def _wake(self) -> None:
        for item in list(self.waiting):
            if len(self.received) >= item[0]:
                self.waiting.remove(item)
                item[1].callback(None)

    def wait_for(self, total: int) -> Deferred[None]:
        """Fire once ``total`` bytes in all have arrived."""
        d: Deferred[None] = Deferred()
        self.waiting.append((total, d))
        self._wake()
        return d


@dataclass
class Pair:
    server: ServerSide
    client: ClientSide

    @property
    def transport(self) -> Any:
        return self.server.transport


@asynccontextmanager
async def connected(server_tls: ssl.CertificateOptions | None = None) -> AsyncIterator[Pair]:
    """A real TCP connection on 127.0.0.1 (implicit TLS on the server if given)."""
    made: Deferred[ServerSide] = Deferred()
    factory: Any = Factory.forProtocol(lambda: ServerSide(made))
    if server_tls is not None:
        factory = TLSMemoryBIOFactory(server_tls, False, factory)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    client = ClientSide()
    client_factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)  # type: ignore[attr-defined]
    server = await made
    await client.made
    try:
        yield Pair(server, client)
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.lost
        await port.stopListening()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _client_tls(files: TlsFiles) -> Any:
    authority = ssl.Certificate.loadPEM(files.ca_file.read_bytes())
    return ssl.optionsForClientTLS("localhost", trustRoot=authority)


# --------------------------------------------------------------------------- Twisted's state


@pytest_twisted.ensureDeferred
async def test_a_live_tcp_transport_still_has_the_state_fastwrite_reads() -> None:
    """tcp.Server still has every attribute fastwrite reads, meaning what it assumes."""
    async with connected() as pair:
        transport = pair.transport
        assert type(transport) is tcp.Server
        missing = [name for name in TWISTED_STATE if not hasattr(transport, name)]
        assert missing == [], f"Twisted renamed or dropped {missing}: fastwrite falls back"
        # idle: nothing waiting, in either of the two places Twisted queues bytes
        assert transport.TLS is False and transport._writeDisconnected is False
        assert transport._tempDataLen == 0
        assert transport.offset == len(transport.dataBuffer) == 0
        assert is_idle_plain_tcp(transport)
        # a write() is queued in _tempDataBuffer/_tempDataLen until the reactor's next pass
        transport.write(b"queued\r\n")
        assert transport._tempDataLen == len(b"queued\r\n")
        assert not is_idle_plain_tcp(transport)
        await pair.client.wait_for(8)
        assert transport._tempDataLen == 0 and is_idle_plain_tcp(transport)


@pytest_twisted.ensureDeferred
async def test_client_and_unix_transports_have_the_same_state() -> None:
    """tcp.Client (the SMTP channel) qualifies too; unix.Server is a tcp.Server."""
    async with connected() as pair:
        client = pair.client.transport
        assert type(client) is tcp.Client
        assert [name for name in TWISTED_STATE if not hasattr(client, name)] == []
        assert is_idle_plain_tcp(client)
        write_now(client, b"EHLO client.test\r\n")
        assert client._tempDataLen == 0 and client.dataBuffer == b""
    assert issubclass(unix.Server, tcp.Server)  # the worker link: checked live there


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_written_at_once() -> None:
    """On an idle plain connection the reply goes to the socket now, nothing is queued."""
    async with connected() as pair:
        transport = pair.transport
        write_now(transport, b"250 2.0.0 Ok\r\n")
        # nothing left for the reactor's next pass: the bytes are in the kernel already
        assert transport._tempDataLen == 0 and transport.dataBuffer == b""
        await pair.client.wait_for(14)
        assert bytes(pair.client.received) == b"250 2.0.0 Ok\r\n"


# --------------------------------------------------------------------------- ordering


@pytest_twisted.ensureDeferred
async def test_a_reply_after_a_queued_write_keeps_its_place() -> None:
    """Bytes still in Twisted's write queue go out before a reply written after them."""
    async with connected() as pair:
        transport = pair.transport
        transport.write(b"first\r\n")
        write_now(transport, b"second\r\n")  # the socket has room: only order can stop it
        await pair.client.wait_for(15)
        assert bytes(pair.client.received) == b"first\r\nsecond\r\n"


@pytest_twisted.ensureDeferred
async def test_a_reply_behind_a_partly_sent_buffer_keeps_its_place() -> None:
    """With the reader paused and Twisted holding unsent bytes, a reply waits its turn,
    even when the socket has room again before Twisted's next write pass."""
    async with connected() as pair:
        transport = pair.transport
        client_transport: Any = pair.client.transport
        # Bound what the kernel buffers (autotuning could take megabytes), so that
        # Twisted keeps most of the text below.
        client_transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        client_transport.pauseProducing()
        big = b"".join(b"%07d\r\n" % n for n in range(400_000))  # 3.6 MB
        transport.write(big)
        for _ in range(200):  # reactor passes until doWrite has sent part of it
            await task.deferLater(reactor, 0.001, lambda: None)
            if transport._tempDataLen == 0 and 0 < transport.offset < len(transport.dataBuffer):
                break
        else:
            pytest.fail("Twisted never held a partly sent buffer")
        # Make room in the socket behind Twisted's back: a wrong fast path could now
        # send the reply ahead of the bytes Twisted still holds.
        drained = bytearray()
        while True:
            try:
                piece = client_transport.socket.recv(1 << 16)
            except BlockingIOError:
                break
            if not piece:
                break
            drained += piece
        assert drained and transport.offset < len(transport.dataBuffer)
        write_now(transport, b"250 2.0.0 after\r\n")
        client_transport.resumeProducing()
        await pair.client.wait_for(len(big) + 17 - len(drained))
        assert bytes(drained + pair.client.received) == big + b"250 2.0.0 after\r\n"


# --------------------------------------------------------------------------- TLS and fallbacks


@pytest_twisted.ensureDeferred
async def test_starttls_transport_takes_the_normal_path(tls_files: TlsFiles) -> None:
    """After STARTTLS the reply is encrypted by Twisted (never written raw to the socket)."""
    async with connected() as pair:
        transport = pair.transport
        raw: list[bytes] = []
        original = transport.writeSomeData

        def spy(data: bytes) -> Any:
            raw.append(bytes(data))
            return original(data)

        transport.writeSomeData = spy
        transport.startTLS(load_server_tls(tls_files.server_pem, tls_files.server_pem))
        pair.client.transport.startTLS(_client_tls(tls_files))  # type: ignore[union-attr]
        assert transport.TLS is True
        assert not is_idle_plain_tcp(transport)
        write_now(transport, b"220 2.0.0 secret reply\r\n")
        await pair.client.wait_for(24)
        assert bytes(pair.client.received) == b"220 2.0.0 secret reply\r\n"
        assert raw and not any(b"secret reply" in chunk for chunk in raw)


@pytest_twisted.ensureDeferred
async def test_implicit_tls_transport_takes_the_normal_path(tls_files: TlsFiles) -> None:
    """Under a TLS wrapper (SMTPS listener) the transport is not tcp.Server: write() is used."""
    async with connected(
        server_tls=load_server_tls(tls_files.server_pem, tls_files.server_pem)
    ) as pair:
        transport = pair.transport
        assert type(transport) is not tcp.Server
        assert not is_idle_plain_tcp(transport)
        pair.client.transport.startTLS(_client_tls(tls_files))  # type: ignore[union-attr]
        write_now(transport, b"220 mx ESMTP\r\n")
        await pair.client.wait_for(14)
        assert bytes(pair.client.received) == b"220 mx ESMTP\r\n"


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, data: bytes) -> int:
        self.calls.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("name", TWISTED_STATE)
def test_any_missing_attribute_falls_back_to_write(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If Twisted drops any attribute fastwrite reads, the write goes through write()."""
    left, right = socket.socketpair()
    try:
        transport = tcp.Server(
            left,
            Protocol(),
            ("127.0.0.1", 1),
            None,
            1,
            MemoryReactor(),  # type: ignore[arg-type]
        )
        written, sent = _Recorder(), _Recorder()
        monkeypatch.setattr(transport, "write", written)
        monkeypatch.setattr(transport, "writeSomeData", sent)
        assert is_idle_plain_tcp(transport)  # the control: idle, the fast path
        write_now(transport, b"fast\r\n")
        assert (sent.calls, written.calls) == ([b"fast\r\n"], [])
        if name in vars(transport):
            monkeypatch.delattr(transport, name)
        for cls in type(transport).__mro__:
            if name in vars(cls):
                monkeypatch.delattr(cls, name)
        assert not hasattr(transport, name)
        write_now(transport, b"slow\r\n")
        assert (sent.calls, written.calls) == ([b"fast\r\n"], [b"slow\r\n"])
    finally:
        left.close()
        right.close()


def test_abstract_state_is_where_fastwrite_expects_it() -> None:
    """The queue-state defaults live on FileDescriptor, which tcp.Server still derives from."""
    assert issubclass(tcp.Server, abstract.FileDescriptor)
    for name in ("_writeDisconnected", "offset", "dataBuffer", "disconnecting", "connected"):
        assert name in vars(abstract.FileDescriptor), name

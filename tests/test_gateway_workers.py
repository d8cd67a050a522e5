"""Gateway worker processes: real processes accepting on the relay's port, storing in its spool.

The relay is built as twistd builds it (``relay.tap.build_service``) with ``[smtp]
workers = 1``; mail goes in with smtplib.  To be sure the worker (not the relay's own
gateway) takes the connections, the first test makes the deliverer look busy: then the
relay's own process stops accepting once a worker is READY (relay.gateway.workers).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent
from twisted.python.failure import Failure

from relay.config import parse_config
from relay.deliver.service import DelivererService
from relay.gateway.limits import AuthThrottle
from relay.gateway.protocol import SessionLimiter
from relay.gateway.service import Gateway
from relay.gateway.workers import GatewayWorkers
from relay.handoff.codec import Hello, encode, framed
from relay.metrics.collectors import RelayCollector
from relay.queue.ready import QueueReady
from relay.tap import build_service

from support.ports import free_port
from support.reactor_helpers import logged_events, until


def _config(tmp_path: Path, port: int, workers: int) -> Any:
    return parse_config(
        f"""
[relay]
hostname = "hub.example.test"
local_domains = ["example.test"]
spool = "spool"
[smtp]
listen = ["tcp:{port}:interface=127.0.0.1"]
workers = {workers}
[local]
mail_root = "mail"
users = ["alice"]
""",
        tmp_path,
    )


async def _until(check: Any, limit: float = 20.0) -> None:
    await until(check, limit)


def _ready_workers(events: list[LogEvent]) -> list[int]:
    return [
        e["index"]
        for e in events
        if e.get("log_format") == "smtp worker {index}: {line}" and "accepting on" in e["line"]
    ]


def _send(port: int, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            body = f"Subject: {n}\r\nX-Marker: {n}\r\n\r\nmessage {n}\r\n"
            client.sendmail("sender@far.test", ["alice@example.test"], body)


def _maildir(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "mail" / "alice" / "new"
    return [p.read_bytes() for p in new.iterdir()] if new.exists() else []


def _main_ports(service: Any) -> list[Any]:
    return [
        child.endpoint.port
        for child in service.getServiceNamed("smtp")
        if child.name.startswith("listen:")
    ]


def _main_reads(service: Any) -> bool:
    """Whether the relay's own process is accepting on its (only) SMTP socket."""
    (port,) = _main_ports(service)
    return port in reactor.getReaders()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_busy_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int]:
    """The relay with one worker, started, its deliverer looking busy (so the worker
    takes the connections once it is READY); and its SMTP port."""
    monkeypatch.setattr(DelivererService, "busy", property(lambda self: True))
    port = free_port()
    service = build_service(_config(tmp_path, port, workers=1), reactor)
    service.startService()
    return service, port


@pytest_twisted.ensureDeferred
async def test_a_worker_takes_mail_into_the_spool_and_is_restarted_when_it_dies(
    tmp_path: Path, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker takes connections while the relay is busy, stores into the spool, and is
    started again after it dies."""
    service, port = _start_busy_relay(tmp_path, monkeypatch)
    pids: list[int] = []
    try:
        workers = service.getServiceNamed("smtp").getServiceNamed("workers")
        assert isinstance(workers, GatewayWorkers)
        assert _main_reads(service)  # until a worker is READY, the relay accepts itself
        await _until(lambda: _ready_workers(events) == [1])
        await _until(lambda: not _main_reads(service))  # busy delivering: left to the worker
        assert not workers.main_accepting
        first = workers.workers[1]
        pids.append(first.pid)

        await deferToThread(_send, port, 20)
        await _until(lambda: len(_maildir(tmp_path)) == 20)
        assert first.server.stored == 20
        assert first.server.early == 20  # each STORED went straight from the writer thread
        gateway = service.getServiceNamed("smtp")
        assert sum(getattr(getattr(c, "factory", None), "accepted", 0) for c in gateway) == 0
        texts = _maildir(tmp_path)
        assert sorted(t.split(b"X-Marker: ")[1].split(b"\n")[0] for t in texts) == sorted(
            str(n).encode() for n in range(20)
        )
        assert all(b"Received: from" in t and b"by hub.example.test" in t for t in texts)
        stored_lines = [e for e in events if str(e.get("summary", "")).startswith("smtp: ")]
        assert len(stored_lines) == 20  # logged once each, by the spool's process

        os.kill(pids[0], signal.SIGKILL)
        await _until(lambda: _main_reads(service))  # no worker: the relay accepts again
        await _until(lambda: 1 in workers.workers and workers.workers[1] is not first)
        await _until(lambda: _ready_workers(events) == [1, 1])
        await _until(lambda: not _main_reads(service))
        second = workers.workers[1]
        pids.append(second.pid)
        assert any("exited" in str(e.get("log_format")) for e in events)
        await deferToThread(_send, port, 1, 20)
        await _until(lambda: len(_maildir(tmp_path)) == 21)
        assert second.server.stored == 1

        # A worker whose link to the spool closes exits (and is started again).
        assert second.server.transport is not None
        second.server.transport.loseConnection()
        await _until(lambda: not _alive(pids[1]))
        await _until(lambda: _ready_workers(events) == [1, 1, 1])
        pids.append(workers.workers[1].pid)
    finally:
        await service.stopService()
    assert not any(_alive(pid) for pid in pids)


@pytest_twisted.ensureDeferred
async def test_with_nothing_to_deliver_both_processes_accept(
    tmp_path: Path, events: list[LogEvent]
) -> None:
    """An idle deliverer: the relay keeps accepting beside its READY worker."""
    service = build_service(_config(tmp_path, free_port(), workers=1), reactor)
    service.startService()
    try:
        workers = service.getServiceNamed("smtp").getServiceNamed("workers")
        await _until(lambda: _ready_workers(events) == [1])
        await task.deferLater(reactor, 0.3, lambda: None)  # a few balance checks
        assert workers.main_accepting and _main_reads(service)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_no_workers_means_no_worker_service(tmp_path: Path) -> None:
    """With workers = 0 the gateway has its sessions and no workers service."""
    service = build_service(_config(tmp_path, free_port(), workers=0), reactor)
    names = [child.name for child in service.getServiceNamed("smtp")]
    assert "workers" not in names and "sessions" in names


def test_the_processes_share_the_session_and_memory_limits(tmp_path: Path) -> None:
    """Each of the processes gets its share of the session limit and of the text budget."""
    from relay.channels.local.users import build_local_recipients
    from relay.gateway.service import build_gateway

    config = _config(tmp_path, free_port(), workers=3)
    gateway = build_gateway(
        config,
        QueueReady.of(object()),
        build_local_recipients(config),
        reactor,
        processes=4,  # type: ignore[arg-type]
    )
    factory = next(c.factory for c in gateway if c.name.startswith("listen:"))  # type: ignore[attr-defined]
    assert factory.limiter.max_sessions == config.smtp.max_sessions // 4
    assert factory.limiter.max_per_client == config.smtp.max_sessions_per_client
    assert factory.text_budget.limit == config.smtp.max_text_in_memory // 4
    assert factory.log_stored is True


def _run_worker(args: list[str], hello: bytes | None) -> subprocess.CompletedProcess[str]:
    ours, theirs = socket.socketpair()
    with ours:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay.gateway.worker", "--link", str(theirs.fileno()), *args],
            pass_fds=[theirs.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        if hello is not None:
            ours.sendall(framed(hello))
        else:
            ours.shutdown(socket.SHUT_RDWR)
        _, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, "", err)


def test_a_worker_given_a_configuration_it_cannot_load_exits_78(tmp_path: Path) -> None:
    """A worker whose HELLO carries a configuration it cannot load exits 78 and names the key."""
    hello = Hello("[relay]\nhostname = 'x.test'\n[smtp]\nworkerz = 1\n", str(tmp_path), (), 1, 2)
    done = _run_worker([], encode(hello))
    assert done.returncode == 78
    assert "critical configuration: smtp.workerz: unknown key" in done.stderr


def test_a_worker_exits_when_its_link_closes_before_hello() -> None:
    """A worker whose link closes before the HELLO exits 0."""
    done = _run_worker([], None)
    assert done.returncode == 0


def test_a_worker_with_bad_arguments_exits_64() -> None:
    """A worker given a malformed --listen exits 64 and says the form it wants."""
    done = _run_worker(["--listen", "4:two:plain"], None)
    assert done.returncode == 64
    assert "FD:FAMILY" in done.stderr


def test_the_config_text_survives_the_hello(tmp_path: Path) -> None:
    """The configuration a worker rebuilds from the HELLO equals the relay's own."""
    config = _config(tmp_path, 2525, workers=1)
    hello = Hello(config.text, str(config.base_dir), ("local",), 1, 2)
    assert parse_config(hello.config_text, Path(hello.base_dir)) == config
    assert json.loads(encode(hello)[1:])["base_dir"] == str(tmp_path)


def test_no_workers_start_when_the_spool_does_not_open(tmp_path: Path) -> None:
    """A spool that fails to open leaves no worker to start, and no unhandled failure."""
    from twisted.internet.testing import MemoryReactorClock

    fake = MemoryReactorClock()
    opened: QueueReady[Any] = QueueReady()
    config = _config(tmp_path, 2525, workers=1)
    auth = AuthThrottle(fake)
    gateway = Gateway(SessionLimiter(10, 10))
    workers = GatewayWorkers(config, 1, gateway, opened, frozenset(), fake, auth=auth)
    workers.startService()
    with logged_events() as seen:
        opened.failed(Failure(OSError("spool locked")))
        gc.collect()  # an unhandled failure in a Deferred would be logged now
    assert workers.workers == {}
    assert not [e for e in seen if e.get("log_failure") is not None]
    workers.stopService()


def test_a_worker_that_cannot_be_started_is_tried_again_later(tmp_path: Path) -> None:
    """spawnProcess failing (no descriptors, no memory) is logged and retried after 1 s."""
    from twisted.internet.testing import MemoryReactorClock

    class NoProcesses(MemoryReactorClock):
        attempts = 0

        def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
            pass

        def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
            self.attempts += 1
            raise OSError(24, "Too many open files")

    fake = NoProcesses()
    with logged_events() as seen:
        config = _config(tmp_path, 2525, workers=1)
        auth = AuthThrottle(fake)
        gateway = Gateway(SessionLimiter(10, 10))
        ready = QueueReady.of(object())
        workers = GatewayWorkers(config, 1, gateway, ready, frozenset(), fake, auth=auth)
        workers.startService()
        assert fake.attempts == 1 and workers.workers == {}
        fake.advance(1.0)
        assert fake.attempts == 2
        fake.advance(2.0)  # it keeps failing at once: the delay doubles
        assert fake.attempts == 3
        workers.stopService()
        fake.advance(60.0)
        assert fake.attempts == 3  # stopped: no more tries
    assert any("could not be started" in str(e.get("log_format")) for e in seen)


def _greetings(port: int, count: int) -> list[bytes]:
    """Open ``count`` connections and keep them open; the first line each one got."""
    held: list[socket.socket] = []
    lines: list[bytes] = []
    try:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(client)
            lines.append(client.recv(200).split(b"\r\n")[0])
    finally:
        for client in held:
            client.close()
    return lines


@pytest_twisted.ensureDeferred
async def test_a_full_worker_hands_the_sockets_back_before_it_refuses(
    tmp_path: Path, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_sessions 4 over two processes, deliverer busy: four clients get 220, a fifth 421."""
    monkeypatch.setattr(DelivererService, "busy", property(lambda self: True))
    port = free_port()
    text = _config(tmp_path, port, workers=1).text.replace(
        "workers = 1", "workers = 1\nmax_sessions = 4\nmax_sessions_per_client = 10"
    )
    service = build_service(parse_config(text, tmp_path), reactor)
    service.startService()
    try:
        await _until(lambda: _ready_workers(events) == [1])
        await _until(lambda: not _main_reads(service))
        greetings = await deferToThread(_greetings, port, 5)
        assert [line[:3] for line in greetings] == [b"220"] * 4 + [b"421"], greetings
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_workers_sessions_reach_the_metrics_of_the_relay(
    tmp_path: Path, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session open in a worker is counted by the relay's collector, and its end too."""
    service, port = _start_busy_relay(tmp_path, monkeypatch)
    try:
        gateway = service.getServiceNamed("smtp")
        collector = RelayCollector(reactor, service.getServiceNamed("spool"), gateway)
        await _until(lambda: not _main_reads(service))  # only the worker accepts now
        client = await deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=30)
        await _until(lambda: collector.snapshot().sessions_open == 1)
        worker = gateway.getServiceNamed("workers").workers[1]
        assert worker.server.sessions.open == 1  # it came from the worker's report
        await deferToThread(client.quit)
        await _until(lambda: collector.snapshot().sessions_open == 0)
    finally:
        await service.stopService()

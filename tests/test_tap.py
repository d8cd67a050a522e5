"""``twistd relay`` and ``twistd relay-slave``: plugins, service tree, start and clean stop."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.application.service import IService, ServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from relay import slave_tap, tap
from relay.runtime.services import OrderedMultiService

from support.relay_process import stop_process

DATA = Path(__file__).parent / "data" / "config"
TWISTD = str(Path(sys.executable).parent / "twistd")


def _plugins() -> dict[str, ServiceMaker]:
    from twisted.application.service import IServiceMaker

    return {p.tapname: p for p in getPlugins(IServiceMaker)}  # type: ignore[attr-defined]


def test_plugins_are_found() -> None:
    """Twisted's plugin system finds both relay plugins, each with a description."""
    plugins = _plugins()
    assert plugins["relay"].description
    assert plugins["relay-slave"].description
    assert plugins["relay"].options is tap.Options


def test_service_tree_has_named_children() -> None:
    """The tree is an OrderedMultiService named relay whose children are named services.

    The children stop in the reverse order (``tests/test_services.py``): the gateway,
    the deliverer, the channels, the spool; the gateway's own children likewise."""
    options = tap.Options()
    options.parseOptions(["--config", str(DATA / "spec.toml")])
    service = tap.makeService(options)
    assert isinstance(service, OrderedMultiService)
    assert isinstance(service.getServiceNamed("smtp"), OrderedMultiService)
    assert service.name == "relay"
    assert [child.name for child in service] == [
        "status",
        "spool",
        "channels",
        "deliverer",
        "phone",
        "smtp",
        "report",
        "pickup",
    ]
    assert IService(service.getServiceNamed("spool")).name == "spool"


def test_bad_config_is_a_usage_error_listing_every_problem() -> None:
    """twistd relay with a broken file refuses to start and names every problem."""
    options = tap.Options()
    with pytest.raises(usage.UsageError) as caught:
        options.parseOptions(["--config", str(DATA / "broken.toml")])
    assert len(str(caught.value).splitlines()) == 3


def test_slave_answers_without_smtp() -> None:
    """relay-slave builds the relay answering on --answer, with no SMTP listener."""
    options = slave_tap.Options()
    options.parseOptions(["--config", str(DATA / "spec.toml"), "--answer", "tcp:2600"])
    assert options.config.smtp.listen == () and str(options.config.phone.answer[0]) == "tcp:2600"
    service = slave_tap.makeService(options)
    names = [child.name for child in service]  # type: ignore[attr-defined]
    assert "phone" in names and "deliverer" in names


def test_twistd_help_lists_both_plugins() -> None:
    """``twistd --help`` lists relay and relay-slave with one-line descriptions."""
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "relay-slave" in out
    assert any(line.split()[:1] == ["relay"] for line in out.splitlines())


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], limit: float = 30) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"{text!r} not logged; log was:\n{path.read_text() if path.exists() else ''}"
    )


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nhostname = "t.example.test"\nlocal_domains = ["example.test"]\n'
        '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    )
    return config


def _start_twistd(
    tmp_path: Path, config: Path | None, log: Path, *, as_make_run: bool = False
) -> subprocess.Popen[bytes]:
    """twistd relay logging to ``log``: with --logfile, or as `make run` does (the relay's
    own observer, --logger relay.logfile.observer, on standard output)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if as_make_run:
        argv = [TWISTD, "--nodaemon", "--pidfile=", "--logger", "relay.logfile.observer", "relay"]
        with log.open("wb") as out:
            return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out)
    argv = [TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "relay"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.Popen(argv, cwd=tmp_path, env=env)


def test_running_relay_answers_relay_queue_over_its_control_socket(tmp_path: Path) -> None:
    """While twistd relay runs, `relay queue` reaches it through the spool's control socket."""
    config = _config(tmp_path)
    log = tmp_path / "twistd.log"
    proc = _start_twistd(tmp_path, config, log)
    try:
        _wait_for(log, "running:", proc)
        control = tmp_path / "var" / "spool" / "control"
        deadline = time.monotonic() + 30
        while not control.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        relay = str(Path(sys.executable).parent / "relay")
        listing = subprocess.run(
            [relay, "queue", "--json", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip().startswith(("[", "{"))
    finally:
        assert stop_process(proc) in (0, -signal.SIGTERM)
    assert not control.exists()


def test_second_relay_on_the_same_spool_stops(tmp_path: Path) -> None:
    """A second relay on a spool that is in use says so and stops instead of running."""
    config = _config(tmp_path)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start_twistd(tmp_path, config, first_log)
    try:
        _wait_for(first_log, "running:", first)
        second = _start_twistd(tmp_path, config, second_log)
        try:
            second.wait(timeout=60)  # it exits by itself; a hang fails here
            assert "cannot run without its spool" in second_log.read_text()
        finally:
            stop_process(second)
        assert first.poll() is None
    finally:
        stop_process(first)


def test_relay_that_cannot_listen_exits_with_an_error(tmp_path: Path) -> None:
    """If its SMTP port is taken, twistd relay exits non-zero saying it couldn't listen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(
            '[relay]\nhostname = "t.example.test"\n'
            f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        )
        log = tmp_path / "twistd.log"
        proc = _start_twistd(tmp_path, config, log)
        try:
            code = proc.wait(timeout=60)
        finally:
            stop_process(proc)
    assert code not in (0, -signal.SIGTERM)
    assert "Couldn't listen" in log.read_text()


@pytest.mark.parametrize("with_config", [False, True], ids=["embedded default", "--config"])
def test_twistd_starts_logs_summary_and_stops_on_sigterm(tmp_path: Path, with_config: bool) -> None:
    """twistd -n relay logs its configuration summary, and SIGTERM stops it cleanly.

    The embedded default runs as `make run` runs it, with the relay's log observer."""
    log = tmp_path / "twistd.log"
    config = _config(tmp_path) if with_config else None
    proc = _start_twistd(tmp_path, config, log, as_make_run=not with_config)
    try:
        content = _wait_for(log, "running:", proc)
        assert ("t.example.test" if with_config else "localhost:") in content
        if not with_config:
            _mail_the_default_postmaster(tmp_path)
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the signal that stopped it after a clean shutdown, so that a
        # supervisor sees "terminated by SIGTERM"; any other status is a crash.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    content = log.read_text()
    assert "stopped" in content
    assert "Traceback" not in content


def _mail_the_default_postmaster(where: Path) -> None:
    """On the embedded default: postmaster@localhost gets a Maildir copy, nobody a 550."""
    deadline = time.monotonic() + 30
    while True:
        try:
            client = smtplib.SMTP("127.0.0.1", 2525, timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with client:
        client.ehlo("client.example.test")
        client.mail("someone@localhost")
        assert client.rcpt("nobody@localhost")[0] == 550
        assert client.rcpt("postmaster@localhost")[0] == 250
        assert client.data(b"Subject: smoke\r\n\r\nhello\r\n")[0] == 250
    new = where / "var" / "mail" / "postmaster" / "new"
    while not (new.is_dir() and any(new.iterdir())):
        assert time.monotonic() < deadline, "no delivery to the postmaster's Maildir"
        time.sleep(0.05)


def test_unusable_tls_files_are_a_usage_error(tmp_path: Path) -> None:
    """twistd relay refuses (with a message, no traceback) a certificate it cannot load."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nhostname = "h.example.test"\n'
        '[smtp]\ntls_cert_file = "cert.pem"\ntls_key_file = "key.pem"\n'
    )
    with pytest.raises(usage.UsageError, match="tls_cert_file"):
        tap.Options().parseOptions(["--config", str(config)])

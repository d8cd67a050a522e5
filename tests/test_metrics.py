"""``/metrics``: scraped from a running ``twistd relay`` and parsed with prometheus-client.

The test sends known mail (SMTP, relay-sendmail, a malformed drop file, a message that
bounces), holds SMTP sessions open and has one refused, then checks that every series
counts exactly that.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpsink import free_port

BIN = Path(sys.executable).parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_for(port: int, check: Callable[[Samples], bool], limit: float = 30.0) -> Samples:
    deadline = time.monotonic() + limit
    samples: Samples = {}
    while time.monotonic() < deadline:
        try:
            samples = _scrape(port)
        except OSError:
            samples = {}
        if samples and check(samples):
            return samples
        time.sleep(0.1)
    raise AssertionError(f"metrics never matched; last scrape: {samples}")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    smtp_port, metrics_port = free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        '[relay]\nhostname = "hub.example.test"\nlocal_domains = ["example.test"]\n'
        'spool = "spool"\nmaildrop = "maildrop"\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface=127.0.0.1"]\nworkers = 0\n'
        "max_sessions_per_client = 2\ntrusted_networks = []\n"  # the limit spares trusted ones
        '[local]\nmail_root = "mail"\nusers = ["alice", "bob"]\n'
        f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    )
    log = tmp_path / "twistd.log"
    argv = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}", "relay"]
    proc = subprocess.Popen([*argv, "--config", str(config)], cwd=tmp_path)
    try:
        yield config, smtp_port, metrics_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _sendmail(config: Path, *args: str, text: bytes) -> None:
    env = {**os.environ, "RELAY_CONFIG": str(config)}
    result = subprocess.run(
        [str(BIN / "relay-sendmail"), *args], input=text, env=env, timeout=60, check=False
    )
    assert result.returncode == 0


def _connect(port: int, limit: float = 30.0) -> smtplib.SMTP:
    deadline = time.monotonic() + limit
    while True:
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=30)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_counters_match_what_was_sent(tmp_path: Path, relay: tuple[Path, int, int]) -> None:
    """Received by source and result, deliveries, bounces, latency, spool syncs, sessions."""
    config, smtp_port, metrics_port = relay
    client = _connect(smtp_port)
    for number in range(3):
        client.sendmail("alice@example.test", ["bob@example.test"], f"Subject: {number}\r\n\r\nx")
    _sendmail(config, "-f", "alice@example.test", "alice", text=b"Subject: a\n\nx\n")
    _sendmail(config, "-f", "alice@example.test", "nobody", text=b"Subject: b\n\nx\n")
    drop_dir = tmp_path / "maildrop" / "drop"
    (drop_dir / "broken").write_bytes(b"not a drop file")
    second = _connect(smtp_port)
    second.ehlo()
    with pytest.raises(smtplib.SMTPConnectError, match="too many sessions"):
        smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)  # the third from here: over 2

    def settled(s: Samples) -> bool:
        return (
            _value(s, "relay_deliveries_total", channel="local", result="sent") == 5
            and _value(s, "relay_messages_received_total", source="sendmail", result="quarantined")
            == 1
            and _value(s, "relay_queue_messages") == 0
        )

    s = _wait_for(metrics_port, settled)
    received = "relay_messages_received_total"
    assert _value(s, received, source="smtp", result="accepted") == 3
    assert _value(s, received, source="sendmail", result="accepted") == 2
    assert _value(s, received, source="dsn", result="accepted") == 1
    assert _value(s, received, source="smtp", result="failed") == 0
    assert _value(s, "relay_deliveries_total", channel="local", result="bounced") == 1
    assert _value(s, "relay_deliveries_total", channel="local", result="deferred") == 0
    assert _value(s, "relay_bounces_total") == 1
    assert _value(s, "relay_delay_warnings_total") == 0
    assert _value(s, "relay_delivery_latency_seconds_count", channel="local") == 6
    assert _value(s, "relay_delivery_latency_seconds_sum", channel="local") >= 0
    syncs = _value(s, "relay_spool_sync_seconds_count")
    assert syncs >= 1
    assert _value(s, "relay_spool_batch_records_count") == syncs
    # 6 stores + at least one status or done record per message
    assert _value(s, "relay_spool_batch_records_sum") >= 12
    assert _value(s, "relay_queue_oldest_message_age_seconds") == 0
    assert _value(s, "relay_smtp_sessions_open") == 2
    assert _value(s, "relay_smtp_sessions_refused_total", reason="max_sessions_per_client") == 1
    assert _value(s, "relay_smtp_sessions_refused_total", reason="max_sessions") == 0
    client.quit()
    second.quit()
    s = _wait_for(metrics_port, lambda s: _value(s, "relay_smtp_sessions_open") == 0)
    assert _value(s, "process_cpu_seconds_total") > 0  # the library's own collectors too

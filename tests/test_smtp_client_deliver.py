"""End to end: the real spool and deliverer, through the SMTP channel, into real smtp-sinks.

One message, three recipients, three smarthost routes: one smtp-sink that accepts, one
that refuses RCPT with a 5xx (``-f RCPT``) and one that refuses it with a 4xx
(``-r RCPT``).  The spool must record delivered / failed / deferred with the server's
replies, and the failure's DSN (from ``<>``, to the sender, whose domain is routed to
the accepting sink) must arrive there too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from relay.address import parse_forward_path, parse_reverse_path
from relay.channels.smtp import build_smtp_channel
from relay.config import parse_config
from relay.deliver import build_deliverer
from relay.dns.mx import make_resolver
from relay.envelope import Envelope, Recipient, RecipientState, Submitter
from relay.queue.ready import QueueReady
from relay.queue.store import SpoolQueue

from support.dnsserver import start_dns_server
from support.reactor_helpers import until
from support.smtpsink import SinkPool

R: Any = reactor
TEXT = b"From: sender@origin.test\r\nSubject: e2e\r\n\r\n.a dot line\r\nHello.\r\n"


@pytest.fixture
def sinks() -> Iterator[SinkPool]:
    pool = SinkPool()
    yield pool
    pool.stop()


def _config(accepting: int, hard: int, soft: int) -> str:
    return f"""
[relay]
hostname = "relay.here.test"
local_domains = ["here.test"]
postmaster = "postmaster@here.test"

[[route]]
domain = "ok.test"
smarthost = "127.0.0.1:{accepting}"

[[route]]
domain = "origin.test"
smarthost = "127.0.0.1:{accepting}"

[[route]]
domain = "hard.test"
smarthost = "127.0.0.1:{hard}"

[[route]]
domain = "soft.test"
smarthost = "127.0.0.1:{soft}"
"""


@pytest_twisted.ensureDeferred
async def test_deliverer_and_spool_record_what_the_smtp_sinks_answered(
    tmp_path: Path, sinks: SinkPool
) -> None:
    """delivered / failed (5xx) / deferred (4xx) land in the spool; the DSN reaches the sender."""
    accepting = sinks.start()
    hard = sinks.start("-f", "RCPT", "-B", "550 5.1.1 no such user")
    soft = sinks.start("-r", "RCPT", "-b", "450 4.2.0 mailbox busy")
    config = parse_config(_config(accepting.port, hard.port, soft.port), tmp_path)
    dns_server = start_dns_server(R, {})  # no Internet DNS, ever: smarthosts need none
    channel = build_smtp_channel(config, R, make_resolver(R, [dns_server.address], (0.5,)))
    queue = await SpoolQueue.open(tmp_path / "spool", R)
    envelope = Envelope(
        parse_reverse_path("<sender@origin.test>"),
        tuple(
            Recipient(parse_forward_path(f"<{a}>"))
            for a in ("a@ok.test", "b@hard.test", "c@soft.test")
        ),
        time.time(),
        Submitter("ESMTP"),
    )
    queue_id = await queue.store(envelope, TEXT)
    service = build_deliverer(config, QueueReady.of(queue), {"smtp": channel}, R)
    service.startService()
    try:

        def states() -> list[RecipientState]:
            entry = next(e for e in queue.entries() if e.queue_id == queue_id)
            return [s.state for s in entry.statuses]

        await until(
            lambda: (
                states()
                == [RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.DEFERRED]
            ),
            30,
        )
        await until(lambda: "X-Mail-Args: <>" in accepting.dumped(), 30)
        entry = next(e for e in queue.entries() if e.queue_id == queue_id)
    finally:
        await service.stopService()
        await channel.close_idle()
        await queue.close()
        await dns_server.stop()
    delivered, failed, deferred = entry.statuses
    assert delivered.last_reply is not None and delivered.last_reply.smtp_code == 250
    assert failed.last_reply is not None
    assert (failed.last_reply.smtp_code, failed.last_reply.enhanced) == (550, "5.1.1")
    assert failed.last_reply.text == "no such user"
    assert deferred.last_reply is not None
    assert (deferred.last_reply.smtp_code, deferred.last_reply.text) == (450, "mailbox busy")
    assert deferred.next_attempt is not None and deferred.next_attempt > time.time()
    dumped = accepting.dumped()
    assert "X-Rcpt-Args: <a@ok.test>" in dumped
    assert "\n.a dot line\nHello.\n" in dumped
    assert "X-Rcpt-Args: <sender@origin.test>" in dumped  # the DSN for b@hard.test
    assert "b@hard.test" in dumped.split("X-Mail-Args: <>", 1)[1]
    assert "X-Rcpt-Args" not in hard.dumped() and "X-Rcpt-Args" not in soft.dumped()

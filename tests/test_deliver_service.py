"""The deliverer over days of a task.Clock: retries, warnings, bounces, routing, flush.

Every test drives a whole DelivererService (built by ``build_deliverer``) over the
in-memory queue; times are the clock's, so a test can let five days pass in
milliseconds and check each attempt to the second.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import random
from email.message import EmailMessage, Message
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from relay.address import Address
from relay.channels.discard import DiscardChannel
from relay.deliver import DelivererService, build_deliverer
from relay.envelope import Destination, RecipientState
from relay.interfaces import IDeliverer
from relay.policy.dsn import DOUBLE_BOUNCE_PROTOCOL, DSN_PROTOCOL
from relay.policy.routing import Router
from relay.queue.ready import QueueReady
from relay.reply import Reply, ReplyCode

from support.deferreds import fired
from support.deliver_fakes import (
    LIST,
    PER_ADDRESS,
    T0,
    Harness,
    ScriptedChannel,
    envelope,
)

DEST = Destination("fake", "dest.test")
HOUR = 3600.0
DAY = 24 * HOUR


def _smtp() -> DiscardChannel:
    """Where DSNs to sender@example.test go: an SMTP stand-in that takes everything."""
    return DiscardChannel(LIST, name="smtp")


def _parse_dsn(text: bytes) -> tuple[EmailMessage, list[Message]]:
    """A DSN read back with the email package: the message and its status blocks."""
    message = email.message_from_bytes(text, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    assert "Subject: a test message" in parts[2].get_content()
    return message, blocks


def test_the_service_provides_ideliverer() -> None:
    """The service built by build_deliverer verifies against IDeliverer."""
    harness = Harness(ScriptedChannel(LIST))
    assert verifyObject(IDeliverer, harness.service)


# --- retries ---------------------------------------------------------------------------------


def _flaky(harness: Harness, failures: int) -> list[float]:
    """Script the fake channel: ``failures`` AGN replies, then MOK; return attempt times."""
    times: list[float] = []

    def answer(recipient: Any) -> Reply:
        times.append(harness.clock.seconds() - T0)
        return Reply(ReplyCode.AGN if len(times) <= failures else ReplyCode.MOK)

    channel = harness.channels["fake"]
    assert isinstance(channel, ScriptedChannel)
    channel.answers["add_recipient"] = answer
    return times


def test_three_temporary_failures_then_delivery_on_the_backoff_schedule() -> None:
    """Failing 3 times, a recipient is tried at 0, 5m, 15m, 35m and delivered exactly once."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp()).start()
    times = _flaky(harness, 3)
    queue_id = harness.store(envelope("a@dest.test"))
    harness.advance(2 * HOUR)
    assert times == [0.0, 300.0, 900.0, 2100.0]  # gaps of 5m, 10m, 20m (no jitter)
    assert channel.delivered == [(queue_id, "a@dest.test")]
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.DELIVERED and status.attempts == 4
    assert [e["status"] for e in harness.dispositions()] == ["deferred"] * 3 + ["sent"]
    assert [e["attempt"] for e in harness.dispositions()] == [1, 2, 3, 4]


def test_backoff_jitter_stays_within_ten_percent() -> None:
    """With a seeded random jitter each gap is within ±10 % of 5m, 10m and 20m."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp(), rng=random.Random(1234)).start()
    times = _flaky(harness, 3)
    harness.store(envelope("a@dest.test"))
    harness.advance(2 * HOUR, step=1.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, nominal in zip(gaps, [300, 600, 1200], strict=True):
        assert nominal * 0.9 <= gap <= nominal * 1.1
    assert gaps != [300, 600, 1200]  # the jitter is really applied


def test_a_recipient_that_never_succeeds_gets_one_warning_and_one_bounce() -> None:
    """Over six days of AGN: one delay DSN after 4h, one failure DSN after 5d, both RFC 3464."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.AGN))
    harness = Harness(channel, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test"))
    harness.advance(6 * DAY, step=600)
    notices = harness.notices()
    assert len(notices) == 2
    (_, delay_env, delay_text), (_, fail_env, fail_text) = notices
    for env in (delay_env, fail_env):
        assert env.return_path is None and env.submitter.protocol == DSN_PROTOCOL
        assert [str(r.address) for r in env.recipients] == ["sender@example.test"]
    assert T0 + 4 * HOUR <= delay_env.arrival < T0 + 6 * HOUR
    assert T0 + 5 * DAY <= fail_env.arrival < T0 + 5 * DAY + 2 * HOUR
    delay, (_, delayed) = _parse_dsn(delay_text)
    assert delay["Subject"].startswith("Delayed Mail")
    assert delayed["Action"] == "delayed" and delayed["Status"] == "4.3.0"
    assert delayed["Final-Recipient"] == "rfc822; a@dest.test"
    assert "Will-Retry-Until" in delayed
    failure, (per_message, failed) = _parse_dsn(fail_text)
    assert failure["Subject"].startswith("Undelivered Mail")
    assert per_message["X-Queue-ID"] == queue_id
    assert failed["Action"] == "failed" and failed["Status"] == "4.4.7"
    assert "delivery time expired" in failed["Diagnostic-Code"]
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.FAILED and status.warned
    assert harness.dispositions("expired")[0]["recipient"] == "a@dest.test"


def test_the_warning_is_marked_before_it_is_queued() -> None:
    """The recipient is recorded as warned before the delay DSN is stored, never after."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.AGN))
    harness = Harness(channel, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test"))
    harness.advance(5 * HOUR, step=600)
    journal = harness.queue.journal
    dsn_id = harness.notices()[0][0]
    stored_at = journal.index(("store", dsn_id, harness.queue.envelope(dsn_id)))
    warned_at = next(
        i
        for i, entry in enumerate(journal)
        if entry[:2] == ("update", queue_id) and any(s.warned for s in entry[2].values())
    )
    assert warned_at < stored_at


def test_the_failure_dsn_is_queued_before_the_failure_is_recorded() -> None:
    """A permanent failure: the DSN is stored first, then the recipient recorded as failed."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.USER))
    harness = Harness(channel, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test"))
    journal = [e[:2] for e in harness.queue.journal]
    dsn_id = harness.notices()[0][0]
    assert journal.index(("store", dsn_id)) < journal.index(("update", queue_id))
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.FAILED


def test_a_dsn_that_cannot_be_queued_leaves_the_recipient_queued() -> None:
    """If the DSN cannot be stored, the failure is not recorded: it is deferred and redone."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp()).start()

    def refuse_and_fill_the_disk(recipient: Any) -> Reply:
        harness.queue.fail_stores = 1  # the DSN's store will fail
        return Reply(ReplyCode.USER)

    channel.answers["add_recipient"] = refuse_and_fill_the_disk
    queue_id = harness.store(envelope("a@dest.test"))
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.DEFERRED and status.attempts == 1
    assert harness.notices() == []
    channel.answers["add_recipient"] = lambda r: Reply(ReplyCode.USER)
    harness.advance(10 * 60)
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.FAILED
    assert len(harness.notices()) == 1


def test_all_failures_of_a_message_in_one_pass_go_in_one_dsn() -> None:
    """Failures from several transactions and channels of one message share one DSN."""
    fake = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.USER))
    other = ScriptedChannel(LIST, "other", add_recipient=lambda r: Reply(ReplyCode.NO))
    harness = Harness(fake, other, _smtp(), recipients_per_transaction=1).start()
    env = envelope("a@dest.test", "b@dest.test")
    env = env.with_recipients(
        (
            *env.recipients,
            envelope("c@else.test", destination=Destination("other", "x")).recipients[0],
        )
    )
    queue_id = harness.store(env)
    assert fake.sessions_opened == 1 and fake.names().count("begin_message") == 2
    ((_, _, text),) = harness.notices()
    _, (_, *blocks) = _parse_dsn(text)
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; a@dest.test",
        "rfc822; b@dest.test",
        "rfc822; c@else.test",
    ]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.1.1", "5.0.0"]
    assert queue_id not in harness.queue.queued()


# --- who is told -----------------------------------------------------------------------------


def test_null_sender_mail_that_fails_produces_no_dsn() -> None:
    """Mail from <> that fails permanently, or runs out of time, is dropped without a DSN."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.AGN))
    harness = Harness(channel, _smtp()).start()
    expiring = harness.store(envelope("a@dest.test", sender=None))
    channel.answers["add_recipient"] = lambda r: (
        Reply(ReplyCode.USER) if str(r.address).startswith("b") else Reply(ReplyCode.AGN)
    )
    refused = harness.store(envelope("b@dest.test", sender=None))
    harness.advance(6 * DAY, step=1800)
    assert harness.notices() == []
    assert harness.queue.stored() == [expiring, refused]
    for queue_id in (expiring, refused):
        assert harness.queue.statuses(queue_id)[0].state is RecipientState.FAILED
    assert sum("dropped" in e.get("log_format", "") for e in harness.events) == 2


def test_a_failed_dsn_goes_to_the_postmaster_once() -> None:
    """A DSN this relay made that bounces becomes one double bounce to the postmaster."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.USER))
    local = ScriptedChannel(PER_ADDRESS, "local")
    harness = Harness(channel, local, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test", sender=None, protocol=DSN_PROTOCOL))
    ((dsn_id, env, text),) = harness.notices()
    assert env.submitter.protocol == DOUBLE_BOUNCE_PROTOCOL
    assert [str(r.address) for r in env.recipients] == ["postmaster@here.test"]
    message, _ = _parse_dsn(text)
    assert message["To"] == "postmaster@here.test"
    assert local.delivered == [(dsn_id, "postmaster@here.test")]
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.FAILED


def test_a_failed_double_bounce_is_dropped_with_a_log_line() -> None:
    """A double bounce that fails is recorded as failed and nothing more is sent."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.USER))
    local = ScriptedChannel(PER_ADDRESS, "local", add_recipient=lambda r: Reply(ReplyCode.USER))
    harness = Harness(channel, local, _smtp()).start()
    harness.store(envelope("a@dest.test", sender=None, protocol=DSN_PROTOCOL))
    ((dsn_id, _, _),) = harness.notices()
    assert harness.queue.statuses(dsn_id)[0].state is RecipientState.FAILED
    assert len(harness.queue.stored()) == 2  # the DSN and its double bounce, nothing after
    assert any("double bounce" in str(e.get("what")) for e in harness.events)


# --- routing ---------------------------------------------------------------------------------


def test_unrouted_recipients_are_routed_by_the_configuration() -> None:
    """A recipient without a destination goes where the router says (SMTP by its domain)."""
    smtp = ScriptedChannel(LIST, "smtp")
    harness = Harness(smtp).start()
    queue_id = harness.store(envelope("a@remote.test", "b@remote.test", destination=None))
    assert smtp.calls[0].detail == Destination("smtp", "remote.test")
    assert smtp.delivered == [(queue_id, "a@remote.test"), (queue_id, "b@remote.test")]
    assert {e["relay"] if "relay" in e else e["channel"] for e in harness.dispositions()} == {
        "smtp"
    }


def test_an_address_without_a_route_fails_permanently_with_the_reason() -> None:
    """A local address when no local channel runs: NoRoute, a bounce that says why."""
    harness = Harness(ScriptedChannel(LIST, "smtp")).start()
    queue_id = harness.store(envelope("user@here.test", destination=None))
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.FAILED and status.last_reply is not None
    assert status.last_reply.effective_enhanced == "5.3.5"
    assert "not running" in status.last_reply.description
    ((_, _, text),) = harness.notices()
    _, (_, block) = _parse_dsn(text)
    assert block["Status"] == "5.3.5"


def test_a_destination_on_a_channel_that_is_not_running_is_deferred() -> None:
    """A recipient routed to a channel this relay does not run waits (a configuration fault)."""
    harness = Harness(ScriptedChannel(LIST), _smtp()).start()
    queue_id = harness.store(envelope("a@x.test", destination=Destination("ghost", "x")))
    (status,) = harness.queue.statuses(queue_id)
    assert status.state is RecipientState.DEFERRED and status.last_reply is not None
    assert status.last_reply.effective_enhanced == "4.3.5"
    assert harness.notices() == []


# --- flush and wake -------------------------------------------------------------------------


def test_flush_makes_deferred_mail_due_now() -> None:
    """flush() retries a deferred recipient at once instead of at its next attempt."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp()).start()
    times = _flaky(harness, 1)
    queue_id = harness.store(envelope("a@dest.test"))
    harness.advance(60)
    flushed = harness.service.flush()
    harness.clock.advance(0)
    assert fired(flushed) == 1
    assert times == [0.0, 60.0]
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.DELIVERED


def test_flush_by_queue_id_and_channel_only_touches_the_matching_mail() -> None:
    """flush(ids) and flush(channel=...) leave other deferred mail on its schedule."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.AGN))
    harness = Harness(channel, _smtp()).start()
    first = harness.store(envelope("a@dest.test"))
    second = harness.store(envelope("b@dest.test"))
    harness.advance(60)
    assert fired(harness.service.flush(channel="other")) == 0
    assert fired(harness.service.flush([second])) == 1
    harness.clock.advance(0)
    assert harness.queue.statuses(first)[0].attempts == 1
    assert harness.queue.statuses(second)[0].attempts == 2


def test_the_deliverer_sleeps_until_something_is_due() -> None:
    """Between attempts nothing scans: one scan per wake-up, none while waiting."""
    channel = ScriptedChannel(PER_ADDRESS, add_recipient=lambda r: Reply(ReplyCode.AGN))
    harness = Harness(channel, _smtp()).start()
    harness.store(envelope("a@dest.test"))
    scheduler = harness.service.scheduler
    assert scheduler is not None
    scans = scheduler.scans
    harness.advance(299, step=1.0)
    assert scheduler.scans == scans
    harness.advance(1)
    assert scheduler.scans > scans
    assert len(harness.clock.getDelayedCalls()) <= 3  # queue timer, deliverer timer, idle


def test_stop_then_start_again_resumes_delivery() -> None:
    """A stopped deliverer takes nothing; started again it delivers what waited."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp()).start()
    harness.stop()
    queue_id = harness.store(envelope("a@dest.test"))
    assert channel.delivered == []
    harness.start()
    assert channel.delivered == [(queue_id, "a@dest.test")]


@pytest.mark.parametrize("mode", [LIST, PER_ADDRESS])
def test_messages_are_delivered_once_each_in_arrival_order(mode: Any) -> None:
    """Many messages, several recipients each: every recipient delivered exactly once."""
    channel = ScriptedChannel(mode)
    harness = Harness(channel, _smtp()).start()
    ids = [harness.store(envelope(f"r{i}a@dest.test", f"r{i}b@dest.test")) for i in range(20)]
    expected = [(q, f"r{i}{x}@dest.test") for i, q in enumerate(ids) for x in "ab"]
    assert channel.delivered == expected
    assert harness.queue.queued() == []


# --- writes that are slow, fail, or find the message gone ---------------------------------


def test_recipients_stay_claimed_until_their_state_is_durable() -> None:
    """With slow writes, a scan during the write does not deliver the same recipient again."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp(), latency=1.0).start()
    harness.queue.store(envelope("a@dest.test", arrival=harness.clock.seconds()), b"x")
    harness.clock.advance(1.0)  # the store is durable: the deliverer delivers at once
    (first,) = harness.queue.queued()
    assert channel.delivered == [(first, "a@dest.test")]
    # its DELIVERED state is still being written when another message wakes a scan
    harness.queue.store(envelope("b@dest.test", arrival=harness.clock.seconds()), b"x")
    harness.clock.advance(0.5)
    assert first in harness.queue.queued()
    harness.advance(5, step=0.5)
    assert [a for _, a in channel.delivered] == ["a@dest.test", "b@dest.test"]
    assert harness.queue.queued() == []


def test_a_failed_write_retries_later_never_loses_the_recipient() -> None:
    """If the delivered state cannot be written, the recipient is delivered again later."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp()).start()
    harness.queue.fail_updates = 1
    queue_id = harness.store(envelope("a@dest.test"))
    assert harness.queue.statuses(queue_id)[0].state is RecipientState.PENDING
    harness.advance(30, step=1.0)
    assert len(channel.delivered) == 1  # held back for a while, not retried in a loop
    harness.advance(60, step=1.0)
    assert channel.delivered == [(queue_id, "a@dest.test")] * 2  # a duplicate, not a loss
    assert queue_id not in harness.queue.queued()


def test_a_message_removed_during_delivery_is_let_go() -> None:
    """An operator's rm while a channel works: the outcome is dropped, nothing breaks."""
    hang: Deferred[Reply] = Deferred()
    answers = iter([hang])
    channel = ScriptedChannel(LIST, end_text=lambda: next(answers, Reply(ReplyCode.OK)))
    harness = Harness(channel, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test"))
    fired(harness.queue.remove(queue_id))
    hang.callback(Reply(ReplyCode.OK))
    harness.advance(10)
    assert harness.service.claims.owner((queue_id, 0)) is None
    assert any("left the queue" in e.get("log_format", "") for e in harness.events)
    second = harness.store(envelope("b@dest.test"))
    assert second not in harness.queue.queued()


# --- the active set and routing memory ------------------------------------------------------


def test_the_active_set_is_bounded() -> None:
    """No more than active_limit messages are worked on at once; the rest follow."""
    pending: list[Deferred[Reply]] = []

    def slow(recipient: Any) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred()
        pending.append(d)
        return d

    channel = ScriptedChannel(PER_ADDRESS, add_recipient=slow)
    harness = Harness(channel, _smtp(), active_limit=4).start()
    ids = [harness.put(envelope(f"r{i}@dest.test")) for i in range(12)]
    harness.clock.advance(0)
    most = 0
    while pending:
        most = max(most, len(harness.service.claims))
        pending.pop(0).callback(Reply(ReplyCode.MOK))
        harness.clock.advance(0)
    assert most == 4
    assert [q for q, _ in channel.delivered] == ids
    assert harness.queue.queued() == []


def test_routes_are_remembered_per_address() -> None:
    """An unrouted address is routed once, however many messages it is in."""
    calls: list[str] = []

    class CountingRouter(Router):
        def route(self, address: Address) -> Destination:
            calls.append(str(address))
            return super().route(address)

    smtp = ScriptedChannel(LIST, "smtp")
    harness = Harness(smtp)
    service = DelivererService(
        QueueReady.of(harness.queue),
        {"smtp": smtp},
        harness.config.deliver,
        CountingRouter(harness.config, ["smtp"]),
        harness.clock,
        random.Random(1),
        hostname="relay.here.test",
        postmaster="postmaster@here.test",
    )
    service.startService()
    for _ in range(3):
        harness.store(envelope("a@remote.test", destination=None))
    assert calls == ["a@remote.test"]
    assert len(smtp.delivered) == 3


def test_the_deliverer_waits_for_a_queue_that_opens_later() -> None:
    """Given something with when_ready() (the spool service), it starts once that fires."""
    channel = ScriptedChannel(PER_ADDRESS)
    harness = Harness(channel, _smtp())
    ready: Deferred[Any] = Deferred()

    class Source:
        def when_ready(self) -> Deferred[Any]:
            return ready

    service = build_deliverer(
        harness.config, Source(), harness.channels, harness.clock, log=harness.log
    )
    service.startService()
    queue_id = harness.put(envelope("a@dest.test"))
    harness.clock.advance(1)
    assert channel.delivered == [] and service.queue is None
    ready.callback(harness.queue)
    harness.clock.advance(0)
    assert channel.delivered == [(queue_id, "a@dest.test")]
    harness.clock.advance(10)
    assert fired(service.stopService()) is None

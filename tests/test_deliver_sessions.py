"""Sessions and batching: reuse, recipients per transaction, slow start, limits, dead hosts.

The channels here answer after a delay on the test's clock when a test needs
transactions to overlap, so concurrency can be watched second by second.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relay.channels.discard import DiscardChannel
from relay.envelope import Destination, RecipientState
from relay.errors import SessionFailed
from relay.reply import Reply, ReplyCode

from support.deliver_fakes import (
    LIST,
    PER_ADDRESS,
    T0,
    Harness,
    ScriptedChannel,
    ScriptedSession,
    envelope,
)

DEST = Destination("fake", "dest.test")


def _smtp() -> DiscardChannel:
    return DiscardChannel(LIST, name="smtp")


def _later(clock: Clock, seconds: float, value: object) -> Deferred[Any]:
    """A Deferred that fires with ``value`` after ``seconds`` on ``clock``."""
    d: Deferred[Any] = Deferred()
    clock.callLater(seconds, d.callback, value)
    return d


class SlowChannel(ScriptedChannel):
    """A list-mode channel whose text takes ``seconds`` to be accepted; counts sessions."""

    def __init__(self, seconds: float = 1.0, name: str = "fake") -> None:
        super().__init__(LIST, name, end_text=self._end_text)
        self.clock = Clock()  # replaced by the harness's
        self.seconds = seconds
        self.reply = Reply(ReplyCode.OK)
        self.open_now = 0
        self.most_open = 0
        self.answers["open_session"] = self._open
        self.answers["end_session"] = self._end

    def _open(self, destination: Destination) -> object:
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        return ScriptedSession(self, len(self.sessions) + 1, destination)

    def _end(self) -> None:
        self.open_now -= 1

    def _end_text(self) -> Deferred[Any]:
        return _later(self.clock, self.seconds, self.reply)


def _slow(**settings: Any) -> tuple[Harness, SlowChannel]:
    """A started harness whose fake channel is a SlowChannel on the harness's clock."""
    channel = SlowChannel()
    harness = Harness(channel, _smtp(), **settings)
    channel.clock = harness.clock
    return harness.start(), channel


# --- session reuse and batching -------------------------------------------------------------


def test_consecutive_messages_share_one_session() -> None:
    """Messages for one destination go over one session; it ends after the idle time."""
    channel = ScriptedChannel(LIST)
    harness = Harness(channel, _smtp(), idle_timeout=5.0).start()
    for i in range(5):
        harness.store(envelope(f"r{i}@dest.test"))
        harness.advance(1, step=1)
    assert channel.sessions_opened == 1
    assert channel.names(1).count("begin_message") == 5
    assert "end_session" not in channel.names()
    harness.advance(5, step=1)
    assert channel.names(1)[-1] == "end_session"
    harness.store(envelope("late@dest.test"))
    assert channel.sessions_opened == 2


def test_recipients_per_transaction_splits_a_message() -> None:
    """120 recipients with a cap of 50 travel in three transactions of 50, 50 and 20."""
    channel = ScriptedChannel(LIST)
    harness = Harness(channel, _smtp(), recipients_per_transaction=50).start()
    queue_id = harness.store(envelope(*(f"r{i}@dest.test" for i in range(120))))
    per_transaction: list[int] = []
    for call in channel.calls:
        if call.name == "begin_message":
            per_transaction.append(0)
        elif call.name == "add_recipient":
            per_transaction[-1] += 1
    assert per_transaction == [50, 50, 20]
    assert len(channel.texts) == 3  # one copy of the text per transaction
    assert harness.queue.queued() == [] and len(channel.delivered) == 120
    assert queue_id in harness.queue.done


def test_one_copy_of_the_text_per_transaction_in_chunks() -> None:
    """A 200 kB text goes once per transaction, in chunks of at most 64 KiB, intact."""
    channel = ScriptedChannel(LIST)
    harness = Harness(channel, _smtp()).start()
    text = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 12_000
    harness.store(envelope("a@dest.test", "b@dest.test"), text)
    sizes = [c.detail for c in channel.calls if c.name == "write_text"]
    assert len(sizes) == 4 and max(sizes) <= 65536
    assert channel.texts == [text]


# --- slow start and limits -----------------------------------------------------------------


def test_slow_start_grows_from_the_initial_window_to_the_limit() -> None:
    """Sessions to a destination start at 5, grow by one per delivery, never pass 20."""
    harness, channel = _slow()
    for i in range(200):
        harness.put(envelope(f"r{i}@dest.test"))
    harness.clock.advance(0)
    pool = harness.service.pool
    assert pool.sessions(DEST) == 5 and pool.window(DEST) == 5
    harness.clock.advance(1.0)  # five deliveries: the window grows by five
    assert pool.window(DEST) == 10 and pool.sessions(DEST) == 10
    harness.advance(10, step=1.0)
    assert pool.window(DEST) == 20
    assert channel.most_open == 20
    harness.advance(60, step=1.0)
    assert len(channel.delivered) == 200


def test_session_failures_halve_the_window() -> None:
    """Each session that cannot open halves the window, down to one session at a time."""
    channel = SlowChannel()
    harness = Harness(channel, _smtp())
    channel.clock = harness.clock
    failures = [0]

    def open_or_fail(destination: Destination) -> object:
        if failures[0] < 3:
            failures[0] += 1
            return SessionFailed(Reply(ReplyCode.AGN, "try later"))
        return channel._open(destination)

    channel.answers["open_session"] = open_or_fail
    harness.start()
    for i in range(20):
        harness.put(envelope(f"r{i}@dest.test"))
    harness.clock.advance(0)
    pool = harness.service.pool
    assert failures[0] == 3
    assert pool.window(DEST) == 1  # 5 -> 2 -> 1 -> 1
    assert pool.sessions(DEST) == 1
    harness.clock.advance(1.0)
    assert pool.window(DEST) == 2  # one delivery grows it again


def test_per_destination_limit_caps_sessions() -> None:
    """No more than concurrency_per_destination sessions to one destination."""
    harness, channel = _slow(concurrency_per_destination=3, initial_destination_concurrency=3)
    for i in range(30):
        harness.put(envelope(f"r{i}@dest.test"))
    harness.advance(30, step=0.5)
    assert channel.most_open == 3 and len(channel.delivered) == 30


def test_total_limit_caps_sessions_over_all_destinations() -> None:
    """concurrency_total bounds sessions over destinations; idle ones make room."""
    harness, channel = _slow(concurrency_total=2, idle_timeout=3600)
    for host in ("a.test", "b.test", "c.test"):
        for i in range(4):
            env = envelope(f"r{i}@{host}", destination=Destination("fake", host))
            harness.put(env)
    harness.clock.advance(0)
    assert harness.service.pool.total_sessions == 2
    harness.advance(30, step=0.5)
    # idle sessions were closed to let the waiting destinations in, long before their idle
    # time (an hour) was up
    assert channel.most_open == 2 and len(channel.delivered) == 12
    assert channel.names().count("end_session") >= 1


def test_per_channel_limit_caps_a_channel() -> None:
    """A per-channel limit bounds that channel's sessions over all its destinations."""
    harness, channel = _slow(channel_limits={"fake": 1})
    for host in ("a.test", "b.test"):
        for i in range(3):
            harness.put(envelope(f"r{i}@{host}", destination=Destination("fake", host)))
    harness.advance(30, step=0.5)
    assert channel.most_open == 1 and len(channel.delivered) == 6


# --- dead destinations ----------------------------------------------------------------------


def test_a_dead_destination_holds_its_other_mail_without_counting_attempts() -> None:
    """After DHST the destination rests 10m: later mail waits uncharged, then goes."""
    channel = ScriptedChannel(LIST)
    down = [True]

    def open_session(destination: Destination) -> object:
        if down[0]:
            return SessionFailed(Reply(ReplyCode.DHST, "connection refused"))
        return ScriptedSession(channel, len(channel.sessions) + 1, destination)

    channel.answers["open_session"] = open_session
    harness = Harness(channel, _smtp()).start()
    first = harness.store(envelope("a@dest.test"))
    harness.advance(60)
    second = harness.store(envelope("b@dest.test"))
    assert channel.sessions_opened == 1
    (s1,) = harness.queue.statuses(first)
    (s2,) = harness.queue.statuses(second)
    assert s1.state is RecipientState.DEFERRED and s1.attempts == 1
    assert s1.next_attempt == T0 + 300
    assert s2.state is RecipientState.DEFERRED and s2.attempts == 0
    assert s2.next_attempt == T0 + 600  # when the destination revives
    assert s2.last_reply is not None and "suspended" in s2.last_reply.description
    harness.advance(300 - 60)  # the first falls due while the destination still rests
    assert channel.sessions_opened == 1
    assert harness.queue.statuses(first)[0].attempts == 1
    down[0] = False
    harness.advance(300)
    assert channel.sessions_opened == 2
    assert {a for _, a in channel.delivered} == {"a@dest.test", "b@dest.test"}
    assert harness.queue.statuses(first)[0].attempts == 2
    assert harness.queue.statuses(second)[0].attempts == 1


def test_a_connection_failure_mid_session_parks_the_queued_jobs() -> None:
    """TIME for one message: the jobs queued behind it are held back, not attempted."""
    harness, channel = _slow(initial_destination_concurrency=1)
    channel.reply = Reply(ReplyCode.TIME, "timed out waiting for the peer")
    ids = [harness.put(envelope(f"r{i}@dest.test")) for i in range(3)]
    harness.clock.advance(0)
    harness.clock.advance(1.0)
    attempts = [harness.queue.statuses(q)[0].attempts for q in ids]
    assert attempts == [1, 0, 0]
    assert channel.sessions_opened == 1
    assert channel.names(1)[-2:] == ["abort_message", "end_session"]
    assert [e["status"] for e in harness.dispositions()] == ["deferred"] * 3


def test_mailbox_level_failures_do_not_stop_the_destination() -> None:
    """LOCK defers only its recipient: the next message for the destination goes at once."""
    channel = ScriptedChannel(
        PER_ADDRESS,
        add_recipient=lambda r: Reply(
            ReplyCode.LOCK if str(r.address).startswith("locked") else ReplyCode.MOK
        ),
    )
    harness = Harness(channel, _smtp()).start()
    locked = harness.store(envelope("locked@dest.test"))
    other = harness.store(envelope("fine@dest.test"))
    assert harness.queue.statuses(locked)[0].state is RecipientState.DEFERRED
    assert other not in harness.queue.queued()
    assert not harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds())
    assert channel.sessions_opened == 1


def test_flush_revives_a_dead_destination() -> None:
    """flush() forgets that a destination rests and retries its mail at once."""
    channel = ScriptedChannel(LIST)
    down = [True]
    plain_open = ScriptedChannel.open_session

    def open_session(destination: Destination) -> object:
        if down[0]:
            return SessionFailed(Reply(ReplyCode.DHST, "connection refused"))
        del channel.answers["open_session"]
        return plain_open(channel, destination)

    channel.answers["open_session"] = open_session
    harness = Harness(channel, _smtp()).start()
    queue_id = harness.store(envelope("a@dest.test"))
    assert harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds())
    down[0] = False
    harness.advance(30)
    harness.service.flush()
    harness.clock.advance(0)
    assert not harness.service.dead_hosts.is_dead(DEST, harness.clock.seconds())
    assert queue_id not in harness.queue.queued()
    assert channel.delivered == [(queue_id, "a@dest.test")]


def test_mail_for_a_dead_destination_expires_when_its_time_runs_out() -> None:
    """Held back past give_up_after, a recipient bounces as expired without another try."""
    channel = ScriptedChannel(
        LIST, open_session=lambda d: SessionFailed(Reply(ReplyCode.DHST, "refused"))
    )
    harness = Harness(channel, _smtp(), give_up_after=3600.0, warn_after=0.0).start()
    harness.store(envelope("a@dest.test"))  # makes the destination dead
    harness.advance(3000)
    second = harness.store(envelope("b@dest.test"))
    opened = channel.sessions_opened
    harness.advance(3 * 3600)
    assert harness.queue.statuses(second)[0].state is RecipientState.FAILED
    assert "expired" in [e["status"] for e in harness.dispositions()]
    assert channel.sessions_opened >= opened
    assert len(harness.notices()) == 2

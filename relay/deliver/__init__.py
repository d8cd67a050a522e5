"""The deliverer: MMDF's ``deliver`` (the ``qu_`` side of the channel contract) for every channel.

Theory of operation
-------------------
Mail the relay accepted waits in the queue with a state per recipient.  The deliverer
takes the recipients that are due, groups them by channel and destination, opens
channel sessions within the concurrency limits, sequences each message in the
channel's mode, and records every disposition.  Its parts, one job each:

* :mod:`relay.deliver.scheduler` — sleeps until the queue has something due, claims it,
  routes what is not routed, holds back what is for a resting destination, and cuts the
  rest into jobs (one message, one destination, at most ``recipients_per_transaction``).
* :mod:`relay.deliver.session_pool` — runs jobs on sessions: one session carries
  consecutive messages for its destination, per-destination slow start, per-channel and
  total limits, idle sessions closed.
* :mod:`relay.deliver.sequencer` — one transaction in the channel's mode, checking every
  answer against the contract.
* :mod:`relay.deliver.recorder` with :mod:`relay.deliver.dispositions` — replies become
  durable states, failures one DSN per message (stored before they are recorded as
  failed), old messages one warning (marked before it is sent).
* :mod:`relay.deliver.logging` — one event per recipient disposition.
* :mod:`relay.deliver.service` — the twistd service; :func:`build_deliverer` for
  ``relay.tap``.

Time comes from an injected :class:`~twisted.internet.interfaces.IReactorTime`, and
chance (retry jitter) from an injected :class:`random.Random`, so tests run days of
retries on a :class:`twisted.internet.task.Clock`.

The one rule the order of everything serves: a recipient's new state is written only
after its final reply, and a recipient stays claimed until that write is durable.  A
crash anywhere therefore re-delivers at most what was in flight: a duplicate, never a
loss.
"""

from relay.deliver.service import DelivererService, build_deliverer

__all__ = ["DelivererService", "build_deliverer"]

"""Every counter and histogram the relay keeps, defined once, on the default registry.

They are counted where the thing happens, at the narrowest place that sees it:

``relay_messages_received_total{source, result}``
    the spool's store (``source``: ``smtp``, ``sendmail``, ``dsn``; ``result``:
    ``accepted`` or ``failed``) and the maildrop's pickup (``quarantined``);
``relay_deliveries_total{channel, result}``
    the deliverer's recorder, one per recipient disposition (``sent``, ``deferred``,
    ``bounced``, ``expired``);
``relay_delivery_latency_seconds{channel}``
    the same place, from arrival to a final disposition (sent, bounced or expired);
``relay_bounces_total``, ``relay_delay_warnings_total``
    the recorder, when it queues a failure (or double-bounce) notice or a delay warning;
``relay_phone_calls_total{site, result}``, ``relay_phone_call_bytes_total{site, direction}``
    the phone channel, once per call (either end): its outcome, and the message bytes
    it moved each way (``sent``, ``received``);
``relay_spool_sync_seconds``, ``relay_spool_batch_records``
    the spool writer's thread, per group commit: the write and fdatasync, and how many
    records shared it.

The gauges (queue sizes, oldest message age, SMTP sessions open) and the sessions
refused are read at scrape time by :mod:`relay.metrics.collectors`.  Names follow
Prometheus' conventions: the ``relay_`` prefix, ``_total`` counters, seconds.

Counting costs a lock and an addition.  On the spool's store, once per message, the
labelled child is taken from a small cache (:func:`received`): looking it up by labels
costs about four times the increment itself.
"""

from __future__ import annotations

import functools
from typing import Final

from prometheus_client import Counter, Histogram

from relay.policy.dsn import DOUBLE_BOUNCE_PROTOCOL, DSN_PROTOCOL

__all__ = [
    "BATCH_RECORDS",
    "BOUNCES",
    "DELAY_WARNINGS",
    "DELIVERIES",
    "DELIVERY_LATENCY",
    "PHONE_CALLS",
    "PHONE_CALL_BYTES",
    "RECEIVED",
    "SPOOL_SYNC",
    "received",
    "source_of",
]

RECEIVED: Final = Counter(
    "relay_messages_received_total",
    "Messages offered to the spool, by where they came from and what became of them.",
    ["source", "result"],
)
DELIVERIES: Final = Counter(
    "relay_deliveries_total",
    "Recipient dispositions recorded by the deliverer, by channel and result.",
    ["channel", "result"],
)
DELIVERY_LATENCY: Final = Histogram(
    "relay_delivery_latency_seconds",
    "From a message's arrival to a recipient's final disposition (sent, bounced, expired).",
    ["channel"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 14400, 86400, 432000),
)
BOUNCES: Final = Counter(
    "relay_bounces_total", "Failure notices (DSNs, double bounces) queued for a sender."
)
DELAY_WARNINGS: Final = Counter(
    "relay_delay_warnings_total", "Delay warnings (DSNs) queued for a sender."
)
PHONE_CALLS: Final = Counter(
    "relay_phone_calls_total",
    "Phone calls made or answered, by site and result.",
    ["site", "result"],
)
PHONE_CALL_BYTES: Final = Counter(
    "relay_phone_call_bytes_total",
    "Message bytes moved by phone calls, by site and direction.",
    ["site", "direction"],
)
SPOOL_SYNC: Final = Histogram(
    "relay_spool_sync_seconds",
    "Writing and fdatasyncing one group commit of the spool.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_RECORDS: Final = Histogram(
    "relay_spool_batch_records",
    "Records made durable by one fdatasync of the spool (its group commit's size).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


@functools.lru_cache(maxsize=64)
def received(protocol: str, result: str) -> Counter:
    """The ``relay_messages_received_total`` child for a submitter protocol and a result."""
    return RECEIVED.labels(source_of(protocol), result)


def source_of(protocol: str) -> str:
    """The ``source`` label for a message submitted with ``Submitter.protocol``."""
    if protocol == "local":
        return "sendmail"
    if protocol in (DSN_PROTOCOL, DOUBLE_BOUNCE_PROTOCOL):
        return "dsn"
    return "smtp"

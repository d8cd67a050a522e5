"""``[deliver]``: the deliverer's retry schedule and concurrency."""

from __future__ import annotations

from relay.config.model import DeliverSection
from relay.config.reader import _Table
from relay.config.values import _duration, _positive_duration, _positive_int
from relay.durations import format_duration


def _read_deliver(t: _Table) -> DeliverSection:
    d = DeliverSection()
    deliver = DeliverSection(
        retry_min=t.get("retry_min", _positive_duration, d.retry_min),
        retry_max=t.get("retry_max", _positive_duration, d.retry_max),
        warn_after=t.get("warn_after", _positive_duration, d.warn_after),
        give_up_after=t.get("give_up_after", _positive_duration, d.give_up_after),
        concurrency_per_destination=t.get(
            "concurrency_per_destination", _positive_int, d.concurrency_per_destination
        ),
        initial_destination_concurrency=t.get(
            "initial_destination_concurrency", _positive_int, d.initial_destination_concurrency
        ),
        concurrency_total=t.get("concurrency_total", _positive_int, d.concurrency_total),
        recipients_per_transaction=t.get(
            "recipients_per_transaction", _positive_int, d.recipients_per_transaction
        ),
        dead_host_delay=t.get("dead_host_delay", _duration, d.dead_host_delay),
    )
    _check_order(t, "retry_min", deliver.retry_min, "retry_max", deliver.retry_max, strict=False)
    _check_order(t, "warn_after", deliver.warn_after, "give_up_after", deliver.give_up_after)
    _check_order(
        t,
        "initial_destination_concurrency",
        deliver.initial_destination_concurrency,
        "concurrency_per_destination",
        deliver.concurrency_per_destination,
        strict=False,
    )
    return deliver


def _check_order(
    t: _Table, low: str, low_value: float, high: str, high_value: float, *, strict: bool = True
) -> None:
    """Record a problem at ``low`` unless it is below (or, not strict, at most) ``high``."""
    if not (t.has(low) or t.has(high)) or not t.valid(low, high):
        return
    if low_value < high_value or (not strict and low_value == high_value):
        return
    relation = "shorter than" if strict else "at most"
    shown = format_duration(high_value) if isinstance(low_value, float) else str(high_value)
    t.problem(low, f"must be {relation} {t.key(high)} ({shown})")

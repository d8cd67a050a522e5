"""The session over the real link and a damaging line: every message once, byte-identical."""

from __future__ import annotations

import math
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.reply import ReplyCode
from relay.sansio.phone.accounting import CallOutcome
from relay.sansio.phone.records import Role
from relay.sansio.phone.session import SessionOptions

from support.phone.link_harness import Conditions
from support.phone.memstore import MemoryPhoneStore
from support.phone.session_harness import (
    HUB,
    SITE,
    End,
    LossyLine,
    envelope,
    make_end,
    real_link,
    run_call,
)


def _ends(
    hub: MemoryPhoneStore, site: MemoryPhoneStore, options: SessionOptions
) -> tuple[End, End]:
    return (
        make_end(Role.CALLER, hub, link_factory=real_link, options=options),
        make_end(Role.ANSWERER, site, link_factory=real_link, options=options),
    )


def _fill(
    store: MemoryPhoneStore, site: str, prefix: str, sizes: list[int], seed: int
) -> dict[str, bytes]:
    rng = random.Random(seed)
    texts = {f"{prefix}{i}": rng.randbytes(size) for i, size in enumerate(sizes)}
    for mid, text in texts.items():
        store.put(site, mid, envelope("<nobody@site.example>", "<bob@site.example>"), text)
    return texts


def _refusals_reached_their_sender(store: MemoryPhoneStore, ids: set[str]) -> bool:
    """Each message's first settling that is not temporary for the refused address
    ("nobody", first in the envelope) gave it its refusal, never a success."""
    for mid in ids:
        replies = [r for _, m, r in store.settled if m == mid and not r[0].code.is_temporary]
        if not replies or replies[0][0].code is not ReplyCode.USER:
            return False
    return True


def test_mail_both_ways_over_the_real_link_on_a_clean_line() -> None:
    """Over the real link at 115 200 bit/s, mail flows both ways and the call completes."""
    hub, site = MemoryPhoneStore(), MemoryPhoneStore()
    to_site = _fill(hub, SITE, "h", [4096] * 10, 1)
    to_hub = _fill(site, HUB, "s", [4096] * 10, 2)
    caller, answerer = _ends(hub, site, SessionOptions(compression=False, line_rate=115_200))
    run_call(caller, answerer, LossyLine(Conditions(), seed=0))
    assert {m: t for m, (_, t) in site.inbox[HUB].items()} == to_site
    assert {m: t for m, (_, t) in hub.inbox[SITE].items()} == to_hub
    s = caller.summary
    assert s is not None and s.outcome is CallOutcome.COMPLETED
    assert s.frames_sent > 0 and s.rtt is not None and s.efficiency_sent is not None
    assert caller.link.idle and answerer.link.idle  # everything acknowledged before hang-up
    stats = caller.link.stats()
    assert (s.wire_bytes_sent, s.frames_sent) == (stats.wire_bytes_sent, stats.frames_sent)
    assert s.payload_bytes_sent == s.payload_bytes_received == 40960
    assert s.compression_ratio_sent == 1.0 and s.handshake_seconds is not None


conditions = st.builds(
    Conditions,
    latency=st.sampled_from([0.0, 0.05, 0.3]),
    ber=st.sampled_from([0.0, 1e-5, 1e-4]),
    drop=st.sampled_from([0.0, 0.01, 0.05]),
    truncate=st.sampled_from([0.0, 0.01]),
    duplicate=st.sampled_from([0.0, 0.02]),
    reorder=st.sampled_from([0.0, 0.02]),
    noise=st.sampled_from([0.0, 0.01]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cond=conditions,
    seed=st.integers(0, 2**32 - 1),
    sizes_out=st.lists(st.integers(0, 9000), max_size=5),
    sizes_back=st.lists(st.integers(0, 9000), max_size=4),
    cut=st.one_of(st.just(math.inf), st.integers(0, 40_000)),
    compression=st.booleans(),
    encryption=st.booleans(),
)
def test_any_damage_delivers_each_message_once_exactly(
    cond: Conditions,
    seed: int,
    sizes_out: list[int],
    sizes_back: list[int],
    cut: float,
    compression: bool,
    encryption: bool,
) -> None:
    """Whatever the line does (and a drop), the calls that follow deliver every message
    exactly once and byte-identical, both ways, and an address the receiver refused is
    refused at its sender even when the final reply was lost with the line."""
    hub, site = MemoryPhoneStore(refuse_user="nobody"), MemoryPhoneStore(refuse_user="nobody")
    to_site = _fill(hub, SITE, "h", sizes_out, seed)
    to_hub = _fill(site, HUB, "s", sizes_back, seed + 1)
    options = SessionOptions(compression=compression, encryption=encryption)
    line = LossyLine(cond, seed, cut_after=cut)
    for attempt in range(4):
        caller, answerer = _ends(hub, site, options)
        run_call(caller, answerer, line)
        if caller.summary and caller.summary.outcome is CallOutcome.COMPLETED:
            break
        line = LossyLine(Conditions(ber=cond.ber), seed + attempt)
    assert {m: t for m, (_, t) in site.inbox.get(HUB, {}).items()} == to_site
    assert {m: t for m, (_, t) in hub.inbox.get(SITE, {}).items()} == to_hub
    assert len(site.commits) == len(set(site.commits)) == len(to_site)
    assert len(hub.commits) == len(set(hub.commits)) == len(to_hub)
    assert not hub.outbox.get(SITE) and not site.outbox.get(HUB)
    assert _refusals_reached_their_sender(hub, set(to_site))
    assert _refusals_reached_their_sender(site, set(to_hub))

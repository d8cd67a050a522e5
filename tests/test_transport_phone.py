"""A whole phone call over the fake modems with a chat login: the driver, file stores, ptys."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from relay.address import parse_forward_path, parse_reverse_path
from relay.envelope import Envelope, Recipient, Submitter
from relay.phone.driver import PhoneProtocol, session_factory
from relay.phone.filestore import FilePhoneStore
from relay.reply import ReplyCode
from relay.sansio.phone.accounting import CallOutcome
from relay.sansio.phone.link import Link, LinkParams
from relay.sansio.phone.records import Role
from relay.transport import (
    CallFailed,
    SerialAnswerer,
    SerialEndpoint,
    dial_plan,
    parse_serial,
    place_call,
)

from support.fakemodem import FakeModem

SECRET = bytes(range(32))
HUB, SITE = "hub-a", "site-b"
LOGIN = r"ogin:--ogin: nuucp ssword: \P"


def _envelope(sender: str) -> Envelope:
    return Envelope(
        parse_reverse_path(sender),
        (Recipient(parse_forward_path("<bob@site.example>")),),
        1_700_000_000.0,
        Submitter("ESMTP"),
    )


def _new_link(now: float) -> tuple[Link, LinkParams]:
    params = LinkParams()
    return Link(params, now), params


def _phone(role: Role, store: FilePhoneStore) -> PhoneProtocol:
    caller = role is Role.CALLER
    factory = session_factory(
        role=role,
        local_name=HUB if caller else SITE,
        secrets={SITE if caller else HUB: SECRET},
        new_link=_new_link,
        peer_name=SITE if caller else None,
    )
    return PhoneProtocol(factory, store, reactor)


@pytest.fixture
def modems(tmp_path: Path) -> Iterator[FakeModem]:
    """The fake modems, whose answering side asks the caller to log in."""
    with FakeModem(tmp_path / "line", login="nuucp:sesame") as fake:
        yield fake


@pytest_twisted.ensureDeferred
async def test_mail_crosses_both_ways_through_the_modems_after_a_chat_login(
    modems: FakeModem, tmp_path: Path
) -> None:
    """Hub dials, logs in by chat, and mail moves both ways byte-identical in one call."""
    locks = tmp_path / "locks"
    locks.mkdir()
    hub = FilePhoneStore(tmp_path / "hub", reactor)
    site = FilePhoneStore(tmp_path / "site", reactor)
    to_site = {f"h{i}": os.urandom(2000 + 3000 * i) for i in range(3)}
    to_hub = {f"s{i}": b"Subject: %d\r\n\r\n" % i + b"text line\r\n" * 300 for i in range(2)}
    for mid, text in to_site.items():
        await hub.put_outgoing(SITE, mid, _envelope("<alice@hub.example>"), text)
    for mid, text in to_hub.items():
        await site.put_outgoing(HUB, mid, _envelope("<carol@site.example>"), text)

    answered: list[PhoneProtocol] = []

    def new_call() -> PhoneProtocol:
        answered.append(_phone(Role.ANSWERER, site))
        return answered[-1]

    settings = parse_serial(f"serial:{modems.dte_b}:baudrate=115200")
    answerer = SerialAnswerer(
        reactor, settings, new_call, modem_init=["ATZ"], lock_dir=locks, reopen_delay=0.2
    )
    answerer.startService()
    try:
        while answerer.opened == 0:
            await deferLater(reactor, 0.05, lambda: None)
        caller = _phone(Role.CALLER, hub)
        endpoint = SerialEndpoint(
            reactor, parse_serial(f"serial:{modems.dte_a}:baudrate=115200"), locks
        )
        plan = dial_plan(
            modem_init=["ATZ", "ATE0"], dial="5551234", chat=LOGIN, substitutions={"P": b"sesame"}
        )
        setup = await place_call(endpoint, plan, caller, reactor)
        assert setup.rate == 115200
        results = await DeferredList([caller.ended, answered[0].ended], fireOnOneErrback=True)
        summaries = [summary for _, summary in results]
        await setup.closed
    finally:
        await answerer.stopService()
    for summary in summaries:
        assert summary.outcome is CallOutcome.COMPLETED, summary
    assert {m: t for m, (_, t) in site.received(HUB).items()} == to_site
    assert {m: t for m, (_, t) in hub.received(SITE).items()} == to_hub
    assert hub.pending(SITE) == [] and site.pending(HUB) == []
    login = await deferToThread(modems.wait_for, "login")
    assert login == {"event": "login", "side": "a", "user": "nuucp", "ok": True}


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_never_reaches_the_link(modems: FakeModem, tmp_path: Path) -> None:
    """With a script that waits for the shell's prompt, a refused login times out; no call."""
    locks = tmp_path / "locks"
    locks.mkdir()
    site = FilePhoneStore(tmp_path / "site", reactor)
    settings = parse_serial(f"serial:{modems.dte_b}:baudrate=115200")
    answerer = SerialAnswerer(
        reactor, settings, lambda: _phone(Role.ANSWERER, site), modem_init=["ATZ"], lock_dir=locks
    )
    answerer.startService()
    while answerer.opened == 0:
        await deferLater(reactor, 0.05, lambda: None)
    caller = _phone(Role.CALLER, FilePhoneStore(tmp_path / "hub", reactor))
    endpoint = SerialEndpoint(
        reactor, parse_serial(f"serial:{modems.dte_a}:baudrate=115200"), locks
    )
    plan = dial_plan(
        modem_init=["ATZ"],
        dial="1",
        chat=r"ogin: nuucp ssword: \P $",
        substitutions={"P": b"wrong"},
        chat_timeout=1.0,
    )
    try:
        with pytest.raises(CallFailed) as caught:
            await place_call(endpoint, plan, caller, reactor)
        login = await deferToThread(modems.wait_for, "login")
    finally:
        await answerer.stopService()
    assert caught.value.reply.code is ReplyCode.TIME
    assert login == {"event": "login", "side": "a", "user": "nuucp", "ok": False}
    assert caller.summary is None and answerer.calls == 0

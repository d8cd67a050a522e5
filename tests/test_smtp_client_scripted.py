"""The SMTP channel against a scripted Twisted SMTP server on 127.0.0.1 (tests/smtpserver.py).

Each test says how the server behaves, delivers one message the way the deliverer does
(tests/smtp_harness.py) and checks both sides: the per-recipient replies the channel
returned (and what the deliverer records from them), and what the server saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent

from relay.channels.smtp import SmtpChannel
from relay.channels.smtp.route_settings import RoutePolicies
from relay.config import Channel, Route, Smarthost, TlsPolicy
from relay.dns.mx import MxResolver
from relay.envelope import BodyType, Destination
from relay.reply import Action, ReplyCode

from support.reactor_helpers import logged_events, until
from support.smtp_harness import Outcome, channel_for, deliver, deliver_on, make_message, serving
from support.smtpserver import CLOSE, Script
from support.tlsfiles import TlsFiles, make_tls_files

A, B, C = "a@dest.test", "b@dest.test", "c@dest.test"
OK_ACTIONS = [Action.COMMIT] * 3


def _dest(port: int) -> str:
    return f"[127.0.0.1]:{port}"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _tls_channel(
    port: int,
    policy: TlsPolicy,
    ca_file: Path | None = None,
    user: str | None = None,
    password_file: Path | None = None,
) -> SmtpChannel:
    route = Route(
        "partner.test",
        Channel.SMTP,
        Smarthost("127.0.0.1", port, mx_lookup=False),
        tls=policy,
        auth_user=user,
        auth_password_file=password_file,
    )
    return SmtpChannel(
        reactor, MxResolver(None), "client.test", policies=RoutePolicies([route]), ca_file=ca_file
    )


@pytest_twisted.ensureDeferred
async def test_everything_accepted_with_pipelining_in_one_write() -> None:
    """All OK: every address AOK, final OK, MAIL+RCPTs+DATA arrive in one read, text intact."""
    text = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nlast line"
    async with serving(Script()) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B, C], text))
    assert [r.code for r in outcome.replies] == [ReplyCode.AOK] * 3
    assert outcome.final is not None and outcome.final.smtp_code == 250
    assert outcome.actions() == OK_ACTIONS
    [session] = factory.sessions
    assert [
        f"MAIL FROM:<sender@origin.test> SIZE={len(text)}",
        f"RCPT TO:<{A}>",
        f"RCPT TO:<{B}>",
        f"RCPT TO:<{C}>",
        "DATA",
    ] in session.batches
    [tx] = session.transactions
    assert tx.text == text + b"\r\n"
    assert b"\r\n...two\r\n" in tx.raw_text


@pytest_twisted.ensureDeferred
async def test_without_pipelining_commands_go_one_at_a_time() -> None:
    """A server without PIPELINING never gets a command before its previous reply."""
    script = Script(extensions=("8BITMIME", "ENHANCEDSTATUSCODES"))
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert outcome.actions() == [Action.COMMIT] * 2
    [session] = factory.sessions
    assert all(len(batch) == 1 for batch in session.batches), session.batches
    assert session.transactions[0].accepted == [A, B]


@pytest_twisted.ensureDeferred
async def test_per_recipient_temporary_and_permanent_refusals() -> None:
    """4xx to one RCPT defers it, 5xx bounces another, the third is delivered by the final OK."""
    script = Script(rcpt={A: "450 4.2.1 mailbox busy", B: "550 5.1.1 <b@dest.test>: user unknown"})
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B, C]))
    a, b, c = outcome.replies
    assert (a.code, a.smtp_code, a.enhanced, a.text) == (
        ReplyCode.LOCK,
        450,
        "4.2.1",
        "mailbox busy",
    )
    assert (b.code, b.smtp_code, b.enhanced) == (ReplyCode.USER, 550, "5.1.1")
    assert b.text == "<b@dest.test>: user unknown"
    assert c.code is ReplyCode.AOK
    assert outcome.actions() == [Action.RETRY, Action.BOUNCE, Action.COMMIT]
    assert factory.sessions[0].transactions[0].accepted == [C]


@pytest_twisted.ensureDeferred
async def test_all_recipients_refused_sends_no_text() -> None:
    """No AOK: the deliverer aborts; the channel sends RSET and no text (DATA refused)."""
    script = Script(rcpt={A: "550 5.1.1 no", B: "551 5.1.6 moved"})
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert outcome.final is None
    assert outcome.actions() == [Action.BOUNCE, Action.BOUNCE]
    session = factory.sessions[0]
    assert session.transactions[0].text is None
    assert "RSET" in session.commands


@pytest_twisted.ensureDeferred
async def test_refused_mail_from_is_every_recipients_reply() -> None:
    """A 5xx to MAIL FROM bounces every recipient with the server's words."""
    script = Script(replies={"MAIL": ["553 5.7.1 sender rejected"]})
    async with serving(script) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert [(r.smtp_code, r.enhanced, r.text) for r in outcome.replies] == [
        (553, "5.7.1", "sender rejected")
    ] * 2
    assert outcome.actions() == [Action.BOUNCE, Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_421_in_mid_transaction_defers_everything() -> None:
    """421 to the second RCPT: every recipient is deferred, the host marked dead; nothing sent."""
    script = Script(replies={"RCPT": ["250 2.1.5 ok", "421 4.3.2 going down"]})
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B, C]))
    assert outcome.replies[0].code is ReplyCode.AOK
    for i in range(3):
        fate = outcome.fate(i)
        assert fate.smtp_code == 421 and fate.code.action is Action.HOST_DEAD
        assert "going down" in fate.text
    assert factory.sessions[0].transactions[0].text is None


@pytest_twisted.ensureDeferred
async def test_server_closing_during_data_defers_the_recipients() -> None:
    """The server drops the connection in the middle of the text: NET for every AOK address."""
    text = b"Subject: big\r\n\r\n" + b"x" * 60 + b"\r\n" * 100
    async with serving(Script(close_in_text_after=50)) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B], text))
    assert outcome.final is not None
    assert outcome.final.code is ReplyCode.NET
    assert "lost connection with [127.0.0.1]" in outcome.final.text
    assert outcome.actions() == [Action.HOST_DEAD] * 2
    assert factory.sessions[0].transactions[0].text is None


@pytest_twisted.ensureDeferred
async def test_server_closing_after_rcpt_without_reply() -> None:
    """A server vanishing without a reply to RCPT: NET naming RCPT TO, for every recipient."""
    script = Script(extensions=("8BITMIME",), replies={"RCPT": ["250 ok", CLOSE]})
    async with serving(script) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert outcome.fate(1).code is ReplyCode.NET
    assert "while sending RCPT TO" in outcome.fate(1).text
    assert outcome.actions() == [Action.HOST_DEAD] * 2


@pytest_twisted.ensureDeferred
async def test_data_refused_is_the_final_reply() -> None:
    """A 554 to DATA is the final reply of the accepted recipients (bounced)."""
    script = Script(replies={"DATA": ["554 5.6.0 content rejected"]})
    async with serving(script) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.final is not None
    assert (outcome.final.smtp_code, outcome.final.enhanced) == (554, "5.6.0")
    assert outcome.actions() == [Action.BOUNCE]


@pytest_twisted.ensureDeferred
async def test_final_dot_temporary_failure_defers() -> None:
    """A 451 after the final dot defers every accepted recipient."""
    script = Script(replies={".": ["451 4.3.0 queue file write error"]})
    async with serving(script) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert outcome.actions() == [Action.RETRY] * 2


@pytest_twisted.ensureDeferred
async def test_8bit_message_needs_8bitmime() -> None:
    """8-bit text to a server without 8BITMIME bounces (5.6.3) unsent; with it, BODY=8BITMIME."""
    message = make_message(
        [A], "Subject: é\r\n\r\nçà\r\n".encode(), body_type=BodyType.EIGHT_BIT_MIME
    )
    async with serving(Script(extensions=("PIPELINING",))) as (port, factory):
        refused = await deliver(channel_for(), _dest(port), message)
    assert refused.replies[0].effective_enhanced == "5.6.3"
    assert refused.actions() == [Action.BOUNCE]
    assert factory.sessions[0].transactions == []
    async with serving(Script()) as (port, factory):
        sent = await deliver(channel_for(), _dest(port), message)
    assert sent.actions() == [Action.COMMIT]
    assert "BODY=8BITMIME" in factory.sessions[0].transactions[0].mail


@pytest_twisted.ensureDeferred
async def test_smtputf8_message_needs_smtputf8() -> None:
    """A UTF-8 address to a server without SMTPUTF8 bounces with 5.6.7; with it, it is sent."""
    message = make_message(["jörg@dest.test"], smtputf8=True)
    async with serving(Script(extensions=("PIPELINING", "8BITMIME"))) as (port, factory):
        refused = await deliver(channel_for(), _dest(port), message)
    assert refused.replies[0].effective_enhanced == "5.6.7"
    assert refused.actions() == [Action.BOUNCE]
    assert factory.sessions[0].transactions == []
    async with serving(Script()) as (port, factory):
        sent = await deliver(channel_for(), _dest(port), message)
    assert sent.actions() == [Action.COMMIT]
    tx = factory.sessions[0].transactions[0]
    assert tx.mail.endswith("SMTPUTF8") and tx.rcpts == ["jörg@dest.test"]


@pytest_twisted.ensureDeferred
async def test_size_limit_smaller_than_the_message_refuses_early() -> None:
    """A message over the server's SIZE limit gets FSIZ (5.3.4) without being sent."""
    message = make_message([A, B], b"x" * 200 + b"\r\n")
    async with serving(Script(extensions=("PIPELINING", "SIZE 100"))) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), message)
    assert [r.code for r in outcome.replies] == [ReplyCode.FSIZ] * 2
    assert "exceeds size limit 100" in outcome.replies[0].text
    assert outcome.actions() == [Action.BOUNCE] * 2
    assert "MAIL" not in " ".join(factory.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_helo_fallback_when_ehlo_is_refused() -> None:
    """A server that refuses EHLO gets HELO, and the mail goes (without ESMTP parameters)."""
    script = Script(ehlo="502 5.5.1 EHLO not implemented")
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    session = factory.sessions[0]
    assert session.commands[:2] == ["EHLO client.test", "HELO client.test"]
    assert session.transactions[0].mail == "FROM:<sender@origin.test>"


@pytest_twisted.ensureDeferred
async def test_greeting_refusal_fails_the_session() -> None:
    """A 554 greeting from the only host: SessionFailed, every recipient deferred (DHST)."""
    async with serving(Script(greeting="554 5.7.1 no thanks")) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A, B]))
    assert outcome.session_failed
    assert outcome.replies[0].code is ReplyCode.DHST
    assert "refused to talk to me: 554 5.7.1 no thanks" in outcome.replies[0].text
    assert outcome.actions() == [Action.HOST_DEAD] * 2


@pytest_twisted.ensureDeferred
async def test_garbage_greeting_is_a_protocol_error() -> None:
    """A server that does not speak SMTP: the session fails with BHST (host misbehaved)."""
    async with serving(Script(greeting="SSH-2.0-OpenSSH_9.2")) as (port, _):
        outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.session_failed
    assert outcome.replies[0].code is ReplyCode.BHST
    assert "protocol error" in outcome.replies[0].text
    assert outcome.actions() == [Action.HOST_DEAD]


@pytest_twisted.ensureDeferred
async def test_connection_refused_fails_the_session() -> None:
    """Nothing listening: SessionFailed with 'Connection refused', recipients deferred."""
    async with serving(Script()) as (port, _):
        pass  # the port is closed again: a refused connection
    outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.replies[0].text == f"connect to [127.0.0.1]:{port}: Connection refused"
    assert outcome.actions() == [Action.HOST_DEAD]


# --- STARTTLS -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_is_used_when_offered(tls_files: TlsFiles) -> None:
    """STARTTLS offered: the default policy encrypts (without verifying) and delivers."""
    script = Script(tls=tls_files.server_context())
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    session = factory.sessions[0]
    assert session.tls
    assert session.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]


@pytest_twisted.ensureDeferred
async def test_required_tls_with_a_verified_certificate(tls_files: TlsFiles) -> None:
    """tls = required and a certificate from the configured CA naming 127.0.0.1: delivered."""
    async with serving(Script(tls=tls_files.server_context())) as (port, factory):
        channel = _tls_channel(port, TlsPolicy.REQUIRED, tls_files.ca_file)
        outcome = await deliver(channel, _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    assert factory.sessions[0].tls


@pytest_twisted.ensureDeferred
async def test_required_tls_with_an_untrusted_certificate_defers(tls_files: TlsFiles) -> None:
    """tls = required and a certificate from another CA: no mail, deferred (4.7.5)."""
    async with serving(Script(tls=tls_files.server_context())) as (port, factory):
        channel = _tls_channel(port, TlsPolicy.REQUIRED, tls_files.other_ca_file)
        outcome = await deliver(channel, _dest(port), make_message([A]))
    assert outcome.session_failed
    reply = outcome.replies[0]
    assert reply.effective_enhanced == "4.7.5" and "TLS handshake" in reply.text
    assert outcome.actions() == [Action.HOST_DEAD]
    assert all(not s.transactions for s in factory.sessions)
    assert len(factory.sessions) == 1  # required: never retried in clear


@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered_defers(tls_files: TlsFiles) -> None:
    """tls = required and no STARTTLS offered: deferred, 'TLS is required, but was not offered'."""
    async with serving(Script()) as (port, factory):
        channel = _tls_channel(port, TlsPolicy.REQUIRED, tls_files.ca_file)
        outcome = await deliver(channel, _dest(port), make_message([A]))
    reply = outcome.replies[0]
    assert reply.text == f"TLS is required, but was not offered by host [127.0.0.1]:{port}"
    assert reply.effective_enhanced == "4.7.4"
    assert outcome.actions() == [Action.HOST_DEAD]
    assert factory.sessions[0].transactions == []
    await until(lambda: factory.sessions[0].closed)
    assert factory.sessions[0].commands[-1] == "QUIT"


@pytest_twisted.ensureDeferred
async def test_tls_none_never_starts_tls(tls_files: TlsFiles) -> None:
    """tls = none: STARTTLS is offered but never sent."""
    async with serving(Script(tls=tls_files.server_context())) as (port, factory):
        outcome = await deliver(_tls_channel(port, TlsPolicy.NONE), _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    assert "STARTTLS" not in factory.sessions[0].commands


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_failing_handshake_retries_in_clear(tls_files: TlsFiles) -> None:
    """A server that says 220 to STARTTLS but cannot do TLS: the same address again, in clear."""
    script = Script(tls=tls_files.server_context(), broken_tls=True)
    async with serving(script) as (port, factory):
        outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    first, second = factory.sessions
    assert "STARTTLS" in first.commands and not first.transactions
    assert "STARTTLS" not in second.commands and second.transactions[0].accepted == [A]


# --- AUTH ---------------------------------------------------------------------------------


def _password_file(tmp_path: Path, password: str) -> Path:
    path = tmp_path / "password"
    path.write_text(password + "\n")
    return path


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_auth_to_a_smarthost_over_tls(
    tls_files: TlsFiles, tmp_path: Path, mechanisms: str
) -> None:
    """Configured credentials are sent (PLAIN preferred, else LOGIN) once TLS is up."""
    script = Script(
        tls=tls_files.server_context(), users={"relay": "s3cret"}, auth_mechanisms=mechanisms
    )
    async with serving(script) as (port, factory):
        channel = _tls_channel(
            port, TlsPolicy.OPPORTUNISTIC, None, "relay", _password_file(tmp_path, "s3cret")
        )
        outcome = await deliver(channel, _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    session = factory.sessions[0]
    assert session.auth_user == "relay" and session.tls
    assert any(c.startswith(f"AUTH {mechanisms.split()[0]}") for c in session.commands)


@pytest_twisted.ensureDeferred
async def test_auth_failure_defers(tls_files: TlsFiles, tmp_path: Path) -> None:
    """Wrong credentials: the session fails with 4.7.8 and the mail waits (never bounces)."""
    script = Script(tls=tls_files.server_context(), users={"relay": "right"})
    async with serving(script) as (port, factory):
        channel = _tls_channel(
            port, TlsPolicy.OPPORTUNISTIC, None, "relay", _password_file(tmp_path, "wrong")
        )
        outcome = await deliver(channel, _dest(port), make_message([A]))
    reply = outcome.replies[0]
    assert reply.effective_enhanced == "4.7.8" and "535" in reply.text
    assert outcome.actions() == [Action.HOST_DEAD]
    assert factory.sessions[0].transactions == []


@pytest_twisted.ensureDeferred
async def test_credentials_are_not_sent_without_tls(tmp_path: Path) -> None:
    """A server offering AUTH but not STARTTLS never sees the password; the mail waits."""
    script = Script(users={"relay": "s3cret"})
    async with serving(script) as (port, factory):
        channel = _tls_channel(
            port, TlsPolicy.OPPORTUNISTIC, None, "relay", _password_file(tmp_path, "s3cret")
        )
        outcome = await deliver(channel, _dest(port), make_message([A]))
    assert "without TLS" in outcome.replies[0].text
    assert outcome.actions() == [Action.HOST_DEAD]
    assert not any(c.startswith("AUTH") for c in factory.sessions[0].commands)


# --- connection reuse -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_second_session_reuses_the_idle_connection() -> None:
    """Two sessions to one destination share one connection, with RSET before the second."""
    channel = channel_for()
    async with serving(Script()) as (port, factory):
        first = await deliver(channel, _dest(port), make_message([A]))
        assert channel.idle_connections(_dest(port)) == 1
        second = await deliver(channel, _dest(port), make_message([B], queue_id="q2"))
        await channel.close_idle()
    assert first.actions() == second.actions() == [Action.COMMIT]
    assert len(factory.sessions) == 1
    session = factory.sessions[0]
    assert [t.accepted for t in session.transactions] == [[A], [B]]
    assert session.commands.index("RSET") < session.commands.index(f"RCPT TO:<{B}>")
    assert channel.connections_opened == 1 and channel.connections_reused == 1
    assert session.commands[-1] == "QUIT"


@pytest_twisted.ensureDeferred
async def test_message_cap_per_connection() -> None:
    """With max_messages=2, three messages on one session use two connections."""
    channel = channel_for(max_messages=2)
    async with serving(Script()) as (port, factory):
        session = await channel.open_session(_destination(port))
        outcomes: list[Outcome] = []
        for i in range(3):
            outcomes.append(await deliver_on(session, make_message([A], queue_id=f"q{i}")))
        await session.end_session()
        await channel.close_idle()
    assert [o.actions() for o in outcomes] == [[Action.COMMIT]] * 3
    assert [len(s.transactions) for s in factory.sessions] == [2, 1]
    assert factory.sessions[0].commands[-1] == "QUIT"


@pytest_twisted.ensureDeferred
async def test_rset_after_an_abandoned_transaction() -> None:
    """After a message whose recipients were all refused, the next one starts clean."""
    channel = channel_for()
    script = Script(rcpt={A: "550 5.1.1 no"})
    async with serving(script) as (port, factory):
        session = await channel.open_session(_destination(port))
        refused = await deliver_on(session, make_message([A]))
        sent = await deliver_on(session, make_message([B], queue_id="q2"))
        await session.end_session()
        await channel.close_idle()
    assert refused.actions() == [Action.BOUNCE]
    assert sent.actions() == [Action.COMMIT]
    commands = factory.sessions[0].commands
    assert commands.count("RSET") == 1
    assert commands.index("RSET") < commands.index(f"RCPT TO:<{B}>")


@pytest_twisted.ensureDeferred
async def test_a_cached_connection_the_server_closed_is_replaced() -> None:
    """If the idle connection died (the server's 421 timeout), the next session reconnects."""
    channel = channel_for()
    async with serving(Script(replies={"RSET": ["421 4.4.2 idle timeout"]})) as (port, factory):
        await deliver(channel, _dest(port), make_message([A]))
        outcome = await deliver(channel, _dest(port), make_message([B], queue_id="q2"))
        await channel.close_idle()
    assert outcome.actions() == [Action.COMMIT]
    assert len(factory.sessions) == 2
    assert channel.connections_reused == 0


def _destination(port: int) -> Destination:
    return Destination("smtp", _dest(port))


@pytest_twisted.ensureDeferred
async def test_next_message_after_a_dropped_connection_reconnects() -> None:
    """The server vanishes at the end of the first message; the second one reconnects and goes."""
    channel = channel_for()
    async with serving(Script(replies={".": [CLOSE]})) as (port, factory):
        session = await channel.open_session(_destination(port))
        first = await deliver_on(session, make_message([A]))
        second = await deliver_on(session, make_message([B], queue_id="q2"))
        await session.end_session()
        await channel.close_idle()
    assert first.actions() == [Action.HOST_DEAD]
    assert first.final is not None and "more than once" in first.final.text
    assert second.actions() == [Action.COMMIT]
    assert len(factory.sessions) == 2 and channel.connections_opened == 2


# --- what reaches the log -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_remote_greeting_is_logged_escaped() -> None:
    """A refusing server's text with Unicode line breaks is logged on one line."""
    script = Script(greeting="554 5.7.1 no\u2028smtp: forged line\x85")
    with logged_events() as events:
        async with serving(script) as (port, _):
            outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.session_failed
    lines = [formatEvent(e) for e in events if "refused to talk" in formatEvent(e)]
    assert lines and all(line.isprintable() for line in lines), lines
    assert "no\\u2028smtp: forged line" in lines[0]


@pytest_twisted.ensureDeferred
async def test_a_refused_starttls_is_logged_escaped(tls_files: TlsFiles) -> None:
    """The text of a refused STARTTLS (opportunistic: go on in clear) is logged on one line."""
    script = Script(
        tls=tls_files.server_context(), replies={"STARTTLS": ["454 4.7.0 not\u2028now\x85"]}
    )
    with logged_events() as events:
        async with serving(script) as (port, _):
            outcome = await deliver(channel_for(), _dest(port), make_message([A]))
    assert outcome.actions() == [Action.COMMIT]
    lines = [formatEvent(e) for e in events if "refused STARTTLS" in formatEvent(e)]
    assert lines and all(line.isprintable() for line in lines), lines
    assert "454 4.7.0 not\\u2028now\\x85" in lines[0]

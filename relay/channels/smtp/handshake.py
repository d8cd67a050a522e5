"""Setting up an SMTP session: greeting, EHLO (HELO), STARTTLS, EHLO again, AUTH.

Each step's failure is an :class:`AttemptFailed` carrying the reply the mail would get
if no other host works out, so the connector can move on to the next address or MX
host, as RFC 5321 §5.1 asks (and Postfix does) for anything that says "not this host,
not now":

* a 4xx or 5xx greeting (Postfix's ``smtp_skip_5xx_greeting``: a 5xx greeting refuses
  *us*, not the mail, so it is not a reason to bounce);
* EHLO refused, and HELO refused after it;
* ``tls = "required"`` and no STARTTLS offered (or STARTTLS refused): ``4.7.4``;
* a failed TLS handshake, including a certificate that does not verify: ``4.7.5``
  (``tls_handshake`` is set, so that the connector can retry without TLS when the
  policy is only opportunistic);
* credentials configured but no TLS to send them over (``4.7.4``), or AUTH refused
  (``4.7.8``): every message to this host would fail the same way, so it waits and the
  host is marked dead, rather than bouncing on a configuration mistake.

SASL PLAIN is preferred (one round trip), then LOGIN.  If the server offers no AUTH at
all, the mail is sent without it, as Postfix does: a server that needs it will say so
per recipient.
"""

from __future__ import annotations

from twisted.logger import Logger

from relay.channels.smtp.protocol import SmtpClientError, SmtpClientProtocol, TlsHandshakeFailed
from relay.channels.smtp.route_settings import RoutePolicy
from relay.channels.smtp.tls import TlsContexts
from relay.config import TlsPolicy
from relay.errors import RelayError
from relay.oneline import escape
from relay.reply import Reply, ReplyCode
from relay.sansio.smtp.client import Auth, AuthResponse, Ehlo, Helo, StartTls
from relay.sansio.smtp.wire import SmtpReply

__all__ = ["AttemptFailed", "handshake"]

_log = Logger()


class AttemptFailed(RelayError):
    """One address of one host did not work out; ``reply`` says why (always temporary)."""

    def __init__(self, reply: Reply, *, tls_handshake: bool = False) -> None:
        super().__init__(reply.description)
        self.reply = reply
        self.tls_handshake = tls_handshake


async def handshake(
    proto: SmtpClientProtocol,
    *,
    helo_name: str,
    policy: RoutePolicy,
    tls: TlsContexts,
    server_name: str,
) -> None:
    """Take a fresh connection to "ready for MAIL"; raise :class:`AttemptFailed` if not."""
    try:
        await _handshake(proto, helo_name, policy, tls, server_name)
    except SmtpClientError as e:
        raise AttemptFailed(e.reply(), tls_handshake=isinstance(e, TlsHandshakeFailed)) from e


async def _handshake(
    proto: SmtpClientProtocol,
    helo_name: str,
    policy: RoutePolicy,
    tls: TlsContexts,
    server_name: str,
) -> None:
    greeting = await proto.greeting
    if not greeting.is_positive:
        raise AttemptFailed(_refused(proto, greeting, "greeting"))
    await _hello(proto, helo_name)
    if policy.tls is not TlsPolicy.NONE:
        await _starttls(proto, helo_name, policy, tls, server_name)
    if policy.credentials is not None:
        await _authenticate(proto, policy)


async def _hello(proto: SmtpClientProtocol, helo_name: str) -> None:
    """EHLO; HELO if the server does not know EHLO (a 5xx other than a goodbye)."""
    reply = await proto.command(Ehlo(helo_name))
    if reply.code // 100 == 2:
        return
    if reply.code >= 500 and proto.usable:
        reply = await proto.command(Helo(helo_name))
        if reply.code // 100 == 2:
            return
    raise AttemptFailed(_refused(proto, reply, "EHLO/HELO"))


async def _starttls(
    proto: SmtpClientProtocol,
    helo_name: str,
    policy: RoutePolicy,
    tls: TlsContexts,
    server_name: str,
) -> None:
    required = policy.tls is TlsPolicy.REQUIRED
    if not proto.engine.offers("STARTTLS"):
        if required:
            raise AttemptFailed(
                _tls_problem(f"TLS is required, but was not offered by host {proto.peer}")
            )
        return
    reply = await proto.command(StartTls())
    if reply.code // 100 != 2:
        if required or not proto.usable:
            raise AttemptFailed(
                _tls_problem(f"TLS is required, but host {proto.peer} refused STARTTLS: {reply}")
            )
        _log.info(
            "{peer} refused STARTTLS ({reply}); going on in clear",
            peer=proto.peer,
            reply=escape(str(reply)),
        )
        return
    await proto.start_tls(tls.client_options(policy.tls, server_name))
    await _hello(proto, helo_name)


async def _authenticate(proto: SmtpClientProtocol, policy: RoutePolicy) -> None:
    credentials = policy.credentials
    assert credentials is not None
    mechanisms = proto.engine.auth_mechanisms
    if not mechanisms:
        _log.warn("{peer} offers no AUTH; sending without it", peer=proto.peer)
        return
    if credentials.require_tls and not proto.tls_active:
        raise AttemptFailed(
            _tls_problem(f"not sending AUTH credentials to {proto.peer} without TLS")
        )
    user, password = credentials.user.encode(), credentials.password.encode()
    if "PLAIN" in mechanisms:
        reply = await proto.command(Auth("PLAIN", b"\0" + user + b"\0" + password))
    elif "LOGIN" in mechanisms:
        reply = await proto.command(Auth("LOGIN"))
        for answer in (user, password):
            if reply.code != 334:
                break
            reply = await proto.command(AuthResponse(answer))
        if reply.code == 334:  # a third challenge: LOGIN has only two
            reply = await proto.command(AuthResponse(None))
    else:
        offered = " ".join(sorted(mechanisms))
        raise AttemptFailed(
            Reply(
                ReplyCode.DHST,
                f"no SASL mechanism in common with {proto.peer} (it offers {offered})",
                enhanced="4.7.8",
            )
        )
    if reply.code // 100 != 2:
        raise AttemptFailed(
            Reply(
                ReplyCode.DHST,
                f"SASL authentication failed; server {proto.peer} said: {reply}",
                enhanced="4.7.8",
            )
        )


def _refused(proto: SmtpClientProtocol, reply: SmtpReply, what: str) -> Reply:
    return Reply(
        ReplyCode.DHST,
        f"host {proto.peer} refused to talk to me: {reply} (in reply to {what})",
    )


def _tls_problem(text: str) -> Reply:
    return Reply(ReplyCode.DHST, text, enhanced="4.7.4")

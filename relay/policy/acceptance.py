"""Who may send what to whom: the acceptance rules of every intake, as pure decisions.

The rules (docs/configuration.md, ``[smtp]``), applied to each ``RCPT TO``:

1. A recipient routed to the local channel (a local domain, a loopback address literal,
   or a ``[[route]]`` with ``channel = "local"``) is accepted only if
   :meth:`~relay.interfaces.ILocalRecipients.exists` knows it: otherwise
   ``550 5.1.1``, during the dialogue, so no bounce is ever made for a guessed name.
   The local part is looked up whole: ``user%evil.test@here`` is a local user named
   ``user%evil.test`` or nobody, never a request to forward to ``evil.test``.
2. A client in ``trusted_networks``, or an authenticated one, may send to any domain.
3. A recipient whose domain matches ``[smtp] relay_domains`` is accepted from anyone:
   this relay is the way in for that domain (Postfix's ``relay_domains`` and
   ``permit_auth_destination``).  Except that an untrusted client may not use a
   routing trick on it (``%``-hack, bang path, quoted ``@``): those ask the next hop to
   relay further, which would make us a laundering step (Postfix's
   ``allow_untrusted_routing = no``).
4. Any other domain gets ``554 5.7.1 Relay access denied``, whether or not a
   ``[[route]]`` matches it: a route says where mail goes, not who may send it, so a
   route for outbound mail (a smarthost, a phone site) does not make this an open relay
   for its domain.

Routing is decided by the same :class:`~relay.policy.routing.Router` the deliverer uses,
by the *final* domain only: a source route (``<@local:user@evil.test>``) is inert and
cannot make a remote address look local.  The sender (``MAIL FROM``) is not restricted:
that is the job of authentication and of filters downstream.

:meth:`RelayPolicy.decide_recipient` also returns the :class:`~relay.envelope.Destination`
it routed an accepted recipient to, and the gateway stores it in the envelope: the
spool's per-destination index, ``relay queue`` and ``relay flush --channel`` see where
each recipient goes from the moment it is queued, and the deliverer need not route it
again.  The route is the one in force when the message was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from relay.address import Address, RoutingTrick
from relay.config import Config
from relay.envelope import Destination
from relay.interfaces import ILocalRecipients
from relay.policy.routing import NoRoute, Router
from relay.sansio.smtp.events import MailFrom
from relay.sansio.smtp.wire import SmtpReply

__all__ = ["RecipientDecision", "RelayPolicy"]

_FORWARDING_TRICKS: Final = (
    RoutingTrick.PERCENT_HACK | RoutingTrick.BANG_PATH | RoutingTrick.QUOTED_AT
)

SENDER_OK: Final = SmtpReply(250, "2.1.0", ("Ok",))
RECIPIENT_OK: Final = SmtpReply(250, "2.1.5", ("Ok",))
RELAY_DENIED: Final = SmtpReply(554, "5.7.1", ("Relay access denied",))
_TRUST_CACHE: Final = 4096  # client addresses whose trust is remembered


@dataclass(frozen=True, slots=True)
class RecipientDecision:
    """The reply to one RCPT TO and, when it is accepted, where the recipient goes."""

    reply: SmtpReply
    destination: Destination | None = None


class RelayPolicy:
    """The acceptance rules for one configuration; build once, ask per command."""

    def __init__(
        self, config: Config, local_recipients: ILocalRecipients, router: Router | None = None
    ) -> None:
        """``router`` is the relay's one router (so RCPT never accepts what the deliverer
        cannot route, e.g. to a channel that is not running); a fresh one if None."""
        self._config = config
        self._router = router if router is not None else Router(config)
        self._local = local_recipients
        self._trusted: dict[str, bool] = {}  # asked at every RCPT; clients come back

    def is_trusted(self, client_ip: str) -> bool:
        """Whether the client is in ``trusted_networks``."""
        known = self._trusted.get(client_ip)
        if known is None:
            known = self._config.smtp.is_trusted(client_ip)
            if len(self._trusted) >= _TRUST_CACHE:
                self._trusted.clear()
            self._trusted[client_ip] = known
        return known

    def may_relay(self, client_ip: str, authenticated: bool) -> bool:
        """Whether a client may send to any domain: trusted network, or authenticated."""
        return authenticated or self.is_trusted(client_ip)

    def check_sender(self, mail: MailFrom) -> SmtpReply:
        """The reply to an (already well-formed and size-checked) MAIL FROM."""
        return SENDER_OK

    def check_recipient(self, address: Address, *, may_relay: bool) -> SmtpReply:
        """The reply to RCPT TO for ``address`` from a client that may (not) relay."""
        return self.decide_recipient(address, may_relay=may_relay).reply

    def decide_recipient(self, address: Address, *, may_relay: bool) -> RecipientDecision:
        """The reply to RCPT TO for ``address``, with its destination if accepted."""
        try:
            destination = self._router.route(address)
        except NoRoute as e:
            reply = e.reply
            return RecipientDecision(
                SmtpReply(
                    reply.effective_smtp_code,
                    reply.effective_enhanced,
                    (_safe(reply.description),),
                )
            )
        if destination.channel == "local":
            if self._local.exists(address):
                return RecipientDecision(RECIPIENT_OK, destination)
            text = f"{_safe(str(address))}: Recipient address rejected: User unknown"
            return RecipientDecision(SmtpReply(550, "5.1.1", (text,)))
        if may_relay:
            return RecipientDecision(RECIPIENT_OK, destination)
        if self._config.smtp.relays_to(address.domain):
            if address.tricks & _FORWARDING_TRICKS:
                return RecipientDecision(RELAY_DENIED)
            return RecipientDecision(RECIPIENT_OK, destination)
        return RecipientDecision(RELAY_DENIED)


def _safe(text: str) -> str:
    """Text for a reply line: ASCII, no controls (it may quote the client's address)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]

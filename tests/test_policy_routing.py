"""Tests for relay.policy.routing: local domains, routes, the MX default, and NoRoute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay.address import Address, parse_forward_path, parse_mailbox
from relay.config import Channel, Config, Route, Smarthost, parse_config
from relay.envelope import Destination
from relay.policy.routing import LOCAL, NoRoute, Router, route_recipient
from relay.reply import ReplyCode

CONFIG = """
[relay]
hostname = "hub.example.test"
local_domains = ["example.test", "other.example.test"]

[[route]]
domain = "partner.test"
channel = "smtp"
smarthost = "127.0.0.1:2526"

[[route]]
domain = "*.partner.test"
channel = "smtp"

[[route]]
domain = "site-b.test"
channel = "phone"
site = "site-b"

[[route]]
domain = "*.site-b.test"
channel = "smtp"
smarthost = "[mail.site-b.test]:587"

[[route]]
domain = "deep.site-b.test"
channel = "phone"
site = "site-b"

[[route]]
domain = "mirror.test"
channel = "local"

[phone.sites.site-b]
secret_file = "secret"
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "secret").write_text("s3cret\n")
    return parse_config(CONFIG, tmp_path)


@pytest.fixture
def router(config: Config) -> Router:
    return Router(config)


def addr(text: str) -> Address:
    return parse_mailbox(text)


def test_local_domain_goes_to_local(router: Router) -> None:
    """An address in a local domain is routed to the one local destination."""
    assert router.route(addr("alice@example.test")) == Destination("local", "")
    assert router.route(addr("bob@other.example.test")) == LOCAL


def test_local_domain_matches_any_case(router: Router) -> None:
    """Domains compare case-insensitively, because addresses store them lowercased."""
    assert router.route(addr("Alice@EXAMPLE.Test")) == LOCAL


def test_subdomain_of_local_domain_is_not_local(router: Router) -> None:
    """Local domains match exactly: a subdomain not listed goes out by MX."""
    assert router.route(addr("x@sub.example.test")) == Destination("smtp", "sub.example.test")


def test_exact_route_with_smarthost(router: Router) -> None:
    """An SMTP route with a smarthost sends to it, an IP address bracketed (no MX lookup)."""
    assert router.route(addr("x@partner.test")) == Destination("smtp", "[127.0.0.1]:2526")


def test_bracketed_smarthost_keeps_its_brackets(router: Router) -> None:
    """A [bracketed] smarthost keeps its brackets, so the channel knows not to look up MX."""
    assert router.route(addr("x@a.site-b.test")) == Destination("smtp", "[mail.site-b.test]:587")


def test_wildcard_route_without_smarthost_uses_domain(router: Router) -> None:
    """A wildcard SMTP route without a smarthost goes to the recipient's own domain by MX."""
    assert router.route(addr("x@mx.partner.test")) == Destination("smtp", "mx.partner.test")
    assert router.route(addr("x@a.b.partner.test")) == Destination("smtp", "a.b.partner.test")


def test_wildcard_does_not_match_the_bare_domain(config: Config) -> None:
    """``*.x`` matches the domains below x, never x itself."""
    only_wildcard = dataclasses.replace(config, routes=(config.routes[1],))
    assert Router(only_wildcard).route(addr("x@partner.test")) == Destination(
        "smtp", "partner.test"
    )


def test_phone_route_goes_to_site(router: Router) -> None:
    """A phone route's destination key is the site's name."""
    assert router.route(addr("x@site-b.test")) == Destination("phone", "site-b")


def test_first_matching_route_wins(router: Router) -> None:
    """An earlier wildcard route beats a later exact one, because order decides."""
    assert router.route(addr("x@deep.site-b.test")) == Destination("smtp", "[mail.site-b.test]:587")


def test_local_route(router: Router) -> None:
    """A route to the local channel gives the local destination."""
    assert router.route(addr("x@mirror.test")) == LOCAL


def test_local_domains_come_before_routes(config: Config) -> None:
    """A local domain is local even when a route would also match it."""
    route = Route("example.test", Channel.SMTP, Smarthost("relay.test"))
    cfg = dataclasses.replace(config, routes=(route,))
    assert Router(cfg).route(addr("x@example.test")) == LOCAL


def test_default_is_smtp_by_domain(router: Router) -> None:
    """Mail for no local domain and no route goes by SMTP to its domain."""
    assert router.route(addr("x@elsewhere.test")) == Destination("smtp", "elsewhere.test")


def test_address_literal_goes_to_the_literal(router: Router) -> None:
    """An address literal is routed to itself, for the channel to connect without DNS."""
    assert router.route(addr("x@[192.0.2.7]")) == Destination("smtp", "[192.0.2.7]")
    assert router.route(addr("x@[IPv6:2001:db8::1]")) == Destination("smtp", "[IPv6:2001:db8::1]")


@pytest.mark.parametrize("text", ["x@[127.0.0.1]", "x@[127.1.2.3]", "x@[IPv6:::1]"])
def test_loopback_literal_is_local(router: Router, text: str) -> None:
    """A loopback address literal is this host, so it is local, never sent out again."""
    assert router.route(addr(text)) == LOCAL


@pytest.mark.parametrize(
    "text", ["x@[0.0.0.0]", "x@[224.0.0.1]", "x@[255.255.255.255]", "x@[IPv6:ff02::1]"]
)
def test_unroutable_literal_raises_no_route(router: Router, text: str) -> None:
    """A literal naming no host (unspecified, multicast, reserved) fails permanently."""
    with pytest.raises(NoRoute) as caught:
        router.route(addr(text))
    reply = caught.value.reply
    assert reply.code is ReplyCode.NDEL
    assert reply.code.is_permanent
    assert reply.effective_enhanced == "5.1.2"
    assert "names no host" in reply.description


def test_route_to_channel_not_running(config: Config) -> None:
    """A route to a channel this relay does not run fails permanently, naming the channel."""
    router = Router(config, channels={"smtp", "local"})
    with pytest.raises(NoRoute) as caught:
        router.route(addr("x@site-b.test"))
    assert caught.value.reply.code is ReplyCode.MECH
    assert caught.value.reply.effective_enhanced == "5.3.5"
    assert "'phone'" in caught.value.reply.description
    assert router.route(addr("x@partner.test")) == Destination("smtp", "[127.0.0.1]:2526")


def test_default_smtp_needs_smtp_channel(config: Config) -> None:
    """Without an smtp channel, remote mail has no route and says so."""
    router = Router(config, channels={"local", "phone"})
    with pytest.raises(NoRoute) as caught:
        router.route(addr("x@elsewhere.test"))
    assert "'smtp'" in caught.value.reply.description
    assert router.route(addr("x@example.test")) == LOCAL


def test_phone_route_to_unknown_site(config: Config) -> None:
    """A phone route whose site is not configured fails permanently, naming the site."""
    route = Route("lost.test", Channel.PHONE, site="nowhere")
    router = Router(dataclasses.replace(config, routes=(route,)))
    with pytest.raises(NoRoute) as caught:
        router.route(addr("x@lost.test"))
    assert caught.value.reply.code is ReplyCode.MECH
    assert "'nowhere'" in caught.value.reply.description
    assert str(caught.value) == caught.value.reply.description


def test_phone_route_without_site(config: Config) -> None:
    """A phone route that names no site cannot deliver and says so."""
    route = Route("lost.test", Channel.PHONE)
    router = Router(dataclasses.replace(config, routes=(route,)))
    with pytest.raises(NoRoute, match="without a site"):
        router.route(addr("x@lost.test"))


@pytest.mark.parametrize(
    "path",
    [
        "<user%elsewhere.test@example.test>",
        "<elsewhere.test!user@example.test>",
        '<"user@elsewhere.test"@example.test>',
        "<@relay.elsewhere.test:user@example.test>",
    ],
)
def test_routing_tricks_on_local_domain_stay_local(router: Router, path: str) -> None:
    """A routing trick aimed at a local domain goes to local whole, never to the other host."""
    address = parse_forward_path(path)
    assert address.tricks
    assert router.route(address) == LOCAL


def test_routing_tricks_on_remote_domain_route_by_domain(router: Router) -> None:
    """For a remote domain a trick is ignored: the address goes by its own domain."""
    address = parse_forward_path("<user%example.test@elsewhere.test>")
    assert router.route(address) == Destination("smtp", "elsewhere.test")


def test_route_recipient_function(config: Config) -> None:
    """The one-off function routes the same way as a Router."""
    assert route_recipient(addr("x@site-b.test"), config) == Destination("phone", "site-b")
    with pytest.raises(NoRoute):
        route_recipient(addr("x@site-b.test"), config, channels={"smtp"})


def test_default_config_routes_localhost_locally(tmp_path: Path) -> None:
    """The embedded default delivers mail for localhost locally and the rest by SMTP."""
    cfg = parse_config('[relay]\nhostname = "localhost"\n', tmp_path)
    router = Router(cfg)
    assert router.route(addr("postmaster@localhost")) == LOCAL
    assert router.route(addr("x@example.org")) == Destination("smtp", "example.org")

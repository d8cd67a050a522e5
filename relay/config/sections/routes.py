"""``[[route]]``: which channel mail for a domain takes, first match first."""

from __future__ import annotations

from relay.config.model import Channel, PhoneSection, Route, TlsPolicy
from relay.config.reader import _finished, _Paths, _Table
from relay.config.values import (
    _channel,
    _domain_pattern,
    _expected,
    _site_name,
    _smarthost,
    _string,
    _tls_policy,
)


def _read_routes(top: _Table, paths: _Paths, phone: PhoneSection) -> tuple[Route, ...]:
    what = "an array of tables ([[route]])"
    if not top.has("route"):
        return ()
    value = top.data["route"]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        top.problem("route", str(_expected(what, value)))
        return ()
    routes: list[Route] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        t = _Table(item, f"route[{index}]", top.problems)
        route = _finished(t, lambda t: _read_route(t, paths, phone))
        if route.domain in first_index and t.valid("domain"):
            earlier = first_index[route.domain]
            t.problem("domain", f"same domain as route[{earlier}], which always matches first")
        first_index.setdefault(route.domain, index)
        routes.append(route)
    return tuple(routes)


_SMTP_ONLY = ("smarthost", "tls", "auth_user", "auth_password_file")


def _read_route(t: _Table, paths: _Paths, phone: PhoneSection) -> Route:
    d = Route("")  # the field defaults; the domain is required
    route = Route(
        domain=t.require("domain", _domain_pattern, d.domain),
        channel=t.get("channel", _channel, d.channel),
        smarthost=t.get("smarthost", _smarthost, d.smarthost),
        tls=t.get("tls", _tls_policy, d.tls),
        auth_user=t.get("auth_user", _string, d.auth_user),
        auth_password_file=t.get("auth_password_file", paths.file, d.auth_password_file),
        site=t.get("site", _site_name, d.site),
    )
    if not t.valid("channel"):
        return route
    if route.channel is not Channel.SMTP:
        for key in filter(t.has, _SMTP_ONLY):
            t.problem(key, f"only allowed with channel 'smtp', not {route.channel.value!r}")
    else:
        _check_route_auth(t, route)
    _check_route_site(t, route, phone)
    return route


def _check_route_auth(t: _Table, route: Route) -> None:
    """A login comes with its password, and a password is not sent without TLS."""
    has_user, has_password = t.has("auth_user"), t.has("auth_password_file")
    if has_user and not has_password:
        t.problem("auth_password_file", f"required when {t.key('auth_user')} is set")
    if has_password and not has_user:
        t.problem("auth_user", f"required when {t.key('auth_password_file')} is set")
    if (has_user or has_password) and route.tls is TlsPolicy.NONE and t.valid("tls"):
        t.problem("tls", "cannot be 'none' on a route that authenticates")


def _check_route_site(t: _Table, route: Route, phone: PhoneSection) -> None:
    """Channel phone needs a site that ``[phone.sites]`` defines; other channels none."""
    if route.channel is not Channel.PHONE:
        if t.has("site"):
            t.problem("site", f"only allowed with channel 'phone', not {route.channel.value!r}")
        return
    if not t.has("site"):
        t.problem("site", "required with channel 'phone'")
    elif route.site is not None and route.site not in phone.sites:
        t.problem("site", f"no such site in [phone.sites]: {route.site!r}")

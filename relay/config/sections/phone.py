"""``[phone]`` and ``[phone.sites.NAME]``: the serial link, where calls are answered, the sites."""

from __future__ import annotations

from types import MappingProxyType

from relay.config.model import PhoneSection, PhoneSite, SerialTransport
from relay.config.reader import _Paths, _Table
from relay.config.values import (
    _SITE_RULE,
    _answer_transport,
    _any_string,
    _boolean,
    _duration,
    _expected,
    _is_site_name,
    _positive_duration,
    _positive_int,
    _site_name,
    _site_transport,
    _string,
    _time_of_day,
    _time_window,
)


def _read_phone(t: _Table, paths: _Paths, hostname: str) -> PhoneSection:
    d = PhoneSection()
    answer = t.get_list("answer", _answer_transport, d.answer, "transports")
    default_name = hostname.split(".", 1)[0]
    own_name = t.get("name", _site_name, default_name if _is_site_name(default_name) else "relay")
    sites_table = t.table("sites")
    sites: dict[str, PhoneSite] = {}
    for name, value in sites_table.data.items():
        sites_table.known.add(name)
        site = _read_site(sites_table, name, value, paths)
        if site is not None:
            sites[name] = site
    modem_init = (
        t.get_list("modem_init", _any_string, (), "AT commands") if t.has("modem_init") else None
    )
    lock_dir = t.get("lock_dir", paths.path, paths.base / d.lock_dir)
    handshake_timeout = t.get("handshake_timeout", _positive_duration, d.handshake_timeout)
    return PhoneSection(
        answer, MappingProxyType(sites), own_name, modem_init, lock_dir, handshake_timeout
    )


def _read_site(sites: _Table, name: str, value: object, paths: _Paths) -> PhoneSite | None:
    if not _is_site_name(name):
        sites.problem(name, f"not a valid site name (use {_SITE_RULE})")
        return None
    if not isinstance(value, dict):
        sites.problem(name, str(_expected("a table", value)))
        return None
    t = _Table(value, sites.key(name), sites.problems)
    d = PhoneSite(name, paths.base)  # the field defaults; the secret file is required
    site = PhoneSite(
        name=name,
        secret_file=t.require("secret_file", paths.file, d.secret_file),
        transport=t.get("transport", _site_transport, d.transport),
        dial=t.get("dial", _string, d.dial),
        chat=t.get_list("chat", _any_string, d.chat, "strings"),
        schedule=_poll_interval(t, d.schedule),
        login=t.get("login", _site_name, d.login),
        poll_times=_poll_times(t, d.poll_times),
        call_window=t.get("call_window", _time_window, d.call_window),
        gather_delay=t.get("gather_delay", _duration, d.gather_delay),
        max_call_time=t.get("max_call_time", _positive_duration, d.max_call_time),
        compression=t.get("compression", _boolean, d.compression),
        encryption=t.get("encryption", _boolean, d.encryption),
        max_message_size=t.get("max_message_size", _positive_int, d.max_message_size),
    )
    _check_site(t, site)
    t.finish()
    return site


def _poll_interval(t: _Table, default: float | None) -> float | None:
    """``poll`` as a duration (or the older ``schedule``); ``default`` for times of day."""
    if t.has("poll") and t.has("schedule"):
        t.problem("schedule", "give poll or schedule, not both")
    if t.has("poll") and not isinstance(t.data.get("poll"), list):
        return t.get("poll", _positive_duration, default)
    return t.get("schedule", _positive_duration, default)


def _poll_times(t: _Table, default: tuple[int, ...]) -> tuple[int, ...]:
    """``poll`` as a list of times of day, sorted (``default`` if it is a duration)."""
    if not isinstance(t.data.get("poll"), list):
        return default
    return tuple(sorted(set(t.get_list("poll", _time_of_day, default, "times of day"))))


def _check_site(t: _Table, site: PhoneSite) -> None:
    """Dialling needs a serial line; a schedule or chat script needs some transport."""
    if not t.valid("transport"):
        return
    if t.has("dial") and not isinstance(site.transport, SerialTransport):
        t.problem("dial", "needs a serial transport")
    for key in ("chat", "schedule", "poll", "call_window"):
        if t.has(key) and site.transport is None:
            t.problem(key, "needs a transport (a site without one only calls in)")

"""Tests for relay.config and relay.durations: the TOML configuration and its checks."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import math
import pickle
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import (
    DEFAULT_TOML,
    Channel,
    Config,
    ConfigError,
    MailboxFormat,
    PhoneSite,
    Route,
    SerialTransport,
    Smarthost,
    SmtpClientSection,
    StdioTransport,
    TcpTransport,
    TlsPolicy,
    default_config,
    field_default,
    load_config,
    parse_config,
    parse_transport,
)
from relay.durations import DurationError, format_duration, parse_duration

DATA = Path(__file__).parent / "data" / "config"
HEAD = '[relay]\nhostname = "hub.example.test"\n'


def problems_of(text: str, base: Path = DATA) -> tuple[str, ...]:
    """The problems ConfigError lists for ``text`` (failing if it parses)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, base)
    return caught.value.problems


def with_head(text: str) -> str:
    """``text`` with relay.hostname set (in its [relay] table, or after top-level keys)."""
    if "[relay]\n" in text:
        return text.replace("[relay]\n", HEAD, 1)
    return HEAD + text if text.startswith("[") else text + "\n" + HEAD


def only_problem(text: str, base: Path = DATA) -> str:
    """The single problem of ``text``."""
    problems = problems_of(text, base)
    assert len(problems) == 1, problems
    return problems[0]


# --- the SPEC example and the default ------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> Config:
    return load_config(DATA / "spec.toml")


def test_spec_example_relay_and_smtp(spec: Config) -> None:
    """The SPEC example's [relay] and [smtp] load with the values written and defaults."""
    assert spec.source == DATA / "spec.toml"
    assert spec.relay.hostname == "hub.example.test"
    assert spec.relay.local_domains == ("example.test",)
    assert spec.relay.spool == DATA / "var/spool"
    assert spec.relay.postmaster == "postmaster@example.test"
    assert spec.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert spec.smtp.listen_tls == ()
    assert spec.smtp.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert spec.smtp.relay_domains == ("site-b.test",)
    assert spec.smtp.max_message_size == 10485760
    assert (spec.smtp.max_recipients, spec.smtp.max_errors) == (100, 10)
    assert (spec.smtp.max_sessions, spec.smtp.max_sessions_per_client) == (100, 50)
    assert (spec.smtp.idle_timeout, spec.smtp.session_timeout) == (300.0, 1800.0)
    assert spec.smtp.tls_cert_file is None and spec.smtp.tls_key_file is None
    assert spec.smtp.auth_users_file is None and spec.smtp.auth_requires_tls is True


def test_spec_example_deliver_and_local(spec: Config) -> None:
    """The SPEC example's [deliver] durations are float seconds and [local] is resolved."""
    d = spec.deliver
    assert (d.retry_min, d.retry_max, d.warn_after, d.give_up_after) == (
        300.0,
        4200.0,
        14400.0,
        432000.0,
    )
    assert all(isinstance(x, float) for x in (d.retry_min, d.dead_host_delay))
    assert d.concurrency_per_destination == 20 and d.recipients_per_transaction == 50
    assert d.initial_destination_concurrency == 5 and d.concurrency_total == 100
    assert d.dead_host_delay == 600.0
    local = spec.local
    assert local.mail_root == DATA / "var/mail"
    assert local.format is MailboxFormat.MAILDIR and local.format in {"maildir"}
    assert local.users == ("alice", "bob")
    assert local.aliases == DATA / "aliases"
    assert dict(local.mailboxes) == {}
    assert local.recipient_delimiter == "+" and local.system_users is False
    assert local.mailbox_path("alice") == DATA / "var/mail/alice"


def test_spec_example_routes_and_phone(spec: Config) -> None:
    """The SPEC example's routes and phone sites become typed objects."""
    assert spec.routes == (
        Route("partner.test", Channel.SMTP, smarthost=Smarthost("127.0.0.1", 2526, False)),
        Route("site-b.test", Channel.PHONE, site="site-b"),
    )
    assert spec.phone.answer == (SerialTransport("/dev/ttyS1", 115200),)
    assert list(spec.phone.sites) == ["site-b", "hub-a"]
    assert spec.phone.sites["site-b"] == PhoneSite(
        name="site-b",
        secret_file=DATA / "secrets/site-b",
        transport=SerialTransport("/dev/ttyS0", 115200),
        dial="ATDT5551234",
    )
    assert spec.phone.sites["hub-a"] == PhoneSite("hub-a", DATA / "secrets/hub-a")


def test_spec_example_summary(spec: Config) -> None:
    """summary() is one line with the counts and the listener."""
    assert spec.summary() == (
        "hub.example.test: 1 local domain, smtp on tcp:2525:interface=127.0.0.1 "
        f"(2 processes), 2 routes, 2 phone sites, spool {DATA / 'var/spool'}"
    )


def test_default_round_trips(tmp_path: Path) -> None:
    """DEFAULT_TOML is relay/default.toml and parses to default_config()."""
    packaged = (Path(__file__).parents[1] / "relay/default.toml").read_text(encoding="utf-8")
    assert packaged == DEFAULT_TOML
    assert parse_config(DEFAULT_TOML, tmp_path) == default_config(tmp_path)


def test_default_is_the_documented_relay(tmp_path: Path) -> None:
    """The embedded default: loopback SMTP on 2525, paths under base_dir, no routes or sites."""
    config = default_config(tmp_path)
    assert config.source is None
    assert config.relay.hostname == "localhost"
    assert config.relay.local_domains == ("localhost",)
    assert config.relay.postmaster == "postmaster@localhost"
    assert config.relay.spool == tmp_path / "var/spool"
    assert config.local.mail_root == tmp_path / "var/mail"
    assert config.local.users == ("postmaster",)
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.smtp.is_trusted("127.0.0.1") and not config.smtp.is_trusted("192.0.2.1")
    assert config.routes == () and dict(config.phone.sites) == {}


def test_default_config_uses_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without base_dir, the default's relative paths are under the working directory."""
    monkeypatch.chdir(tmp_path)
    assert default_config().relay.spool == tmp_path / "var/spool"


def test_default_file_states_the_builtin_defaults(tmp_path: Path) -> None:
    """Every value default.toml sets equals the built-in default, except users."""
    minimal = '[relay]\nhostname = "localhost"\n[local]\nusers = ["postmaster"]\n'
    assert parse_config(minimal, tmp_path) == default_config(tmp_path)


def test_default_file_states_the_model_defaults(tmp_path: Path) -> None:
    """Every key default.toml sets holds its section dataclass's field default (paths under
    base_dir): the shipped file and the model name one value, save the keys listed here."""
    without_default = {("relay", "hostname"), ("relay", "local_domains"), ("relay", "postmaster")}
    shipped_otherwise = {("local", "users")}  # default.toml lets postmaster receive mail
    config = default_config(tmp_path)
    checked = 0
    for name, table in tomllib.loads(DEFAULT_TOML).items():
        section = getattr(config, name)
        for key in table:
            if (name, key) in without_default:
                with pytest.raises(KeyError):
                    field_default(type(section), key)
                continue
            default = field_default(type(section), key)
            if (name, key) in shipped_otherwise:
                assert getattr(section, key) != default, f"{name}.{key}"
                continue
            expected = tmp_path / default if isinstance(default, Path) else default
            assert getattr(section, key) == expected, f"{name}.{key}"
            checked += 1
    assert checked >= 40


# --- problems ------------------------------------------------------------------------


def test_broken_fixture_has_exactly_three_problems() -> None:
    """broken.toml yields an unknown key, a wrong type and a missing TLS key file."""
    with pytest.raises(ConfigError) as caught:
        load_config(DATA / "broken.toml")
    assert sorted(caught.value.problems) == [
        "smtp.lsiten: unknown key (did you mean 'listen'?)",
        "smtp.max_message_size: expected a positive integer, got 'big'",
        f"smtp.tls_key_file: file not found: {DATA / 'tls/missing-key.pem'}",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_all_problems_are_collected() -> None:
    """One ConfigError lists every problem in every section, not only the first."""
    text = (
        '[relay]\nhostname = "bad host"\n[smtp]\nmax_errors = 0\n'
        '[deliver]\nretry_min = "soon"\n[local]\nformat = "mdir"\n'
        '[phone]\nanswer = ["modem"]\n[[route]]\ndomain = "-x"\n[extra]\n'
    )
    keys = [p.split(":")[0] for p in problems_of(text)]
    assert keys == [
        "relay.hostname",
        "smtp.max_errors",
        "deliver.retry_min",
        "local.format",
        "phone.answer[0]",
        "route[0].domain",
        "extra",
    ]


def test_config_error_from_a_string() -> None:
    """ConfigError built from one string splits it into lines and survives pickling."""
    error = ConfigError("a: one\nb: two")
    assert error.problems == ("a: one", "b: two")
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


def test_missing_file(tmp_path: Path) -> None:
    """A configuration file that does not exist is one 'file not found' problem."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.problems == (f"{tmp_path / 'nope.toml'}: file not found",)


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is one problem naming the byte."""
    path = tmp_path / "relay.toml"
    path.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 2\)"):
        load_config(path)


def test_syntax_error_has_line_and_column() -> None:
    """A TOML syntax error is one problem carrying tomllib's line and column."""
    problem = only_problem('[relay]\nhostname = "x"\nspool = \n')
    assert problem.startswith("invalid TOML: ")
    assert "line 3, column 9" in problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[smpt]\n", "smpt: unknown section (did you mean 'smtp'?)"),
        ("[routes]\n", "routes: unknown section (did you mean 'route'?)"),
        ("[zzz]\n", "zzz: unknown section"),
        ("[relay]\nhostnme = 1\n", "relay.hostnme: unknown key (did you mean 'hostname'?)"),
        ("[[route]]\ndomain = 'a.test'\ndomian = 1\n", "route[0].domian: unknown key"),
        (
            "[phone.sites.b]\nsecret_file = 'aliases'\ntransprt = 'x'\n",
            "phone.sites.b.transprt: unknown key (did you mean 'transport'?)",
        ),
    ],
)
def test_unknown_names(text: str, problem: str) -> None:
    """Unknown sections and keys are reported, with the closest known name if any."""
    assert only_problem(with_head(text)).startswith(problem)


def test_relay_hostname_is_required() -> None:
    """A file without relay.hostname is refused: the default is not guessed."""
    assert only_problem("[smtp]\n") == "relay.hostname: required"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[smtp]\nmax_message_size = -1",
            "smtp.max_message_size: expected a positive integer, got -1",
        ),
        (
            "[smtp]\nmax_recipients = true",
            "smtp.max_recipients: expected a positive integer, got true",
        ),
        ("[smtp]\nauth_requires_tls = 1", "smtp.auth_requires_tls: expected true or false, got 1"),
        ("[smtp]\nlisten = 'tcp:25'", "smtp.listen: expected an array of endpoints, got 'tcp:25'"),
        ("[smtp]\nlisten = ['tcp:25x']", "smtp.listen[0]: expected a server endpoint"),
        ("[smtp]\nlisten = ['http:80']", "smtp.listen[0]: expected a server endpoint"),
        ("[smtp]\ntrusted_networks = ['10/8']", "smtp.trusted_networks[0]: expected a network"),
        ("[smtp]\nidle_timeout = 0", "smtp.idle_timeout: expected a duration longer than zero"),
        ("[deliver]\nwarn_after = 1.5", "deliver.warn_after: expected a duration like"),
        (
            "[smtp_client]\ndata_done_timeout = 0",
            "smtp_client.data_done_timeout: expected a duration longer than zero, got 0",
        ),
        ("[smtp_client]\nconnect_timeout = '1 min'", "smtp_client.connect_timeout: expected a"),
        (
            "[smtp_client]\nconnection_cache_time = -1",
            "smtp_client.connection_cache_time: expected a duration like",
        ),
        (
            "[smtp_client]\nmax_messages_per_connection = 0",
            "smtp_client.max_messages_per_connection: expected a positive integer, got 0",
        ),
        (
            "[smtp_client]\ndns_servers = '127.0.0.1'",
            "smtp_client.dns_servers: expected an array of name server addresses",
        ),
        (
            "[smtp_client]\ndns_servers = ['ns1.example.test']",
            "smtp_client.dns_servers[0]: expected a name server address like '192.0.2.53'",
        ),
        ("[smtp_client]\ndns_servers = ['127.0.0.1:0']", "smtp_client.dns_servers[0]: expected"),
        ("[smtp_client]\nline_length_limit = 1", "smtp_client.line_length_limit: expected 0 ("),
        ("[smtp_client]\nline_length_limit = -5", "smtp_client.line_length_limit: expected 0 ("),
        ("[smtp_client]\ndns_servers = ['2001:db8::1:53:']", "smtp_client.dns_servers[0]: "),
        ("[smtp_client]\ndns_servers = [53]", "smtp_client.dns_servers[0]: expected a name"),
        ("[smtp_client]\nca_file = 'missing.pem'", "smtp_client.ca_file: file not found: "),
        ("[smtp_client]\nca_file = 'aliases'", "smtp_client.ca_file: no PEM certificate in "),
        (
            "[deliver]\nconcurrency_total = {}",
            "deliver.concurrency_total: expected a positive integer, got a table",
        ),
        ("[local]\nformat = 'mdir'", "local.format: expected one of 'maildir', 'mbox', got 'mdir'"),
        ("[local]\nusers = ['a/b']", "local.users[0]: expected a user name"),
        ("[local]\nrecipient_delimiter = 'ab'", "local.recipient_delimiter: expected ''"),
        ("[local]\nmail_root = ''", "local.mail_root: expected a path, got ''"),
        ("[local.mailboxes]\n'a b' = 'x'", 'local.mailboxes."a b": not a valid user name'),
        (
            "[relay]\nspool = 1979-05-27",
            "relay.spool: expected a path, got a date/time (1979-05-27)",
        ),
        ("[relay]\nlocal_domains = ['a..b']", "relay.local_domains[0]: expected a domain name"),
        ("[relay]\npostmaster = 'root'", "relay.postmaster: expected an address"),
        ("smtp = 5", "smtp: expected a table, got 5"),
        (
            "[route]\ndomain = 'a.test'",
            "route: expected an array of tables ([[route]]), got a table",
        ),
        ("[phone.sites]\n'a b' = {}", 'phone.sites."a b": not a valid site name'),
        ("[phone.sites]\nb = 5", "phone.sites.b: expected a table, got 5"),
        ("[phone.sites.b]\nlogin = 'hub'", "phone.sites.b.secret_file: required"),
    ],
)
def test_wrong_values(text: str, problem: str) -> None:
    """A value of the wrong type or form is one problem naming the key and the value."""
    assert only_problem(with_head(text)).startswith(problem)


# --- checks across keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (
            "[smtp]\ntls_cert_file = 'tls/cert.pem'",
            ["smtp.tls_key_file: required when smtp.tls_cert_file is set"],
        ),
        (
            "[smtp]\ntls_key_file = 'tls/cert.pem'",
            ["smtp.tls_cert_file: required when smtp.tls_key_file is set"],
        ),
        (
            "[smtp]\nlisten_tls = ['tcp:465']",
            ["smtp.listen_tls: needs smtp.tls_cert_file and smtp.tls_key_file"],
        ),
        (
            "[smtp]\nauth_users_file = 'aliases'",
            ["smtp.auth_users_file: AUTH is offered only over TLS"],
        ),
        (
            "[deliver]\nretry_min = '2h'",
            ["deliver.retry_min: must be at most deliver.retry_max (70m)"],
        ),
        (
            "[deliver]\nwarn_after = '5d'",
            ["deliver.warn_after: must be shorter than deliver.give_up_after (5d)"],
        ),
        (
            "[deliver]\ninitial_destination_concurrency = 30",
            [
                "deliver.initial_destination_concurrency: must be at most "
                "deliver.concurrency_per_destination (20)"
            ],
        ),
        (
            "[[route]]\ndomain = 'a.test'\nchannel = 'local'\nsmarthost = 'x'\ntls = 'none'",
            [
                "route[0].smarthost: only allowed with channel 'smtp', not 'local'",
                "route[0].tls: only allowed with channel 'smtp', not 'local'",
            ],
        ),
        (
            "[[route]]\ndomain = 'a.test'\nchannel = 'phone'",
            ["route[0].site: required with channel 'phone'"],
        ),
        (
            "[[route]]\ndomain = 'a.test'\nchannel = 'phone'\nsite = 'nowhere'",
            ["route[0].site: no such site in [phone.sites]: 'nowhere'"],
        ),
        (
            "[[route]]\ndomain = 'a.test'\nsite = 'b'",
            ["route[0].site: only allowed with channel 'phone', not 'smtp'"],
        ),
        (
            "[[route]]\ndomain = 'a.test'\nauth_user = 'u'\ntls = 'none'",
            [
                "route[0].auth_password_file: required when route[0].auth_user is set",
                "route[0].tls: cannot be 'none' on a route that authenticates",
            ],
        ),
        (
            "[[route]]\ndomain = 'A.test'\n[[route]]\ndomain = 'a.TEST'",
            ["route[1].domain: same domain as route[0], which always matches first"],
        ),
        (
            "[phone.sites.b]\nsecret_file = 'aliases'\ndial = 'ATDT1'\ntransport = 'tcp:h:1'",
            ["phone.sites.b.dial: needs a serial transport"],
        ),
        (
            "[phone.sites.b]\nsecret_file = 'aliases'\nschedule = '1h'\nchat = ['ok', '']",
            [
                "phone.sites.b.chat: needs a transport (a site without one only calls in)",
                "phone.sites.b.schedule: needs a transport (a site without one only calls in)",
            ],
        ),
    ],
)
def test_cross_checks(text: str, problems: list[str]) -> None:
    """Keys that depend on each other are checked together, naming the key to fix."""
    found = problems_of(with_head(text))
    assert len(found) == len(problems), found
    for got, wanted in zip(found, problems, strict=True):
        assert got.startswith(wanted)


def test_cross_checks_skip_values_already_wrong() -> None:
    """A bad value is reported once, without a second problem comparing its default."""
    found = problems_of(with_head("[deliver]\nretry_min = '2h'\nretry_max = 'x'"))
    assert [p.split(":")[0] for p in found] == ["deliver.retry_max"]


def test_full_smtp_section_with_tls_and_auth() -> None:
    """Certificate, key, TLS listeners and AUTH load together when the files exist."""
    config = parse_config(
        with_head(
            "[smtp]\nlisten = []\nlisten_tls = ['tcp:465']\ntls_cert_file = 'tls/cert.pem'\n"
            "tls_key_file = 'tls/cert.pem'\nauth_users_file = 'aliases'\n"
            "trusted_networks = ['10.1.2.3/8', '10.0.0.0/8']"
        ),
        DATA,
    )
    assert config.smtp.tls_cert_file == DATA / "tls/cert.pem"
    assert config.smtp.auth_users_file == DATA / "aliases"
    assert config.smtp.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.summary().startswith(
        "hub.example.test: 1 local domain, smtp on tcp:465 (tls) (2 processes),"
    )


def test_smtp_client_defaults(tmp_path: Path) -> None:
    """Without [smtp_client]: RFC 5321 timeouts, 2 s cache, 100 messages, resolv.conf, system CA."""
    client = parse_config(HEAD, tmp_path).smtp_client
    assert client == SmtpClientSection() == default_config(tmp_path).smtp_client
    assert (client.connect_timeout, client.greeting_timeout, client.helo_timeout) == (
        30.0,
        300.0,
        300.0,
    )
    assert (client.mail_timeout, client.rcpt_timeout, client.data_timeout) == (300.0, 300.0, 120.0)
    assert (client.data_block_timeout, client.data_done_timeout) == (180.0, 600.0)
    assert (client.connection_cache_time, client.max_messages_per_connection) == (2.0, 100)
    assert client.dns_servers == () and client.ca_file is None
    assert client.line_length_limit == 998


def test_full_smtp_client_section(tmp_path: Path) -> None:
    """Every [smtp_client] key is read into seconds, (ip, port) pairs and an absolute path."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls/ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    )
    client = parse_config(
        HEAD
        + "[smtp_client]\n"
        + "connect_timeout = '10s'\ngreeting_timeout = '1m'\nhelo_timeout = 90\n"
        + "mail_timeout = '2m'\nrcpt_timeout = '3m'\ndata_timeout = '4m'\n"
        + "data_block_timeout = '5m'\ndata_done_timeout = '1h'\n"
        + "connection_cache_time = 0\nmax_messages_per_connection = 7\n"
        + "line_length_limit = 0\n"
        + "dns_servers = ['192.0.2.53', '127.0.0.1:5353', '::1', '[::1]:5300', '[192.0.2.9]',"
        + " '192.0.2.53:53']\n"
        + "ca_file = 'tls/ca.pem'\n",
        tmp_path,
    ).smtp_client
    assert client == SmtpClientSection(
        connect_timeout=10.0,
        greeting_timeout=60.0,
        helo_timeout=90.0,
        mail_timeout=120.0,
        rcpt_timeout=180.0,
        data_timeout=240.0,
        data_block_timeout=300.0,
        data_done_timeout=3600.0,
        connection_cache_time=0.0,
        max_messages_per_connection=7,
        line_length_limit=0,
        dns_servers=(
            ("192.0.2.53", 53),
            ("127.0.0.1", 5353),
            ("::1", 53),
            ("::1", 5300),
            ("192.0.2.9", 53),
        ),
        ca_file=tmp_path / "tls/ca.pem",
    )


def test_postmaster_defaults_to_first_local_domain() -> None:
    """Without relay.postmaster, it is postmaster@ the first local domain, else the hostname."""
    with_domains = parse_config(HEAD + 'local_domains = ["B.test", "c.test", "b.test"]', DATA)
    assert with_domains.relay.local_domains == ("b.test", "c.test")
    assert with_domains.relay.postmaster == "postmaster@b.test"
    without = parse_config(HEAD + "local_domains = []", DATA)
    assert without.relay.postmaster == "postmaster@hub.example.test"


def test_trusted_networks() -> None:
    """is_trusted matches addresses in the networks, IPv4-mapped IPv6 included."""
    smtp = parse_config(HEAD + "[smtp]\ntrusted_networks = ['192.0.2.0/24']", DATA).smtp
    assert smtp.is_trusted("192.0.2.7") and smtp.is_trusted("::ffff:192.0.2.7")
    assert not smtp.is_trusted("198.51.100.1") and not smtp.is_trusted("not an ip")
    nobody = parse_config(HEAD + "[smtp]\ntrusted_networks = []", DATA).smtp
    assert not nobody.is_trusted("127.0.0.1")


def test_local_mailboxes() -> None:
    """[local.mailboxes] maps names to paths resolved like any other path."""
    local = parse_config(
        HEAD + "[local]\nusers = ['bob']\n[local.mailboxes]\nalice = 'boxes/alice'\nx = '/m/x'",
        DATA,
    ).local
    assert dict(local.mailboxes) == {"alice": DATA / "boxes/alice", "x": Path("/m/x")}
    assert local.mailbox_path("alice") == DATA / "boxes/alice"
    assert local.mailbox_path("bob") == DATA / "var/mail/bob"


# --- routes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [
        ("partner.test", "partner.test", True),
        ("partner.test", "PARTNER.Test", True),
        ("partner.test", "partner.test.", True),
        ("partner.test", "a.partner.test", False),
        ("partner.test", "xpartner.test", False),
        ("*.partner.test", "a.partner.test", True),
        ("*.partner.test", "a.b.Partner.TEST", True),
        ("*.partner.test", "partner.test", False),
        ("*.partner.test", "apartner.test", False),
    ],
)
def test_route_matching(pattern: str, domain: str, matches: bool) -> None:
    """Exact routes match only their domain; '*.x' matches below x but not x itself."""
    route = parse_config(HEAD + f"[[route]]\ndomain = '{pattern}'", DATA).routes[0]
    assert route.matches(domain) is matches


def test_route_for_takes_the_first_match() -> None:
    """route_for returns the first matching route in file order, or None."""
    config = parse_config(
        HEAD + "[[route]]\ndomain = 'a.x.test'\nchannel = 'local'\n"
        "[[route]]\ndomain = '*.x.test'\nsmarthost = 'relay.x.test'",
        DATA,
    )
    assert config.route_for("a.x.test") is config.routes[0]
    assert config.route_for("b.x.test") is config.routes[1]
    assert config.route_for("elsewhere.test") is None


@pytest.mark.parametrize(
    ("text", "smarthost"),
    [
        ("mail.x.test", Smarthost("mail.x.test", 25, True)),
        ("Mail.X.test:587", Smarthost("mail.x.test", 587, True)),
        ("[mail.x.test]", Smarthost("mail.x.test", 25, False)),
        ("[mail.x.test]:2525", Smarthost("mail.x.test", 2525, False)),
        ("192.0.2.1", Smarthost("192.0.2.1", 25, False)),
        ("[2001:db8::1]:26", Smarthost("2001:db8::1", 26, False)),
    ],
)
def test_smarthost_forms(text: str, smarthost: Smarthost) -> None:
    """A smarthost is host[:port]; brackets or an IP address mean no MX lookup."""
    route = parse_config(HEAD + f"[[route]]\ndomain = 'a.test'\nsmarthost = '{text}'", DATA)
    assert route.routes[0].smarthost == smarthost


@pytest.mark.parametrize("text", ["", "::1", "host:", "host:0", "host:70000", "[]:25", "a b"])
def test_bad_smarthosts(text: str) -> None:
    """A malformed smarthost is one problem at route[N].smarthost."""
    problem = only_problem(HEAD + f"[[route]]\ndomain = 'a.test'\nsmarthost = '{text}'")
    assert problem.startswith("route[0].smarthost: expected a host like")


def test_route_with_authentication() -> None:
    """A route may log in with a user and a password file, and require TLS."""
    route = parse_config(
        HEAD + "[[route]]\ndomain = 'a.test'\nsmarthost = '[m.a.test]:587'\ntls = 'required'\n"
        "auth_user = 'hub'\nauth_password_file = 'secrets/hub-a'",
        DATA,
    ).routes[0]
    assert route.tls is TlsPolicy.REQUIRED
    assert (route.auth_user, route.auth_password_file) == ("hub", DATA / "secrets/hub-a")


# --- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), ("300", 300), (45, 45), ("0", 0)],
)
def test_good_durations(value: str | int, seconds: float) -> None:
    """Durations are an integer with an optional s/m/h/d unit, or plain seconds."""
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    ["", "m", "5M", "5 m", "1.5h", "1h30m", "-5m", "5w", "\u0665m", -1, True, "9" * 30],
)
def test_bad_durations(value: Any) -> None:
    """Anything else, including negative and absurdly long durations, is a DurationError."""
    with pytest.raises(DurationError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(300.0, "5m"), (90.0, "90s"), (7200.0, "2h"), (0.0, "0s"), (1.5, "1.5s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    """format_duration writes the shortest exact spelling."""
    assert format_duration(seconds) == text


def test_durations_in_the_file() -> None:
    """Durations in the file are read as seconds; a bad one names its key and value."""
    config = parse_config(
        HEAD + "[deliver]\nretry_min = 60\nretry_max = '2h'\ndead_host_delay = '0'", DATA
    )
    assert (config.deliver.retry_min, config.deliver.retry_max) == (60.0, 7200.0)
    assert config.deliver.dead_host_delay == 0.0
    assert only_problem(HEAD + "[smtp]\nsession_timeout = '1 hour'") == (
        "smtp.session_timeout: expected a duration like '30s', '5m', '4h', '5d' or seconds, "
        "got '1 hour'"
    )


# --- phone transports ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "transport"),
    [
        ("serial:/dev/ttyS1", SerialTransport("/dev/ttyS1", 9600)),
        ("serial:/dev/ttyS1:baudrate=115200", SerialTransport("/dev/ttyS1", 115200)),
        ("serial:COM3:baudrate=19200", SerialTransport("COM3", 19200)),
        ("tcp:2600", TcpTransport("", 2600)),
        ("tcp:hub.example.test:2600", TcpTransport("hub.example.test", 2600)),
        ("tcp:192.0.2.1:2600", TcpTransport("192.0.2.1", 2600)),
        ("tcp:[::1]:2600", TcpTransport("::1", 2600)),
        ("stdio", StdioTransport()),
    ],
)
def test_good_transports(text: str, transport: object) -> None:
    """Transports parse into typed objects whose str() parses back to the same object."""
    parsed = parse_transport(text)
    assert parsed == transport
    assert parse_transport(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "serial",
        "serial:",
        "serial:/dev/x:baudrate=0",
        "serial:/dev/x:baudrate=fast",
        "serial:/dev/x:parity=N",
        "tcp:",
        "tcp:0",
        "tcp:host",
        "tcp:host:port",
        "tcp:::1:2600",
        "tcp:a:b:c",
        "stdio:x",
        "modem:/dev/x",
    ],
)
def test_bad_transports(text: str) -> None:
    """Malformed transports raise ValueError, and in the file name their key."""
    with pytest.raises(ValueError):
        parse_transport(text)
    problem = only_problem(HEAD + f"[phone]\nanswer = ['{text}']")
    assert problem.startswith("phone.answer[0]: expected a transport like")


@pytest.mark.parametrize("text", ["stdio", "tcp:2600"])
def test_site_transport_must_be_callable(text: str) -> None:
    """A site's transport must say where to call: not stdio, not a port without a host."""
    problem = only_problem(HEAD + f"[phone.sites.b]\nsecret_file = 'aliases'\ntransport = '{text}'")
    assert problem.startswith("phone.sites.b.transport: expected a transport like")


def test_phone_site_with_everything() -> None:
    """A site with transport, dial, chat, schedule and login loads every field."""
    site = parse_config(
        HEAD + "[phone.sites.far]\nsecret_file = 'secrets/site-b'\n"
        "transport = 'serial:/dev/ttyUSB0:baudrate=57600'\ndial = 'ATDT5551234'\n"
        "chat = ['CONNECT', '', 'ogin:', 'hub', 'ogin:', 'hub']\nschedule = '30m'\nlogin = 'hub'",
        DATA,
    ).phone.sites["far"]
    assert site.transport == SerialTransport("/dev/ttyUSB0", 57600)
    assert site.chat == ("CONNECT", "", "ogin:", "hub", "ogin:", "hub")
    assert (site.schedule, site.login, site.dial) == (1800.0, "hub", "ATDT5551234")


# --- paths ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are relative to the config file's directory, not the cwd."""
    etc = tmp_path / "etc"
    (etc / "secrets").mkdir(parents=True)
    (etc / "secrets/b").write_text("s")
    (etc / "relay.toml").write_text(
        HEAD + "spool = 'q'\n[local]\nmail_root = '../mail'\naliases = 'relay.toml'\n"
        "[phone.sites.b]\nsecret_file = 'secrets/b'\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/relay.toml")
    assert config.source == etc / "relay.toml"
    assert config.relay.spool == etc / "q"
    assert config.local.mail_root == etc / "../mail"
    assert config.local.aliases == etc / "relay.toml"
    assert config.phone.sites["b"].secret_file == etc / "secrets/b"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """Absolute paths are used as written, and directories need not exist."""
    config = parse_config(HEAD + f"spool = '{tmp_path}/no/such/dir'", DATA)
    assert config.relay.spool == tmp_path / "no/such/dir"


def test_parse_config_makes_base_dir_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative base_dir is taken from the cwd now, so a later chdir cannot move paths."""
    monkeypatch.chdir(tmp_path)
    assert parse_config(HEAD, Path("conf")).relay.spool == tmp_path / "conf/var/spool"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("missing", "file not found: {base}/missing"),
        ("secrets", "not a file: {base}/secrets"),
    ],
)
def test_files_must_exist(value: str, problem: str) -> None:
    """Files the relay reads are checked now: a missing one or a directory is a problem."""
    text = HEAD + f"[local]\naliases = '{value}'"
    assert only_problem(text) == "local.aliases: " + problem.format(base=DATA)


# --- immutability --------------------------------------------------------------------


def _config_objects(value: object) -> list[object]:
    """Every dataclass instance reachable from ``value``."""
    found: list[object] = []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        found.append(value)
        for item in dataclasses.fields(value):
            found.extend(_config_objects(getattr(value, item.name)))
    elif isinstance(value, tuple):
        for item in value:
            found.extend(_config_objects(item))
    elif hasattr(value, "values") and hasattr(value, "keys"):
        for item in value.values():
            found.extend(_config_objects(item))
    return found


def test_every_config_object_is_frozen(spec: Config) -> None:
    """No attribute of any configuration object can be set or added, and mappings are read-only."""
    objects = _config_objects(spec)
    kinds = {type(o).__name__ for o in objects}
    assert {"Config", "RelaySection", "SmtpSection", "DeliverSection", "LocalSection"} <= kinds
    assert "SmtpClientSection" in kinds
    assert {"Route", "Smarthost", "PhoneSection", "PhoneSite", "SerialTransport"} <= kinds
    for obj in objects:
        assert dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        first = dataclasses.fields(obj)[0].name if dataclasses.fields(obj) else "anything"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, first, None)
        assert not hasattr(obj, "__dict__")
    with pytest.raises(TypeError):
        spec.phone.sites["x"] = spec.phone.sites["hub-a"]  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.local.mailboxes["x"] = Path()  # type: ignore[index]


# --- hostile input -------------------------------------------------------------------

KNOWN_KEYS: dict[str, list[str]] = {
    "relay": ["hostname", "local_domains", "spool", "postmaster", "maildrop"],
    "metrics": ["listen"],
    "smtp": [
        "listen",
        "listen_tls",
        "trusted_networks",
        "max_message_size",
        "max_recipients",
        "max_errors",
        "max_sessions",
        "max_sessions_per_client",
        "idle_timeout",
        "session_timeout",
        "tls_cert_file",
        "tls_key_file",
        "auth_users_file",
        "auth_requires_tls",
        "greet_delay",
        "max_text_in_memory",
        "auth_max_failures",
        "auth_failure_window",
    ],
    "smtp_client": [
        "connect_timeout",
        "greeting_timeout",
        "helo_timeout",
        "mail_timeout",
        "rcpt_timeout",
        "data_timeout",
        "data_block_timeout",
        "data_done_timeout",
        "connection_cache_time",
        "max_messages_per_connection",
        "dns_servers",
        "ca_file",
    ],
    "deliver": [
        "retry_min",
        "retry_max",
        "warn_after",
        "give_up_after",
        "concurrency_per_destination",
        "initial_destination_concurrency",
        "concurrency_total",
        "recipients_per_transaction",
        "dead_host_delay",
    ],
    "local": [
        "mail_root",
        "format",
        "users",
        "mailboxes",
        "aliases",
        "recipient_delimiter",
        "system_users",
    ],
    "phone": ["answer", "sites"],
    "route": [
        "domain",
        "channel",
        "smarthost",
        "tls",
        "auth_user",
        "auth_password_file",
        "site",
    ],
    "site": ["transport", "dial", "chat", "secret_file", "schedule", "login"],
}


def _setting(kind: str, key: str) -> str:
    """A document that sets ``key`` of a ``kind`` table to 0 (the wrong type for most keys)."""
    relay: dict[str, Any] = {"hostname": "h.test"}
    if kind == "relay":
        return _toml_document({"relay": relay | {key: 0}})
    if kind == "route":
        return _toml_document({"relay": relay, "route": [{key: 0}]})
    if kind == "site":
        return _toml_document({"relay": relay, "phone": {"sites": {"b": {key: 0}}}})
    return _toml_document({"relay": relay, kind: {key: 0}})


def test_metrics_are_off_unless_listen_is_set(tmp_path: Path) -> None:
    """No [metrics]: no endpoint; listen must be a server endpoint string."""
    assert default_config(tmp_path).metrics.listen is None
    text = '[relay]\nhostname = "h"\n[metrics]\nlisten = "tcp:9125:interface=127.0.0.1"\n'
    assert parse_config(text, tmp_path).metrics.listen == "tcp:9125:interface=127.0.0.1"
    with pytest.raises(ConfigError, match=r"metrics\.listen: expected a server endpoint"):
        parse_config('[relay]\nhostname = "h"\n[metrics]\nlisten = "http://x"\n', tmp_path)


def test_maildrop_defaults_beside_the_spool_and_is_relative_to_the_file(tmp_path: Path) -> None:
    """[relay] maildrop is var/maildrop unless set; a relative path is the file's."""
    assert default_config(tmp_path).relay.maildrop == tmp_path / "var/maildrop"
    text = '[relay]\nhostname = "h"\nmaildrop = "drop-here"\n'
    assert parse_config(text, tmp_path).relay.maildrop == tmp_path / "drop-here"


def test_every_key_is_known_and_documented() -> None:
    """Every key of every section is accepted by the reader and has a row in the docs."""
    docs = (Path(__file__).parents[1] / "docs/configuration.md").read_text(encoding="utf-8")
    for kind, keys in KNOWN_KEYS.items():
        for key in keys:
            assert f"| `{key}` |" in docs or f"`[{kind}.{key}]`" in docs, (kind, key)
            try:
                parse_config(_setting(kind, key), DATA)
            except ConfigError as error:
                assert not [p for p in error.problems if "unknown" in p], (kind, key)


PLAUSIBLE = [
    "hub.example.test",
    "*.partner.test",
    "postmaster@example.test",
    "5m",
    "0",
    "tcp:2525",
    "tcp:h:1",
    "unix:/x",
    "serial:/dev/ttyS0:baudrate=9600",
    "stdio",
    "127.0.0.0/8",
    "[mail.test]:25",
    "smtp",
    "phone",
    "local",
    "maildir",
    "required",
    "none",
    "aliases",
    "secrets",
    "site-b",
    "+",
    "",
    "/",
    "\x00",
    "\n",
]


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes, minus surrogate pairs, plus DEL)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: object) -> str:
    """``value`` written as an inline TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    pairs = (f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
    return "{" + ", ".join(pairs) + "}"


def _toml_table(header: str, table: dict[str, object]) -> str:
    lines = [header] + [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


_scalars = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _tables(kind: str) -> st.SearchStrategy[dict[str, object]]:
    keys = st.sampled_from(KNOWN_KEYS[kind]) | st.text(min_size=1, max_size=8)
    return st.dictionaries(keys, _values, max_size=6)


@st.composite
def _documents(draw: st.DrawFn) -> str:
    """A TOML document shaped like a configuration, with values of any type."""
    parts: list[str] = []
    relay = draw(_tables("relay"))
    if draw(st.booleans()):
        relay["hostname"] = "hub.example.test"
    parts.append(_toml_table("[relay]", relay))
    for section in draw(
        st.lists(st.sampled_from(["smtp", "smtp_client", "deliver", "local", "smpt"]), unique=True)
    ):
        parts.append(
            _toml_table(
                f"[{section}]", draw(_tables(section if section in KNOWN_KEYS else "relay"))
            )
        )
    for route in draw(st.lists(_tables("route"), max_size=3)):
        parts.append(_toml_table("[[route]]", route))
    if draw(st.booleans()):
        phone = draw(_tables("phone"))
        phone["sites"] = draw(
            st.dictionaries(st.sampled_from(["site-b", "x", "a b"]), _tables("site"), max_size=3)
            | _values
        )
        parts.append(_toml_table("[phone]", phone))
    return "".join(parts)


SPEC_DATA: dict[str, Any] = tomllib.loads((DATA / "spec.toml").read_text(encoding="utf-8"))


def _toml_document(data: dict[str, Any]) -> str:
    """``data`` as a TOML document: top-level tables as [sections], ``route`` as [[route]]."""
    parts: list[str] = []
    for key, value in data.items():
        if key == "route" and isinstance(value, list):
            parts.extend(_toml_table("[[route]]", item) for item in value)
        elif isinstance(value, dict):
            parts.append(_toml_table(f"[{_toml_string(key)}]", value))
        else:
            parts.insert(0, f"{_toml_string(key)} = {_toml_value(value)}\n")
    return "".join(parts)


@st.composite
def _mutated_spec(draw: st.DrawFn) -> str:
    """The SPEC example with a few keys set to values of any type (or removed)."""
    data = copy.deepcopy(SPEC_DATA)
    tables: list[dict[str, Any]] = [data[name] for name in ("relay", "smtp", "deliver", "local")]
    tables += [*data["route"], data["phone"], *data["phone"]["sites"].values()]
    kinds = ["relay", "smtp", "deliver", "local", "route", "route", "phone", "site", "site"]
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(tables) - 1))
        key = draw(st.sampled_from(KNOWN_KEYS[kinds[index]]))
        if draw(st.booleans()):
            tables[index][key] = draw(_values)
        else:
            tables[index].pop(key, None)
    return _toml_document(data)


def _parses_or_explains(text: str) -> None:
    """parse_config returns a Config or raises ConfigError with one-line problems."""
    try:
        config = parse_config(text, DATA)
    except ConfigError as error:
        assert error.problems
        assert all(isinstance(p, str) and p and "\n" not in p for p in error.problems)
    else:
        assert isinstance(config, Config)
        assert "\n" not in config.summary()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_never_crashes(text: str) -> None:
    """Any text at all either parses or raises ConfigError, never another exception."""
    _parses_or_explains(text)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_documents(), _mutated_spec()))
def test_arbitrary_documents_never_crash(text: str) -> None:
    """Configuration-shaped TOML with values of any type parses or raises ConfigError."""
    _parses_or_explains(text)


@pytest.mark.parametrize("postmaster", ["a..b@x.test", ".x@x.test", "x.@x.test", "x@-bad.test"])
def test_postmaster_is_checked_by_the_address_parser(tmp_path: Path, postmaster: str) -> None:
    """A postmaster address the relay's own parser refuses is a configuration error."""
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[relay]\nhostname = "h.test"\npostmaster = "{postmaster}"\n', tmp_path)
    assert any(p.startswith("relay.postmaster:") for p in caught.value.problems)


def test_relay_domains_match_exactly_or_below_a_star() -> None:
    """relay_domains: lower-cased, repeats dropped; 'x' matches x only, '*.x' below x only."""
    smtp = parse_config(
        HEAD + "[smtp]\nrelay_domains = ['Partner.TEST', '*.sub.test', 'partner.test']", DATA
    ).smtp
    assert smtp.relay_domains == ("partner.test", "*.sub.test")
    assert smtp.relays_to("PARTNER.test") and smtp.relays_to("partner.test.")
    assert smtp.relays_to("a.sub.test") and smtp.relays_to("a.b.sub.test")
    assert not smtp.relays_to("sub.test") and not smtp.relays_to("x.partner.test")
    assert not smtp.relays_to("partner.test.evil.test")
    assert parse_config(HEAD, DATA).smtp.relay_domains == ()


@pytest.mark.parametrize("bad", ["['.partner.test']", "['a..b']", "'partner.test'", "[1]"])
def test_bad_relay_domains_are_named(bad: str) -> None:
    """A relay_domains entry that is not a domain (or *.domain) is a problem naming it."""
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + f"[smtp]\nrelay_domains = {bad}", DATA)
    assert caught.value.problems[0].startswith("smtp.relay_domains")

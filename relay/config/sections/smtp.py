"""``[smtp]``, the inbound server, and ``[smtp_client]``, how the SMTP channel talks to others."""

from __future__ import annotations

from relay.config.model import SmtpClientSection, SmtpSection
from relay.config.reader import _Paths, _Table
from relay.config.values import (
    _boolean,
    _ca_file,
    _dns_server,
    _domain_pattern,
    _duration,
    _endpoint,
    _line_length_limit,
    _network,
    _positive_duration,
    _positive_int,
    _worker_count,
)


def _read_smtp(t: _Table, paths: _Paths) -> SmtpSection:
    d = SmtpSection()
    smtp = SmtpSection(
        listen=t.get_list("listen", _endpoint, d.listen, "endpoints"),
        listen_tls=t.get_list("listen_tls", _endpoint, d.listen_tls, "endpoints"),
        trusted_networks=t.get_list(
            "trusted_networks", _network, d.trusted_networks, "networks", unique=True
        ),
        max_message_size=t.get("max_message_size", _positive_int, d.max_message_size),
        max_recipients=t.get("max_recipients", _positive_int, d.max_recipients),
        max_errors=t.get("max_errors", _positive_int, d.max_errors),
        max_sessions=t.get("max_sessions", _positive_int, d.max_sessions),
        max_sessions_per_client=t.get(
            "max_sessions_per_client", _positive_int, d.max_sessions_per_client
        ),
        idle_timeout=t.get("idle_timeout", _positive_duration, d.idle_timeout),
        session_timeout=t.get("session_timeout", _positive_duration, d.session_timeout),
        tls_cert_file=t.get("tls_cert_file", paths.file, d.tls_cert_file),
        tls_key_file=t.get("tls_key_file", paths.file, d.tls_key_file),
        auth_users_file=t.get("auth_users_file", paths.file, d.auth_users_file),
        auth_requires_tls=t.get("auth_requires_tls", _boolean, d.auth_requires_tls),
        greet_delay=t.get("greet_delay", _duration, d.greet_delay),
        max_text_in_memory=t.get("max_text_in_memory", _positive_int, d.max_text_in_memory),
        auth_max_failures=t.get("auth_max_failures", _positive_int, d.auth_max_failures),
        auth_failure_window=t.get("auth_failure_window", _positive_duration, d.auth_failure_window),
        workers=t.get("workers", _worker_count, d.workers),
        relay_domains=t.get_list(
            "relay_domains", _domain_pattern, d.relay_domains, "domains", unique=True
        ),
    )
    _check_smtp_tls(t, smtp)
    return smtp


def _check_smtp_tls(t: _Table, smtp: SmtpSection) -> None:
    """Certificate and key come together; TLS listeners and TLS-only AUTH need them."""
    has_cert, has_key = t.has("tls_cert_file"), t.has("tls_key_file")
    if has_cert and not has_key:
        t.problem("tls_key_file", f"required when {t.key('tls_cert_file')} is set")
    if has_key and not has_cert:
        t.problem("tls_cert_file", f"required when {t.key('tls_key_file')} is set")
    if smtp.listen_tls and not (has_cert or has_key):
        t.problem("listen_tls", "needs smtp.tls_cert_file and smtp.tls_key_file")
    if t.has("auth_users_file") and smtp.auth_requires_tls and not (has_cert or has_key):
        t.problem(
            "auth_users_file",
            "AUTH is offered only over TLS (auth_requires_tls = true) "
            "but smtp.tls_cert_file is not set",
        )


def _read_smtp_client(t: _Table, paths: _Paths) -> SmtpClientSection:
    d = SmtpClientSection()
    return SmtpClientSection(
        connect_timeout=t.get("connect_timeout", _positive_duration, d.connect_timeout),
        greeting_timeout=t.get("greeting_timeout", _positive_duration, d.greeting_timeout),
        helo_timeout=t.get("helo_timeout", _positive_duration, d.helo_timeout),
        mail_timeout=t.get("mail_timeout", _positive_duration, d.mail_timeout),
        rcpt_timeout=t.get("rcpt_timeout", _positive_duration, d.rcpt_timeout),
        data_timeout=t.get("data_timeout", _positive_duration, d.data_timeout),
        data_block_timeout=t.get("data_block_timeout", _positive_duration, d.data_block_timeout),
        data_done_timeout=t.get("data_done_timeout", _positive_duration, d.data_done_timeout),
        connection_cache_time=t.get("connection_cache_time", _duration, d.connection_cache_time),
        max_messages_per_connection=t.get(
            "max_messages_per_connection", _positive_int, d.max_messages_per_connection
        ),
        line_length_limit=t.get("line_length_limit", _line_length_limit, d.line_length_limit),
        dns_servers=t.get_list(
            "dns_servers", _dns_server, d.dns_servers, "name server addresses", unique=True
        ),
        ca_file=t.get("ca_file", lambda v: _ca_file(paths.file(v)), d.ca_file),
    )

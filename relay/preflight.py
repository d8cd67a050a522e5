"""Checks beyond the configuration file itself, run before the relay starts.

``relay.config`` checks the TOML and that the files it names exist; some files can only
be judged by the part that uses them: the aliases file by its parser, the TLS
certificate and key by loading them together.  ``relay check-config`` and
``twistd relay`` both run these checks, so a configuration that check-config calls ok
is one the relay will start with.

:func:`advise` is what only ``check-config`` says, about configurations the relay runs
but an operator should hear about: a problem (exit 78) when ``[relay] postmaster`` is a
local address nobody receives (RFC 5321 section 4.5.1: postmaster must work), and a note
for a phone route whose domain is not in ``[smtp] relay_domains`` (mail for the site is
then taken over SMTP only from trusted networks and authenticated clients).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.channels.local.aliases import AliasesError
from relay.channels.local.users import LocalRecipients, build_local_recipients, postmaster_problem
from relay.config import Channel, Config
from relay.gateway.tls import load_server_tls

__all__ = ["Advice", "PreflightError", "advise", "preflight"]


class PreflightError(Exception):
    """The configuration is valid TOML but the relay cannot start with it."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def preflight(config: Config) -> LocalRecipients:
    """Load what the relay will load at start; raise PreflightError listing every problem.

    Returns the local users and aliases, so the caller need not read the aliases twice.
    """
    problems: list[str] = []
    recipients: LocalRecipients | None = None
    try:
        recipients = build_local_recipients(config)
    except AliasesError as e:
        problems.extend(f"local.aliases: {line}" for line in str(e).splitlines())
    smtp = config.smtp
    if smtp.tls_cert_file is not None and smtp.tls_key_file is not None:
        try:
            load_server_tls(smtp.tls_cert_file, smtp.tls_key_file)
        except (ValueError, OSError) as e:
            problems.append(f"smtp.tls_cert_file/tls_key_file: {e}")
    if problems or recipients is None:
        raise PreflightError(problems)
    return recipients


@dataclass(frozen=True, slots=True)
class Advice:
    """What ``check-config`` says beyond "it will start": problems to fix, and notes."""

    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def advise(config: Config, recipients: LocalRecipients) -> Advice:
    """The problems and notes of :func:`preflight`'s valid ``config`` (module docstring)."""
    problem = postmaster_problem(config, recipients)
    notes = tuple(
        f"route {route.domain!r} (phone site {route.site}) is not in smtp.relay_domains: "
        "only trusted networks and authenticated clients may send mail for it over SMTP"
        for route in config.routes
        if route.channel is Channel.PHONE and not config.smtp.relays_to(route.domain)
    )
    return Advice(() if problem is None else (problem,), notes)

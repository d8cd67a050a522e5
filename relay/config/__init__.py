"""The configuration: one TOML file read into frozen, typed objects.

Why it is built this way:

* **Every problem at once.** The whole file is read and checked before anything starts,
  and :class:`ConfigError` lists *every* problem, one line each, naming the key.
* **No separate schema.** Every key is read through the reader, which learns the legal
  names of its table as the code asks for them; the rest are unknown keys, reported
  with a "did you mean".
* **Converted once, here.** The objects hold finished values (seconds, absolute paths,
  ``ipaddress`` networks, enums, transports as small classes); code that uses the
  configuration never parses a string, and nothing can change it under a running
  service (frozen dataclasses with slots).
* **Each default defined once**, as the field default of its section's dataclass;
  ``relay/default.toml`` (:data:`DEFAULT_TOML`) shows the same values, and a test
  checks that the two agree.

The parts, one job each:

* :mod:`.model` — the sections, the enums and transports, :class:`Config`;
* :mod:`.values` — value conversion: one TOML value to one finished value or a
  reason, and transport descriptions (:func:`parse_transport`);
* :mod:`.reader` — the table reader that collects problems and anchors paths to the
  file, and :class:`ConfigError`;
* :mod:`.sections` — one reader per section (``[relay]``, ``[smtp]`` and
  ``[smtp_client]``, ``[deliver]``, ``[local]``, ``[[route]]``, ``[phone]``,
  ``[metrics]``) and the checks across its keys;
* :mod:`.loading` — the entry points :func:`load_config`, :func:`parse_config` and
  :func:`default_config`.

The key names of SPEC.md's "The configuration's shape" are fixed; ``docs/configuration.md``
documents every key.  Names with an underscore are private to this package: its modules
share them, nothing outside does.
"""

from __future__ import annotations

from relay.config.loading import DEFAULT_TOML, default_config, load_config, parse_config
from relay.config.model import (
    Channel,
    Config,
    DeliverSection,
    LocalSection,
    MailboxFormat,
    MetricsSection,
    PhoneSection,
    PhoneSite,
    RelaySection,
    Route,
    SerialTransport,
    Smarthost,
    SmtpClientSection,
    SmtpSection,
    StdioTransport,
    TcpTransport,
    TlsPolicy,
    Transport,
    domain_matches,
    field_default,
)
from relay.config.reader import ConfigError
from relay.config.values import parse_transport

__all__ = [
    "DEFAULT_TOML",
    "Channel",
    "Config",
    "ConfigError",
    "DeliverSection",
    "LocalSection",
    "MailboxFormat",
    "MetricsSection",
    "PhoneSection",
    "PhoneSite",
    "RelaySection",
    "Route",
    "SerialTransport",
    "Smarthost",
    "SmtpClientSection",
    "SmtpSection",
    "StdioTransport",
    "TcpTransport",
    "TlsPolicy",
    "Transport",
    "default_config",
    "domain_matches",
    "field_default",
    "load_config",
    "parse_config",
    "parse_transport",
]

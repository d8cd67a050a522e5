"""TLS for the SMTP client: what STARTTLS is started with, per route policy.

* ``required``: the server's certificate must chain to a trusted root (the system trust
  store, or the ``ca_file`` the channel was given) **and** name the host we connected to
  (the MX host's name, the smarthost's name, or the IP address of a ``[bracketed]``
  smarthost), checked by service_identity.  Anything less fails the handshake, and the
  mail waits: Postfix's ``secure``/``verify`` level.
* ``opportunistic``: encrypt when the server offers STARTTLS, without verifying anything
  (Postfix's ``may``): it protects against passive eavesdropping only, and refusing an
  unverifiable certificate would mean sending in clear instead, which is worse.  If the
  handshake itself fails, the connector retries the same address once without TLS (as
  Postfix does), since the server may simply have a broken TLS stack.
* ``none``: STARTTLS is never sent.

The CA file is read once, when the channel is built, so a missing or broken file is an
error at start-up, not a surprise on the first delivery.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet import ssl

from relay.config import TlsPolicy

__all__ = ["TlsContexts"]

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TlsContexts:
    """Makes the TLS connection creator for each STARTTLS; built once per channel."""

    def __init__(self, ca_file: Path | None = None) -> None:
        if ca_file is None:
            self._trust_root: Any = ssl.platformTrust()  # type: ignore[no-untyped-call]
            self.trust = "system trust store"
        else:
            self._trust_root = _load_ca_file(ca_file)
            self.trust = str(ca_file)
        self._unverified = ssl.CertificateOptions()

    def client_options(self, policy: TlsPolicy, server_name: str) -> Any:
        """What ``startTLS`` takes for ``policy`` towards ``server_name``."""
        if policy is TlsPolicy.REQUIRED:
            return ssl.optionsForClientTLS(server_name, trustRoot=self._trust_root)
        if policy is TlsPolicy.OPPORTUNISTIC:
            return self._unverified
        raise ValueError("no TLS with policy 'none'")


def _load_ca_file(path: Path) -> Any:
    """Every certificate of a PEM file, as a trust root; ValueError if it holds none."""
    blocks = _PEM_CERT.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate found")
    certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
    return ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]

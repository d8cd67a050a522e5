"""TLS for the gateway: the server context from PEM files, and what a session negotiated.

One :class:`~twisted.internet.ssl.CertificateOptions` serves both STARTTLS and the
implicit-TLS listeners.  It is built, and its context made, when the gateway is built,
so a key that does not match its certificate stops the relay at start instead of
failing every handshake later.  TLS 1.2 is the minimum (RFC 8996 retired 1.0 and 1.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions, TLSVersion

__all__ = ["load_server_tls", "tls_description"]


def load_server_tls(cert_file: Path, key_file: Path) -> CertificateOptions:
    """Server TLS options from a PEM certificate (chain: leaf first) and its PEM key.

    Raises ValueError if the files hold no certificate, an unreadable (or encrypted)
    key, or a key that does not fit the certificate.
    """
    try:
        certificates = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
    except ValueError as e:
        raise ValueError(f"{cert_file}: no usable PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key_file}: no usable unencrypted PEM private key: {e}") from None
    # pyOpenSSL wants cryptography's objects now (its X509/PKey wrappers are deprecated);
    # Twisted passes them straight through, though its annotations still name the old ones.
    leaf: Any = certificates[0]
    chain: Any = certificates[1:]
    private_key: Any = key
    options = CertificateOptions(
        privateKey=private_key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise ValueError(f"{cert_file}, {key_file}: cannot use them together: {e}") from e
    return options


def tls_description(transport: Any) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for a TLS transport, None if it is not one."""
    try:
        connection = transport.getHandle()
    except AttributeError:
        return None
    if not isinstance(connection, SSL.Connection):
        return None
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    if not cipher:
        return None
    return f"{version} {cipher}"

"""Throw-away TLS material for tests: a CA and a server certificate it signed.

Made at test time with ``cryptography`` (no key is committed): the server certificate
names ``localhost``, ``mx1.example.test``, ``mail.partner.test``, 127.0.0.1 and ::1, so
the SMTP client's verification can pass (right CA, right name) or fail (wrong CA, wrong
name) against the scripted server on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

__all__ = ["TlsFiles", "make_tls_files"]

SERVER_NAMES = ("localhost", "mx1.example.test", "mail.partner.test")
SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and of the server's certificate + key (PEM)."""

    ca_file: Path
    server_pem: Path  # the server's key and certificate in one file
    other_ca_file: Path  # a CA that did not sign the server certificate
    cert_file: Path  # the server's certificate chain (leaf, then the CA), as the gateway takes it
    key_file: Path  # the server's private key alone

    def server_context(self) -> Any:
        """A Twisted server context factory for the scripted server's STARTTLS."""
        return ssl.PrivateCertificate.loadPEM(self.server_pem.read_bytes()).options()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a CA, a second CA and a server certificate signed by the first into ``directory``."""
    ca_key, ca_cert = _ca("relay test CA")
    _, other_cert = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    other = directory / "other-ca.pem"
    other.write_bytes(other_cert.public_bytes(pem))
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = directory / "server.pem"
    server.write_bytes(key_pem + cert.public_bytes(pem))
    chain = directory / "chain.pem"
    chain.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_file = directory / "key.pem"
    key_file.write_bytes(key_pem)
    return TlsFiles(ca_file, server, other, chain, key_file)

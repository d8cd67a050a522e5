"""The handshake's pure parts: versions, capability negotiation, proofs and keys.

Both ends send their :class:`~relay.sansio.phone.records.Hello` at once.  When an end
holds both hellos it knows everything the handshake decides, so it needs no more round
trips than the proofs:

* **Version.**  Majors must be equal (a different major is a different protocol: both
  ends see it from the hellos, say why in an abort record and hang up); the minor is the
  lower of the two, for features a later minor adds.
* **Proof.**  ``HMAC-SHA256(secret, label || SHA-256(caller hello || answerer hello))``,
  the label naming the prover's role so a proof cannot be reflected back.  Binding both
  hellos (nonces and capabilities) means a proof is fresh, and a tampered capability
  fails the proof.  The secret never crosses the line.
* **Capabilities.**  The lower of both windows, frame and record limits and message size
  limits; compression when both allow it; encryption when either asks for it.
* **Per-site settings.**  The caller knows whom it calls, so its hello carries its
  settings for that site.  The answerer sends its hello before it knows who calls; once
  the caller's hello names it, the answerer applies its settings for that site and, if
  they differ from its hello's, sends them in its proof (covered by the proof's MAC).
  Both ends then negotiate with those in place of the answerer's hello capabilities: no
  extra round trip, a few more bytes in one proof.  The price: an unknown name gets a
  decoy proof without them, so a caller that names a site whose settings differ from the
  answerer's defaults learns, before proving anything, that the name is known and those
  settings (never a secret or any mail).
* **Keys**, when encrypting: HKDF-SHA256 over the secret, salted with both nonces,
  bound to the transcript, one key per direction.

A proof over both hellos is a dictionary oracle for a weak secret (anyone who calls gets
one), as in every challenge-response over a shared secret: secrets are random 32 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.sansio.phone.errors import PhoneProtocolError
from relay.sansio.phone.records import Capabilities, Role

__all__ = [
    "MAJOR",
    "MINOR",
    "MIN_RECORD",
    "Negotiated",
    "check_capabilities",
    "derive_keys",
    "make_proof",
    "negotiate",
    "transcript_hash",
    "verify_proof",
]

MAJOR = 1
MINOR = 0
_PROOF_LABEL = {
    Role.CALLER: b"relay-phone caller proof",
    Role.ANSWERER: b"relay-phone answerer proof",
}
_KEY_INFO = b"relay-phone record keys"
MIN_RECORD = 16 * 1024
"""The smallest ``max_record`` a peer may ask for: a proposal of a long envelope fits."""
_MAX_FRAME = 16 * 1024
_MAX_WINDOW = 1 << 30


def check_capabilities(caps: Capabilities) -> None:
    """Refuse (:class:`PhoneProtocolError`) limits no link can work with."""
    if not 16 <= caps.min_frame_payload <= caps.max_frame_payload <= _MAX_FRAME:
        raise PhoneProtocolError(
            f"frame sizes {caps.min_frame_payload}..{caps.max_frame_payload} out of range"
        )
    if not caps.max_frame_payload <= caps.window <= _MAX_WINDOW:
        raise PhoneProtocolError(f"window {caps.window} out of range")
    if not MIN_RECORD <= caps.max_record < 1 << 31:
        raise PhoneProtocolError(f"record limit {caps.max_record} out of range")


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both ends agreed on, computed alike at each end from the two hellos."""

    minor: int
    min_frame_payload: int
    max_frame_payload: int
    window: int
    max_record: int
    max_message_size: int  # the largest message the peer takes from us
    compression: bool
    encryption: bool
    resume: bool


def negotiate(minor: int, local: Capabilities, peer: Capabilities, peer_minor: int) -> Negotiated:
    """The common ground of two capability sets (symmetric, except the message limit)."""
    max_frame = min(local.max_frame_payload, peer.max_frame_payload)
    return Negotiated(
        minor=min(minor, peer_minor),
        min_frame_payload=min(max(local.min_frame_payload, peer.min_frame_payload), max_frame),
        max_frame_payload=max_frame,
        window=min(local.window, peer.window),
        max_record=min(local.max_record, peer.max_record),
        max_message_size=peer.max_message_size,
        compression=local.compression and peer.compression,
        encryption=local.encryption or peer.encryption,
        resume=local.resume and peer.resume,
    )


def transcript_hash(caller_hello: bytes, answerer_hello: bytes) -> bytes:
    """SHA-256 over both hellos as sent, each prefixed by its length."""
    h = hashlib.sha256()
    for part in (caller_hello, answerer_hello):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def make_proof(secret: bytes, prover: Role, transcript: bytes, terms: bytes = b"") -> bytes:
    """The proof that ``prover`` knows ``secret``, for this call only, covering ``terms``
    (the capabilities the proof record carries, if any) too."""
    message = _PROOF_LABEL[prover] + transcript + terms
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify_proof(
    secret: bytes, prover: Role, transcript: bytes, mac: bytes, terms: bytes = b""
) -> bool:
    """True if ``mac`` is ``prover``'s proof (compared in constant time)."""
    return hmac.compare_digest(make_proof(secret, prover, transcript, terms), mac)


def derive_keys(
    secret: bytes, caller_nonce: bytes, answerer_nonce: bytes, transcript: bytes
) -> tuple[bytes, bytes]:
    """(caller-to-answerer key, answerer-to-caller key) for ChaCha20-Poly1305."""
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=caller_nonce + answerer_nonce,
        info=_KEY_INFO + transcript,
    ).derive(secret)
    return material[:32], material[32:]

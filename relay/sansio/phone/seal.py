"""Encryption of the records after the handshake: ChaCha20-Poly1305, a counter per direction.

Each direction has its own key (derived in :mod:`relay.sansio.phone.handshake`) and its
own record counter, which is the nonce: the link delivers records exactly once and in
order, so both ends count alike and a nonce is never used twice with one key.  A record
that does not open (tapped and altered, replayed, or out of step) is a protocol error:
nothing after it can be trusted.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relay.sansio.phone.errors import LocalPhoneError, PhoneProtocolError

__all__ = ["TAG_SIZE", "Opener", "SealError", "Sealer"]

TAG_SIZE = 16
_MAX_COUNTER = (1 << 64) - 1


class SealError(PhoneProtocolError):
    """A record that does not authenticate under the expected key and counter."""


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


class Sealer:
    """Encrypts our records, one counter value each."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def seal(self, record: bytes) -> bytes:
        """The record encrypted and authenticated (16 bytes longer)."""
        if self._counter >= _MAX_COUNTER:
            raise LocalPhoneError("record counter exhausted")
        out = self._aead.encrypt(_nonce(self._counter), record, None)
        self._counter += 1
        return out


class Opener:
    """Decrypts the peer's records in the order they were sealed."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def open(self, sealed: bytes) -> bytes:
        """The record inside ``sealed``; :class:`SealError` if it does not authenticate."""
        if len(sealed) < TAG_SIZE or self._counter >= _MAX_COUNTER:
            raise SealError("sealed record too short")
        try:
            out = self._aead.decrypt(_nonce(self._counter), sealed, None)
        except InvalidTag:
            raise SealError("a record failed authentication") from None
        self._counter += 1
        return out

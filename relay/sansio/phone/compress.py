"""Compression of message text: one deflate stream per direction, across a call's messages.

Mail of one call shares much (headers, signatures, the same MIME boilerplate), so one
stream for every message of a direction compresses better than a stream per message.  Each
chunk is tried on a copy of the compressor: if the deflated form (sync-flushed, so the
receiver can inflate it at once) is shorter, the copy becomes the compressor and the chunk
goes deflated; if not, the chunk goes as it is and neither end's stream sees it, so both
streams stay in step whatever mix of chunks is sent.  An incompressible attachment thus
costs no byte on the line, only the trial.

The receiver bounds what one chunk may inflate to (a deflate bomb is a protocol error).

Proposals and the inventory go through a second stream per direction, always (they are
the protocol's own metadata, not the mail the compression option is about): their ids,
addresses and sizes repeat from message to message, so each costs about half its bytes.
Each is flushed with ``Z_PARTIAL_FLUSH``, which lets the receiver inflate all of it at
once and costs less than a sync flush's four bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

from relay.sansio.phone.errors import PhoneProtocolError

__all__ = [
    "ChunkCompressor",
    "ChunkDecompressor",
    "CompressionError",
    "RecordDeflater",
    "RecordInflater",
]

_WBITS = -15  # raw deflate: the record says it is compressed, no header needed


class CompressionError(PhoneProtocolError):
    """A compressed chunk that does not inflate, or inflates to more than allowed."""


class ChunkCompressor:
    """Deflates chunks on a shared stream, keeping only those that shrink."""

    def __init__(self, level: int = 6) -> None:
        self._stream = zlib.compressobj(level, zlib.DEFLATED, _WBITS)

    def compress(self, chunk: bytes) -> tuple[bool, bytes]:
        """(True, deflated) when that is shorter than the chunk, else (False, chunk)."""
        trial = self._stream.copy()
        out = trial.compress(chunk) + trial.flush(zlib.Z_SYNC_FLUSH)
        if len(out) < len(chunk):
            self._stream = trial
            return True, out
        return False, chunk


class ChunkDecompressor:
    """Inflates the chunks a :class:`ChunkCompressor` deflated, in the order sent."""

    def __init__(self) -> None:
        self._stream = zlib.decompressobj(_WBITS)

    def decompress(self, data: bytes, max_size: int) -> bytes:
        """The chunk inside ``data``; :class:`CompressionError` if over ``max_size``."""
        return _inflate(self._stream, data, max_size, "compressed text")


class RecordDeflater:
    """Deflates control records on one stream for the whole call."""

    def __init__(self) -> None:
        self._stream = zlib.compressobj(9, zlib.DEFLATED, _WBITS)

    def deflate(self, record: bytes) -> bytes:
        """The record deflated; only the peer's :class:`RecordInflater` can read it."""
        return self._stream.compress(record) + self._stream.flush(zlib.Z_PARTIAL_FLUSH)


class RecordInflater:
    """Inflates what a :class:`RecordDeflater` sent, in order."""

    def __init__(self) -> None:
        self._stream = zlib.decompressobj(_WBITS)

    def inflate(self, data: bytes, max_size: int) -> bytes:
        """The record inside ``data``; :class:`CompressionError` if bad or over ``max_size``."""
        out = _inflate(self._stream, data, max_size, "deflated record")
        if not out:
            raise CompressionError("deflated record is empty")
        return out


def _inflate(stream: Any, data: bytes, max_size: int, what: str) -> bytes:
    """All that ``data`` inflates to on ``stream``, refusing more than ``max_size``."""
    try:
        out: bytes = stream.decompress(data, max_size + 1)
    except zlib.error as e:
        raise CompressionError(f"{what} does not inflate: {e}") from None
    if len(out) > max_size or stream.unconsumed_tail:
        raise CompressionError(f"{what} inflates past its limit of {max_size} bytes")
    return out

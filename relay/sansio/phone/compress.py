"""Compression of message text: one deflate stream per direction, across a call's messages.

Mail of one call shares much (headers, signatures, the same MIME boilerplate), so one
stream for every message of a direction compresses better than a stream per message.  Each
chunk is tried on a copy of the compressor: if the deflated form (sync-flushed, so the
receiver can inflate it at once) is shorter, the copy becomes the compressor and the chunk
goes deflated; if not, the chunk goes as it is and neither end's stream sees it, so both
streams stay in step whatever mix of chunks is sent.  An incompressible attachment thus
costs no byte on the line, only the trial.

The receiver bounds what one chunk may inflate to (a deflate bomb is a protocol error).
"""

from __future__ import annotations

import zlib

from relay.sansio.phone.errors import PhoneProtocolError

__all__ = ["ChunkCompressor", "ChunkDecompressor", "CompressionError"]

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
        try:
            out = self._stream.decompress(data, max_size + 1)
        except zlib.error as e:
            raise CompressionError(f"compressed text does not inflate: {e}") from None
        if len(out) > max_size or self._stream.unconsumed_tail:
            raise CompressionError("compressed text inflates past the message's size")
        return out

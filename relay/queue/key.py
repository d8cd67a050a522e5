"""The spool's key: the secret that makes a record header impossible for a sender to forge.

Theory of operation
-------------------
Recovery resynchronises after a damaged header at the next *sound* header
(:mod:`relay.queue.record`).  A message body is chosen by whoever sent the mail, so a
header check anyone can compute (a plain CRC) would let a crafted body smuggle records
into the log the moment damage made recovery look inside it.  Every header therefore
carries a tag keyed with 32 random octets kept in ``<spool>/key``, which is created when
the spool is and never leaves it.

The file is a few lines of text::

    relay spool key 1
    key <64 hex digits>
    keyed-from <segment number>

``keyed-from`` is the first segment written with keyed headers.  A new spool has 1.  A
spool created before keys existed has segments of the legacy format (unkeyed CRC
headers); the first start of this version gives it a key with ``keyed-from`` one past
its highest segment, so its old segments are still read as they were written (see
:class:`~relay.queue.record.Framing`), every new record goes into a new, keyed segment,
and the old segments go away as their mail leaves, the way every segment does.

The file is written whole or not at all (temporary file, fsync, ``link``, fsync of the
directory) and never replaced.  A key that is missing while keyed segments exist, or
that cannot be read, is an error the spool refuses to open with: a new key would make
every record unreadable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from relay.errors import SpoolError
from relay.queue.layout import SpoolLayout, write_file_durably
from relay.queue.record import KEY_SIZE, MAGIC, Framing

__all__ = ["SpoolKey", "load_key", "open_key", "segment_framing"]

_TITLE = "relay spool key 1"


@dataclass(frozen=True, slots=True)
class SpoolKey:
    """The key of one spool, and the first segment its headers are keyed in."""

    key: bytes = field(repr=False)  # a secret: kept out of logs and tracebacks
    keyed_from: int

    def framing(self, segment: int) -> Framing:
        """How segment ``segment`` is framed: keyed, or legacy if it is older than the key."""
        return Framing(self.key if segment >= self.keyed_from else None, segment)

    def to_text(self) -> str:
        """The contents of ``<spool>/key``."""
        return f"{_TITLE}\nkey {self.key.hex()}\nkeyed-from {self.keyed_from}\n"


def segment_framing(key: SpoolKey | None, segment: int) -> Framing:
    """How segment ``segment`` is read with ``key`` (None: the spool has none, all legacy)."""
    return Framing(None, segment) if key is None else key.framing(segment)


def load_key(layout: SpoolLayout) -> SpoolKey | None:
    """The spool's key, or None if it has none yet; SpoolError if it cannot be used.

    Without a key every segment is read as legacy, which is only right if none is
    keyed: a spool whose key was lost is refused rather than misread.
    """
    path = layout.key_path
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        for number in layout.segment_numbers():
            if _starts_keyed(layout, number):
                raise SpoolError(
                    f"spool key {path} is missing but segment {number} was written with it; "
                    "restore the key file (the spool cannot be read without it)"
                ) from None
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SpoolError(f"cannot read the spool key {path}: {e}") from e
    return _parse(text, str(path))


def open_key(layout: SpoolLayout) -> SpoolKey:
    """The spool's key, created (durably) if the spool has none: for whoever will write.

    A spool with legacy segments gets ``keyed-from`` one past the highest of them.
    """
    found = load_key(layout)
    if found is not None:
        return found
    numbers = layout.segment_numbers()
    created = SpoolKey(os.urandom(KEY_SIZE), numbers[-1] + 1 if numbers else 1)
    try:
        write_file_durably(layout.key_path, created.to_text().encode("ascii"))
    except FileExistsError:  # created meanwhile by another opener: that one counts
        found = load_key(layout)
        assert found is not None
        return found
    except OSError as e:
        raise SpoolError(f"cannot create the spool key {layout.key_path}: {e}") from e
    return created


def _parse(text: str, where: str) -> SpoolKey:
    lines = text.split("\n")
    if len(lines) == 4 and lines[0] == _TITLE and lines[3] == "":
        key_word, _, key_hex = lines[1].partition(" ")
        from_word, _, from_text = lines[2].partition(" ")
        try:
            key = bytes.fromhex(key_hex)
            keyed_from = int(from_text)
        except ValueError:
            key, keyed_from = b"", 0
        named = (key_word, from_word) == ("key", "keyed-from")
        if named and len(key) == KEY_SIZE and from_text.isdigit() and keyed_from >= 1:
            return SpoolKey(key, keyed_from)
    raise SpoolError(f"the spool key {where} is damaged; restore it from a backup")


def _starts_keyed(layout: SpoolLayout, number: int) -> bool:
    """Whether segment ``number`` begins with a keyed header's magic."""
    try:
        with layout.segment_path(number).open("rb") as segment:
            return segment.read(len(MAGIC)) == MAGIC
    except OSError:
        return False

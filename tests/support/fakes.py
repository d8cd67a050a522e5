"""Small in-memory stand-ins the tests share (real implementations of the interfaces)."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.envelope import Envelope
from relay.errors import SpoolError
from relay.interfaces import IMessage, ITextReader


@implementer(ITextReader)
class BytesReader:
    """Reads a bytes object in chunks, as the spool's reader reads a file."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.closed = False

    def read(self, max_bytes: int) -> Deferred[bytes]:
        """The next chunk, b"" at the end; an error once closed."""
        if self.closed:
            raise ValueError("read after close")
        chunk = self._data[self._pos : self._pos + max_bytes]
        self._pos += len(chunk)
        return defer.succeed(chunk)

    def close(self) -> None:
        """Mark the reader closed."""
        self.closed = True


@implementer(IMessage)
@dataclass
class BytesMessage:
    """A queued message held in memory."""

    queue_id: str
    envelope: Envelope
    text: bytes
    readers: list[BytesReader] = field(default_factory=list)

    @property
    def size(self) -> int:
        """The text's length."""
        return len(self.text)

    def open_text(self) -> BytesReader:
        """A fresh reader from the first byte."""
        reader = BytesReader(self.text)
        self.readers.append(reader)
        return reader


class CountingReader(BytesReader):
    """A BytesReader that records each read's size and can fail at a given read."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.reads: list[int] = []
        self.fail_at = fail_at

    def read(self, max_bytes: int) -> Deferred[bytes]:
        """The next chunk; a SpoolError at read number ``fail_at``."""
        self.reads.append(max_bytes)
        if self.fail_at is not None and len(self.reads) == self.fail_at:
            return defer.fail(SpoolError("text damaged on disk"))
        return super().read(max_bytes)


@implementer(IMessage)
class CountingMessage:
    """A message whose readers are CountingReaders."""

    def __init__(self, env: Envelope, text: bytes, fail_at: int | None = None) -> None:
        self.queue_id = "q1"
        self.envelope = env
        self.size = len(text)
        self.text = text
        self.fail_at = fail_at
        self.readers: list[CountingReader] = []

    def open_text(self) -> CountingReader:
        """A new CountingReader."""
        reader = CountingReader(self.text, self.fail_at)
        self.readers.append(reader)
        return reader

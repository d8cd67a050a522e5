"""Fixtures the spool's tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.queue.layout import SpoolLayout

from queue_helpers import mounted_tmpfs


@pytest.fixture
def read_only_quarantine(tmp_path: Path) -> Iterator[SpoolLayout]:
    """A spool whose quarantine/ is a read-only tmpfs (root ignores mode bits, not this)."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.make_dirs()
    with mounted_tmpfs(layout.quarantine_dir, "ro,size=64k", "an unwritable quarantine/"):
        yield layout

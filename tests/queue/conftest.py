"""Fixtures the spool's tests share."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.queue.layout import SpoolLayout


@pytest.fixture
def read_only_quarantine(tmp_path: Path) -> Iterator[SpoolLayout]:
    """A spool whose quarantine/ is a read-only tmpfs (root ignores mode bits, not this)."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.make_dirs()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(layout.quarantine_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            "an unwritable quarantine/ needs a read-only tmpfs mounted (run as root, with "
            f"mount permitted): mount said: {done.stderr.strip() or done.returncode}"
        )
    try:
        yield layout
    finally:
        subprocess.run(["umount", "-l", str(layout.quarantine_dir)], check=False)

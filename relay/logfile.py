"""The operator-facing name of the relay's log observer: ``--logger relay.logfile.observer``.

The observer lives in :mod:`relay.runtime.logfile` with the other Twisted shims; this
module keeps the dotted name that unit files, scripts and the README already pass to
twistd working.
"""

from __future__ import annotations

from relay.runtime.logfile import observer

__all__ = ["observer"]

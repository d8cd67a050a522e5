"""The old home of the series, kept only for :mod:`relay.maildrop.pickup`'s import.

The series live in :mod:`relay.instruments.series`.  Delete this module once pickup
imports :func:`~relay.instruments.series.received` from there.
"""

from __future__ import annotations

from relay.instruments.series import received

__all__ = ["received"]

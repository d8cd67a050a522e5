"""The reader: walks the TOML tables, converting each key and collecting every problem.

**Every problem at once.**  The whole file is read and checked before anything starts,
and :class:`ConfigError` lists *every* problem, one line each, naming the key: an
operator should not have to fix a file one restart at a time.  :class:`_Table` records
a problem and hands back the key's default, so reading always goes on to the end; if
anything was recorded, the half-built result is thrown away
(:func:`relay.config.loading.parse_config`).

**No separate schema.**  Every key is read through a :class:`_Table`, which learns the
legal names of its table as the code asks for them; whatever is left over is an unknown
key, reported with a "did you mean".  The list of keys cannot drift from the code that
uses them.

**Paths are anchored to the file** (:class:`_Paths`).  Relative paths resolve against
the directory of the configuration file (``twistd`` changes directory when it
daemonizes, so a path relative to the working directory would move).  Files the relay
must *read* (TLS keys, secrets, aliases, password files) are checked now; directories
it *creates* (the spool, the mail root) are not.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from relay.config.values import _expected, _Invalid, _shown
from relay.errors import RelayError

__all__ = ["ConfigError"]

T = TypeVar("T")


class ConfigError(RelayError):
    """A configuration that cannot be used; ``problems`` lists every reason, one line each."""

    problems: tuple[str, ...]

    def __init__(self, problems: str | Iterable[str]) -> None:
        if isinstance(problems, str):
            problems = problems.splitlines()
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(prefix: str, key: str) -> str:
    """The dotted name of ``key`` in the table ``prefix``, quoting it as TOML would."""
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key, ensure_ascii=not key.isprintable())
    return f"{prefix}.{key}" if prefix else key


class _Table:
    """Reads one TOML table, recording problems instead of raising.

    Each getter converts a key's value, or records a problem and returns the default so
    that reading goes on. Every key asked for becomes known; :meth:`finish` reports the
    rest as unknown.
    """

    def __init__(
        self, data: Mapping[str, object], name: str, problems: list[str], noun: str = "key"
    ) -> None:
        self.data = data
        self.name = name
        self.problems = problems
        self.noun = noun
        self.known: set[str] = set()
        self.failed: set[str] = set()

    def key(self, key: str) -> str:
        return _join(self.name, key)

    def problem(self, key: str, message: str, *, index: int | None = None) -> None:
        self.failed.add(key)
        where = self.key(key) if index is None else f"{self.key(key)}[{index}]"
        self.problems.append(f"{where}: {message}")

    def has(self, key: str) -> bool:
        self.known.add(key)
        return key in self.data

    def valid(self, *keys: str) -> bool:
        """Whether all of ``keys`` were read without a problem (for cross-checks)."""
        return not self.failed.intersection(keys)

    def get(self, key: str, convert: Callable[[object], T], default: T) -> T:
        if not self.has(key):
            return default
        try:
            return convert(self.data[key])
        except _Invalid as error:
            self.problem(key, str(error))
            return default

    def require(self, key: str, convert: Callable[[object], T], placeholder: T) -> T:
        if not self.has(key):
            self.problem(key, "required")
            return placeholder
        return self.get(key, convert, placeholder)

    def get_list(
        self,
        key: str,
        convert: Callable[[object], T],
        default: tuple[T, ...],
        what: str,
        *,
        unique: bool = False,
    ) -> tuple[T, ...]:
        """An array, each element converted; a bad element is its own problem.

        With ``unique``, repeated elements are dropped (keeping the first), since for a
        set of names or networks a repeat is harmless and order rarely matters.
        """
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, list):
            self.problem(key, str(_expected(f"an array of {what}", value)))
            return default
        items: list[T] = []
        for index, item in enumerate(value):
            try:
                items.append(convert(item))
            except _Invalid as error:
                self.problem(key, str(error), index=index)
        return tuple(dict.fromkeys(items)) if unique else tuple(items)

    def table(self, key: str) -> _Table:
        """The sub-table ``key`` (empty if absent or not a table)."""
        data: Mapping[str, object] = {}
        if self.has(key):
            value = self.data[key]
            if isinstance(value, dict):
                data = value
            else:
                self.problem(key, str(_expected("a table", value)))
        return _Table(data, self.key(key), self.problems)

    def finish(self) -> None:
        """Report every key nobody asked for, with the nearest known name."""
        for key in self.data:
            if key in self.known:
                continue
            close = difflib.get_close_matches(key, sorted(self.known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problems.append(f"{self.key(key)}: unknown {self.noun}{hint}")


class _Paths:
    """Converters for paths, relative ones resolved against the config's directory."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, value: object) -> Path:
        """A path to something the relay creates (need not exist)."""
        if not isinstance(value, str) or not value or "\x00" in value:
            raise _expected("a path", value)
        return self.base / value

    def file(self, value: object) -> Path:
        """A path to a file the relay reads: it must exist and be readable now."""
        path = self.path(value)
        try:
            if not path.exists():
                raise _Invalid(f"file not found: {_shown(path)}")
            if not path.is_file():
                raise _Invalid(f"not a file: {_shown(path)}")
            if not os.access(path, os.R_OK):
                raise _Invalid(f"not readable: {_shown(path)}")
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise _Invalid(f"cannot use {_shown(path)}: {reason}") from None
        return path


def _finished(table: _Table, read: Callable[[_Table], T]) -> T:
    """What ``read`` makes of ``table``, its unknown keys then reported."""
    result = read(table)
    table.finish()
    return result

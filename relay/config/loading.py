"""The entry points: a file or a text in, a :class:`~relay.config.model.Config` out.

:func:`load_config` reads a file, :func:`parse_config` a text (paths relative to a given
directory), :func:`default_config` the embedded default :data:`DEFAULT_TOML`
(``relay/default.toml``, a commented sample file whose values are the model's field
defaults).  Each raises :class:`~relay.config.reader.ConfigError` listing every problem
the sections' readers (:mod:`relay.config.sections`) found.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from relay.config.model import Config
from relay.config.reader import ConfigError, _finished, _Paths, _Table
from relay.config.sections.deliver import _read_deliver
from relay.config.sections.local import _read_local
from relay.config.sections.metrics import _read_metrics
from relay.config.sections.phone import _read_phone
from relay.config.sections.relay import _read_relay
from relay.config.sections.routes import _read_routes
from relay.config.sections.smtp import _read_smtp, _read_smtp_client
from relay.config.values import _shown

__all__ = ["DEFAULT_TOML", "default_config", "load_config", "parse_config"]

DEFAULT_TOML: str = resources.files("relay").joinpath("default.toml").read_text(encoding="utf-8")
"""The text of ``relay/default.toml``: the embedded default, commented as a sample file."""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, check and resolve the file at ``path``; raise ConfigError listing every problem."""
    source = Path(path).absolute()
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{_shown(source)}: file not found"]) from None
    except OSError as error:
        raise ConfigError([f"{_shown(source)}: cannot read: {error.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{_shown(source)}: not UTF-8 text (byte {error.start})"]) from None
    return parse_config(text, source.parent, source=source)


def parse_config(text: str, base_dir: Path, *, source: Path | None = None) -> Config:
    """The configuration in ``text``, relative paths resolved against ``base_dir``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"invalid TOML: {error}"]) from None
    problems: list[str] = []
    config = _read_config(data, base_dir.absolute(), source, problems)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, text=text, base_dir=base_dir.absolute())


def default_config(base_dir: Path | None = None) -> Config:
    """The embedded default (:data:`DEFAULT_TOML`), its paths under ``base_dir`` (or the cwd)."""
    return parse_config(DEFAULT_TOML, Path.cwd() if base_dir is None else base_dir)


def _read_config(
    data: Mapping[str, object], base: Path, source: Path | None, problems: list[str]
) -> Config:
    """Every section of ``data``, each problem appended to ``problems`` (then unusable)."""
    top = _Table(data, "", problems, noun="section")
    paths = _Paths(base)
    relay = _finished(top.table("relay"), lambda t: _read_relay(t, paths))
    smtp = _finished(top.table("smtp"), lambda t: _read_smtp(t, paths))
    smtp_client = _finished(top.table("smtp_client"), lambda t: _read_smtp_client(t, paths))
    deliver = _finished(top.table("deliver"), _read_deliver)
    local = _finished(top.table("local"), lambda t: _read_local(t, paths))
    phone = _finished(top.table("phone"), lambda t: _read_phone(t, paths, relay.hostname))
    routes = _read_routes(top, paths, phone)
    metrics = _finished(top.table("metrics"), _read_metrics)
    top.finish()
    return Config(source, relay, smtp, deliver, local, routes, phone, smtp_client, metrics)

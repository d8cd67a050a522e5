"""The relay as users install it: a wheel in a fresh virtual environment.

The twistd plugins live in ``twisted/plugins/relay_plugins.py``, a module of Twisted's
``twisted.plugins`` namespace (no ``__init__.py`` of ours), so the wheel must carry that
file and nothing else of the namespace: above all no ``dropin.cache``, Twisted's plugin
cache, which a developer's tree has once the tests ran and which would overwrite the
installed Twisted's own.  Twisted rebuilds the cache when it is missing or older than a
plugin module; a cache it cannot read or write only costs a log line.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = "twisted/plugins"


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``cwd`` without this checkout on the path; fail with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


def _source_copy(where: Path) -> Path:
    """The project's files, as a developer's tree has them (with a plugin cache)."""
    copy = where / "src"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in ("relay", "twisted"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    (copy / PLUGINS / "dropin.cache").write_bytes(b"a developer's plugin cache")
    return copy


def _plugin_lines(venv: Path, cwd: Path) -> list[str]:
    """The lines of ``twistd --help`` that name a relay plugin."""
    shown = _run([str(venv / "bin" / "twistd"), "--help"], cwd).stdout
    return [line.split()[0] for line in shown.splitlines() if line.strip().startswith("relay")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_wheel_installed_in_a_fresh_venv_gives_twistd_plugins_and_relay(tmp_path: Path) -> None:
    """From any directory, twistd lists relay and relay-slave, and relay runs on its default."""
    wheels = tmp_path / "wheels"
    source = _source_copy(tmp_path)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "-w", str(wheels), str(source)], tmp_path)
    [wheel] = wheels.glob("relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"{PLUGINS}/relay_plugins.py" in names
    assert [n for n in names if n.startswith("twisted/")] == [f"{PLUGINS}/relay_plugins.py"]
    assert "relay/default.toml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", str(wheel)], tmp_path, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import relay; print(relay.__file__)"], elsewhere).stdout
    assert where.startswith(str(venv)), where

    assert _plugin_lines(venv, elsewhere) == ["relay", "relay-slave"]
    [installed] = venv.glob(f"lib/python*/site-packages/{PLUGINS}")
    cache = installed / "dropin.cache"
    assert cache.is_file()  # written by the run above: Twisted's own cache, with ours in it

    # A cache written before the relay was installed, newer than the plugin file (an
    # installer that keeps the archive's old times): Twisted loads what it does not know.
    entries = pickle.loads(cache.read_bytes())
    del entries["relay_plugins"]
    cache.write_bytes(pickle.dumps(entries))
    future = time.time() + 3600
    os.utime(cache, (future, future))
    assert _plugin_lines(venv, elsewhere) == ["relay", "relay-slave"]

    # A cache that can be neither read nor written (a directory in its place).
    cache.unlink()
    cache.mkdir()
    assert _plugin_lines(venv, elsewhere) == ["relay", "relay-slave"]
    cache.rmdir()

    default = _run([str(venv / "bin" / "relay"), "config", "--default"], elsewhere).stdout
    assert default == (ROOT / "relay" / "default.toml").read_text(encoding="utf-8")
    checked = _run([str(venv / "bin" / "relay"), "check-config"], elsewhere)
    assert "configuration ok" in checked.stdout + checked.stderr

    # Uninstalled, the plugins go with it: the cache keeps no trace of them.
    _run([python, "-m", "pip", "uninstall", "-q", "-y", "relay"], elsewhere)
    assert not (installed / "relay_plugins.py").exists()
    assert _plugin_lines(venv, elsewhere) == []

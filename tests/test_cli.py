"""The ``relay`` command: check-config, config --default, version, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import exitcodes
from relay.cli.main import main
from relay.config import DEFAULT_TOML

DATA = Path(__file__).parent / "data" / "config"


def test_check_config_on_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file exits 0 and prints a one-line summary naming the hostname."""
    assert main(["check-config", "-c", str(DATA / "spec.toml")]) == exitcodes.OK
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "hub.example.test" in out


def test_check_config_lists_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown key, wrong type and missing TLS key file: three precise lines and exit 78."""
    assert main(["check-config", "-c", str(DATA / "broken.toml")]) == exitcodes.CONFIG == 78
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    text = "\n".join(lines)
    assert "smtp.lsiten: unknown key" in text
    assert "did you mean 'listen'" in text
    assert "smtp.max_message_size: expected" in text
    assert "smtp.tls_key_file: file not found" in text


def test_check_config_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration file that does not exist is a configuration error (78), in one line."""
    missing = tmp_path / "nope.toml"
    assert main(["check-config", "-c", str(missing)]) == exitcodes.CONFIG
    err = capsys.readouterr().err
    assert err == f"relay: {missing}: file not found\n"


def test_check_config_without_a_file_checks_the_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without -c the embedded default is checked, and it is valid."""
    assert main(["check-config"]) == exitcodes.OK
    assert "localhost" in capsys.readouterr().out


def test_config_default_prints_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay config --default`` prints exactly the embedded default's TOML text."""
    assert main(["config", "--default"]) == exitcodes.OK
    assert capsys.readouterr().out == DEFAULT_TOML


def test_default_printed_is_a_valid_config(tmp_path: Path) -> None:
    """What ``config --default`` prints passes check-config when saved as a file."""
    path = tmp_path / "relay.toml"
    path.write_text(DEFAULT_TOML)
    assert main(["check-config", "-c", str(path)]) == exitcodes.OK


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay version`` prints the package version."""
    assert main(["version"]) == exitcodes.OK
    assert capsys.readouterr().out.startswith("relay 0.1.0 ")


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["check-config", "--bogus"]])
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A bad command line exits with EX_USAGE (64), not argparse's 2."""
    assert main(argv) == exitcodes.USAGE


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay --help`` is not an error."""
    assert main(["--help"]) == exitcodes.OK
    assert "check-config" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "relay"], [str(Path(sys.executable).parent / "relay")]],
    ids=["python -m relay", "console script"],
)
def test_installed_entry_points(command: list[str]) -> None:
    """``python -m relay`` and the ``relay`` console script both run and pass exit codes on."""
    broken = subprocess.run(
        [*command, "check-config", "-c", str(DATA / "broken.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert broken.returncode == 78, broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 3
    good = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0
    assert good.stdout.startswith("relay ")


def _config_with(tmp_path: Path, extra: str) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f'[relay]\nhostname = "h.example.test"\n{extra}')
    return config


def test_check_config_reads_the_aliases_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An aliases file the relay could not load makes check-config fail with its line."""
    (tmp_path / "aliases").write_text("postmaster: alice\nbroken line without colon\n")
    config = _config_with(tmp_path, '[local]\nusers = ["alice"]\naliases = "aliases"\n')
    assert main(["check-config", "-c", str(config)]) == exitcodes.CONFIG
    err = capsys.readouterr().err
    assert "local.aliases" in err
    assert ":2:" in err or "line 2" in err


def test_check_config_loads_the_tls_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate file that is not PEM makes check-config fail, as twistd would."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = _config_with(
        tmp_path, '[smtp]\ntls_cert_file = "cert.pem"\ntls_key_file = "key.pem"\n'
    )
    assert main(["check-config", "-c", str(config)]) == exitcodes.CONFIG
    assert "smtp.tls_cert_file/tls_key_file" in capsys.readouterr().err


_NOBODY = "is a local address but neither a user nor an alias"


@pytest.mark.parametrize(
    ("relay", "local", "aliases", "complaint"),
    [
        ("", 'users = ["alice"]', None, _NOBODY),  # the default postmaster@h.example.test
        ('postmaster = "bob@h.example.test"\n', 'users = ["alice"]', None, _NOBODY),
        ('postmaster = "Postmaster@[127.0.0.1]"\n', 'users = ["a"]', "a: b@x.test\n", _NOBODY),
        ('postmaster = "alice@h.example.test"\n', 'users = ["alice"]', None, None),  # a user
        ("", 'users = ["alice"]', "PostMaster: alice\n", None),  # an alias, any case
        ("", 'users = ["postmaster"]', None, None),  # a user called postmaster
        ("", "system_users = false\n[local.mailboxes]\npostmaster = 'box'", None, None),
        ('postmaster = "hostmaster@elsewhere.test"\n', "users = []", None, None),  # remote
    ],
)
def test_check_config_insists_that_a_local_postmaster_receives(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    relay: str,
    local: str,
    aliases: str | None,
    complaint: str | None,
) -> None:
    """A local [relay] postmaster that is neither a user nor an alias fails check-config
    (78, saying so); a user, an alias, a mailbox or a remote address passes."""
    if aliases is not None:
        (tmp_path / "aliases").write_text(aliases)
        local += '\naliases = "aliases"'
    config = _config_with(tmp_path, f"{relay}[local]\n{local}\n")
    code = main(["check-config", "-c", str(config)])
    out, err = capsys.readouterr()
    if complaint is None:
        assert (code, err) == (exitcodes.OK, "")
        assert out.startswith("relay: configuration ok:")
    else:
        assert code == exitcodes.CONFIG
        assert "relay.postmaster:" in err and complaint in err


def test_check_config_notes_a_phone_route_outside_relay_domains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A phone route not in relay_domains gets a note (exit 0); one in it gets none."""
    (tmp_path / "secret").write_text("s3cret\n")
    phone = (
        '[phone.sites.site-b]\nsecret_file = "secret"\n'
        '[[route]]\ndomain = "site-b.test"\nchannel = "phone"\nsite = "site-b"\n'
        '[[route]]\ndomain = "*.far.test"\nchannel = "phone"\nsite = "site-b"\n'
    )
    users = '[local]\nusers = ["postmaster"]\n'
    config = _config_with(tmp_path, users + phone)
    assert main(["check-config", "-c", str(config)]) == exitcodes.OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines[:2]] == [
        "relay: note: route 'site-b.test'",
        "relay: note: route '*.far.test'",
    ]
    assert lines[2].startswith("relay: configuration ok:")
    relayed = '[smtp]\nrelay_domains = ["site-b.test", "*.far.test"]\n'
    config.write_text(config.read_text().replace("[local]", relayed + "[local]"))
    assert main(["check-config", "-c", str(config)]) == exitcodes.OK
    assert "relay: note:" not in capsys.readouterr().out

"""Two relays that exchange mail by phone, each a ``twistd relay`` process: a hub and a site.

The hub (``hub-a``, local domain ``example.test``, user alice) answers calls on a
transport; the site (``site-b``, local domain ``site-b.test``, user bob) calls it on
another (the two ends of the line emulator, or a TCP port).  Mail for the other's
domain is routed to the phone channel.  The site calls only when told (``relay call``):
its gathering delay is long, so a test decides when each call happens.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.relay_process import RelayProcess, free_port, start_relay

__all__ = ["PhonePair", "relay_command", "send_mail", "write_hub", "write_site"]

SECRET = "correct horse battery staple"
RELAY = str(Path(sys.executable).parent / "relay")


def _common(directory: Path, hostname: str, domain: str, user: str, port: int) -> str:
    (directory / "mail").mkdir(parents=True, exist_ok=True)
    (directory / "locks").mkdir(exist_ok=True)  # [phone] lock_dir: the UUCP device locks
    return (
        f'[relay]\nhostname = "{hostname}"\nlocal_domains = ["{domain}"]\n'
        f'spool = "spool"\npostmaster = "{user}@{domain}"\n'
        f'[smtp]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\nworkers = 0\n'
        f'[local]\nmail_root = "mail"\nusers = ["{user}"]\n'
    )


def write_hub(
    directory: Path, port: int, answer: str, *, secret: str = SECRET, phone: str = ""
) -> Path:
    """The hub's configuration: answers on ``answer``, site-b.test goes to site-b;
    ``phone`` adds keys to ``[phone]`` (``modem_init``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(secret + "\n")
    config = directory / "relay.toml"
    config.write_text(
        _common(directory, "hub-a.example.test", "example.test", "alice", port)
        + '[[route]]\ndomain = "site-b.test"\nchannel = "phone"\nsite = "site-b"\n'
        + f'[phone]\nname = "hub-a"\nanswer = ["{answer}"]\nlock_dir = "locks"\n{phone}'
        + '[phone.sites.site-b]\nsecret_file = "secret"\ncompression = false\n'
    )
    return config


def write_site(
    directory: Path,
    port: int,
    transport: str,
    *,
    secret: str = SECRET,
    name: str = "site-b",
    phone: str = "",
    site: str = "",
) -> Path:
    """The site's configuration: calls hub-a on ``transport``; example.test goes there;
    ``phone`` adds keys to ``[phone]``, ``site`` to ``[phone.sites.hub-a]`` (a dial
    command and a chat script, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(secret + "\n")
    config = directory / "relay.toml"
    config.write_text(
        _common(directory, "site-b.test", "site-b.test", "bob", port)
        + '[[route]]\ndomain = "example.test"\nchannel = "phone"\nsite = "hub-a"\n'
        + f'[phone]\nname = "{name}"\nlock_dir = "locks"\n{phone}'
        + f'[phone.sites.hub-a]\nsecret_file = "secret"\ntransport = "{transport}"\n'
        + 'gather_delay = "1h"\nmax_call_time = "5m"\ncompression = false\n'
        + site
    )
    return config


def send_mail(port: int, sender: str, recipient: str, text: bytes) -> None:
    """Submit one message by SMTP (smtplib) to the relay on ``port``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, [recipient], text)


def relay_command(
    config: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``relay ARGS --config CONFIG``."""
    return subprocess.run(
        [RELAY, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class PhonePair:
    """The hub and the site, with their SMTP ports and configurations."""

    hub_config: Path
    site_config: Path
    hub_port: int
    site_port: int
    hub: RelayProcess | None = None
    site: RelayProcess | None = None

    @classmethod
    def make(cls, root: Path, hub_answer: str, site_transport: str) -> PhonePair:
        """Write both configurations under ``root`` (``hub``, ``site``)."""
        hub_port, site_port = free_port(), free_port()
        return cls(
            write_hub(root / "hub", hub_port, hub_answer),
            write_site(root / "site", site_port, site_transport),
            hub_port,
            site_port,
        )

    def start_hub(self) -> None:
        """Start the hub relay (it opens its answering line at once)."""
        self.hub = start_relay(self.hub_config, self.hub_port)

    def start_site(self) -> None:
        """Start the site relay."""
        self.site = start_relay(self.site_config, self.site_port)

    def stop_site(self) -> None:
        """Stop the site relay (SIGTERM, as an operator restarting it)."""
        if self.site is not None:
            self.site.stop()
            self.site = None

    def stop(self) -> None:
        """Stop both relays."""
        self.stop_site()
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def call(self) -> subprocess.CompletedProcess[str]:
        """``relay call hub-a`` on the site: one call, to its end."""
        return relay_command(self.site_config, "call", "hub-a", "--json")

"""``twistd relay-slave``: answer calls from phone sites on a serial device, TCP or stdio.

The slave is the relay without its SMTP listeners and without calling out: the spool,
the deliverer and the channels run as in ``twistd relay`` (mail a site brings is stored
and delivered, mail waiting for it leaves in its call), and the phone channel answers on
``--answer`` (or the configuration's ``[phone] answer`` list) call after call.  With
``--answer stdio`` it answers the one call on its standard input and output and exits
(the login shell of a calling site's account; ``relay slave --stdio`` does the same
without twistd).
"""

from __future__ import annotations

import dataclasses

from twisted.application.service import IService
from twisted.python import usage

from relay.config import Config, parse_transport
from relay.tap import build_service, config_for_twistd, local_recipients_for_twistd

__all__ = ["Options", "makeService", "slave_config"]


class Options(usage.Options):
    """Command-line options of ``twistd relay-slave``."""

    synopsis = "[--config FILE] [--answer TRANSPORT]"
    longdesc = (
        "Answer calls from phone sites: on a serial device, a TCP port, or stdin/stdout "
        "(as the login shell of the calling account).  Without --answer, the [phone] "
        "answer list of the configuration is used."
    )
    optParameters = [
        ["config", "c", None, "configuration file (TOML); default: the embedded default"],
        [
            "answer",
            "a",
            None,
            "where to answer: serial:DEVICE[:baudrate=N], tcp:PORT or stdio "
            "(several places through the configuration's [phone] answer list)",
        ],
    ]

    config: Config

    def postOptions(self) -> None:
        """Load and validate the configuration now, so twistd fails before starting."""
        config = config_for_twistd(self["config"])
        try:
            self.config = slave_config(config, self["answer"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def slave_config(config: Config, answer: str | None) -> Config:
    """``config`` for answering only: no SMTP listener, answering on ``answer`` if given."""
    phone = config.phone
    if answer is not None:
        try:
            phone = dataclasses.replace(phone, answer=(parse_transport(answer),))
        except ValueError:
            raise ValueError(f"--answer: not a transport: {answer!r}") from None
    if not phone.answer:
        raise ValueError("nowhere to answer: give --answer or [phone] answer")
    if not phone.sites:
        raise ValueError("no [phone.sites] to answer for")
    smtp = dataclasses.replace(config.smtp, listen=(), listen_tls=(), workers=0)
    return dataclasses.replace(config, phone=phone, smtp=smtp)


def makeService(options: Options) -> IService:
    """The relay, answering calls only."""
    config = options.config
    return build_service(
        config, local_recipients=local_recipients_for_twistd(config), calls_out=False
    )

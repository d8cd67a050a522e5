"""``twistd relay-slave``: answer calls from phone sites on a serial device or stdio.

The options are declared now so that operators' service files can be written against
them; the service itself is built by the phone channel.  Until then the options refuse
with a one-line error instead of starting something that answers nothing.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from relay.config import Config
from relay.tap import config_for_twistd

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command-line options of ``twistd relay-slave``."""

    synopsis = "[--config FILE] [--answer TRANSPORT] [--site NAME]"
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
            "(repeatable through the configuration's [phone] answer list)",
        ],
        ["site", "s", None, "expect this calling site (stdio logins): its secret_file is used"],
    ]

    config: Config

    def postOptions(self) -> None:
        """Load and validate the configuration now, so twistd fails before starting."""
        self.config = config_for_twistd(self["config"])
        if self["answer"] is None and not self.config.phone.answer:
            raise usage.UsageError("nowhere to answer: give --answer or [phone] answer")
        raise usage.UsageError("relay-slave: the phone/slave channel is not in this build yet")


def makeService(options: Options) -> IService:
    """The slave service; postOptions refuses until the phone channel provides it."""
    raise NotImplementedError("relay-slave has no service in this build")

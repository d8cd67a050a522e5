"""The SMTP channel: delivery to the Internet by MX, or to a route's smarthost.

:func:`build_smtp_channel` makes one from a configuration (for :mod:`relay.tap`);
:class:`SmtpChannel` is the ``IChannel``.  See :mod:`relay.channels.smtp.channel`.
"""

from relay.channels.smtp.channel import SmtpChannel, build_smtp_channel
from relay.channels.smtp.protocol import ReplyTimeouts

__all__ = ["ReplyTimeouts", "SmtpChannel", "build_smtp_channel"]

"""The phone channel: mail between this relay and its sites over serial lines and TCP.

:func:`build_phone_channel` makes the channel the deliverer is built with, and
:func:`build_phone` the rest of the parts from ``[phone]``, for :mod:`relay.tap`
(``twistd relay``, and ``twistd relay-slave`` through it). The modules, one job each:
``channel`` (the ``IChannel`` the deliverer sees), ``outbox`` and ``inbox`` (the spool's
side of the link's store, joined in ``store``), ``held`` (the read side of a received
message), ``forgetting`` (dropping the link's remembered ids once no resend can come),
``calls`` (placing and answering calls), ``scheduler`` (when to call), ``calllog`` (the
record of calls) and ``service`` (the wiring).
"""

from relay.channels.phone.channel import PhoneChannel
from relay.channels.phone.service import PhonePart, build_phone, build_phone_channel

__all__ = ["PhoneChannel", "PhonePart", "build_phone", "build_phone_channel"]

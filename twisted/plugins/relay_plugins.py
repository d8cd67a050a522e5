"""twistd plugins of the relay: ServiceMakers that point at ``relay.tap`` modules only."""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.tap",
    "A multi-protocol mail relay: SMTP, local mailboxes and the phone serial link.",
    "relay",
)

relay_slave = ServiceMaker(
    "relay-slave",
    "relay.slave_tap",
    "Answer phone-channel calls from other sites on a serial line, TCP or stdio.",
    "relay-slave",
)

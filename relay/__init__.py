"""relay: a multi-protocol mail relay on Twisted.

Mail enters and leaves through channels (SMTP, local mailboxes, the phone/slave serial
link); one deliverer drives every channel through the MMDF-style contract in
:mod:`relay.interfaces`.
"""

__version__ = "0.1.0"

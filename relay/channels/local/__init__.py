"""The local channel and everything it delivers with, in one place.

* :mod:`.users` — who is local: the users table, ``user+tag`` extensions, the postmaster
  rule, and the test the gateway and the router use for "is this domain ours";
* :mod:`.aliases` — the aliases file: parsing (pure, every problem with its line) and
  expansion of one address into a plan of deliveries;
* :mod:`.channel` — the ``IChannel`` the deliverer drives: one address at a time, the
  plan carried out, one reply per address, retries that skip targets already served;
* :mod:`.targets` — carrying out one planned item: a mailbox or file write in the
  channel's own thread pool, a command, or a new queued message for remote addresses.

The mailbox formats themselves stay in :mod:`relay.mailbox` (Maildir, mbox, the pipe to
a command, the headers added, the user identity to write as): that package is the layer
below the targets, knows nothing of channels, aliases or the queue, and is also what
``relay`` subcommands and tests use to read and write mailboxes on their own.
"""

from relay.channels.local.channel import LocalChannel, LocalSession, build_local_channel

__all__ = ["LocalChannel", "LocalSession", "build_local_channel"]

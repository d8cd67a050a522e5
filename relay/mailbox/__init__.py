"""Writing mail into local mailboxes: Maildir, mbox files and commands.

The modules here do the blocking file work of the local channel
(:mod:`relay.channels.local`), which runs them in a thread pool of its own; none of
them touches the reactor except :mod:`relay.mailbox.pipe`, which spawns commands
through it.  Every failure leaves as a :class:`relay.mailbox.errors.DeliveryError`
carrying the MMDF reply the channel answers with.
"""

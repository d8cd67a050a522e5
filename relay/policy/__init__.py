"""Pure decisions: who may send to whom, where a recipient goes, when to retry, what to tell.

Everything here is a function of its arguments.  Nothing reads the clock, the network or
the disk, and nothing touches the reactor: the deliverer passes ``now`` (and, where chance
plays a part, a ``random.Random``) in.  That keeps the policy testable to the second and
lets the deliverer be the one place where time and I/O meet.

* :mod:`relay.policy.acceptance` — which recipients an intake (SMTP, a phone site) accepts
  from which client (:class:`relay.policy.acceptance.RelayPolicy`).
* :mod:`relay.policy.routing` — recipient → :class:`relay.envelope.Destination`.
* :mod:`relay.policy.retry` — backoff, lifetime, warnings, dead destinations, and what a
  reply means for a recipient (:class:`relay.policy.retry.Disposition`).
* :mod:`relay.policy.dsn` — RFC 3464 delivery status notifications and their envelopes.
"""

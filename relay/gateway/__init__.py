"""The SMTP gateway: the inbound ESMTP server that accepts mail into the spool.

The protocol itself is the sans-I/O engine in :mod:`relay.sansio.smtp`; this package is
its Twisted adapter (:mod:`.protocol`), the listeners (:mod:`.service`), the gateway
worker processes (:mod:`.workers`, :mod:`.worker`), the one builder of all that
(:mod:`.build`, which ``relay.tap`` calls), and the decisions and
I/O the engine leaves out: AUTH credentials (:mod:`.auth`), TLS (:mod:`.tls`) and the
session limits (:mod:`.limits`).  The acceptance rules (:mod:`relay.policy.acceptance`)
and the ``Received:`` header (:mod:`relay.received`) are shared with the phone channel's
inbox and live outside this package.
"""

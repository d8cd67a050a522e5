"""The SMTP gateway: the inbound ESMTP server that accepts mail into the spool.

The protocol itself is the sans-I/O engine in :mod:`relay.sansio.smtp`; this package is
its Twisted adapter (:mod:`.protocol`), the listeners (:mod:`.service`, whose
:func:`~relay.gateway.service.build_gateway` ``relay.tap`` calls), and the decisions and
I/O the engine leaves out: acceptance rules (:mod:`.policy`), AUTH credentials
(:mod:`.auth`), TLS (:mod:`.tls`) and the ``Received:`` header (:mod:`.received`).
"""

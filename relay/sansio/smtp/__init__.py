"""SMTP without I/O: the wire format (:mod:`.wire`), events and the server engine.

:mod:`relay.sansio.smtp.wire` is shared with the SMTP client channel; the server engine
(:mod:`relay.sansio.smtp.server`) is driven by :mod:`relay.gateway.protocol`.
"""

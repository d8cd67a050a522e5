"""Handing accepted mail from gateway worker processes to the process that owns the spool.

See :mod:`relay.gateway.workers` for why there are worker processes at all.
"""

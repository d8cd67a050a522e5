"""Protocol engines without I/O: bytes and events in, bytes and events out.

Nothing in this package imports Twisted, sockets, ``os`` or ``time`` (a test enforces
it): the engines are driven by thin Twisted protocols, and tested by wiring two engines
back to back with byte streams split at every position.  Time, where an engine needs it,
is passed in as a number.
"""

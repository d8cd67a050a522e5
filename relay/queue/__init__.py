"""The spool: accepted mail, durable before it is acknowledged, with per-recipient state.

One job per module (the design is in ``docs/spool.md``):

``record``    framing of the log: keyed headers, checksums, decoding that never raises
``key``       the spool's secret header key (``<spool>/key``) and the upgrade of old spools
``payload``   what MESSAGE, STATUS and DONE records say
``queueid``   unique, arrival-sortable, file-name-safe ids
``layout``    the paths under the spool directory; durable-file helpers
``segment``   the active segment: append + fdatasync, rotate, delete (blocking)
``writer``    group commit: the thread that shares each fdatasync among writers
``state``     the replayed log in memory, and what a segment deletion must copy
``recovery``  start-up replay: torn tails cut, damage quarantined, resynchronised past
``index``     which recipients are due, per destination, with one timer
``reader``    ``IMessage`` / ``ITextReader`` over a text in a segment
``store``     ``SpoolQueue``, the ``IQueue``
``ops``       hold, release and flush as pure functions
``lock``      the spool's owner lock
``protocol``  the control protocol (JSON lines); ``view``: how the queue is shown
``control``   the daemon's control socket; ``client``: the command's side
``offline``   the command's direct path on a stopped spool
``service``   the twistd service that owns the spool
"""

"""One reader per section of the file: a :class:`~relay.config.reader._Table` in, the
section's model object out.

Each ``_read_<section>`` asks its table for every key it knows, falling back on the
section dataclass's field default (:mod:`relay.config.model`) for a key left out, and
checks what involves more than one key (a certificate comes with its key; ``retry_min``
is at most ``retry_max``).  The order the sections are read in is
:func:`relay.config.loading._read_config`'s: ``[phone]`` before ``[[route]]``, whose
phone routes must name a defined site.
"""

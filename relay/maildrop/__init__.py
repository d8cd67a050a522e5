"""The maildrop: how ``relay sendmail`` hands mail to the relay without privileges.

Theory of operation
-------------------
Like Postfix's ``maildrop`` queue (in its world-writable form, before ``postdrop``), a
directory any local user may write to is the only thing the submitting program and the
daemon share, so submission works whether the daemon runs or not and needs no setuid
or setgid bit::

    <maildrop>/              0755, the daemon's
    <maildrop>/drop/         1733: anyone may create files, nobody may list them, and
                             the sticky bit lets only a file's owner (or the daemon, who
                             owns the directory) rename or remove it
    <maildrop>/quarantine/   0700: files the daemon could not take, with a log line each

``relay sendmail`` writes a file under a dot-name (``O_EXCL``, so it never opens
someone else's file), fsyncs it, renames it to its final name and fsyncs the directory:
only then does it exit 0, so a file under a final name is always complete.  The running
relay's pickup service (:mod:`relay.maildrop.pickup`) sees the rename at once (inotify,
or a short poll where there is none), reads the file, checks it
(:mod:`relay.maildrop.dropfile`), stores it in the spool with a ``Received:`` header
naming the uid that owns the file (the kernel's word for who submitted it, not the
file's), and removes it.  A file it cannot take goes to ``quarantine/``; it is never
dropped silently.  Files left while the relay was down are taken when it starts.

One job per module: ``layout`` (the paths and creating them), ``dropfile`` (the file
format, pure), ``compose`` (what sendmail does to a program's text, pure), ``submit``
(writing a file durably), ``pickup`` (the daemon's service).
"""

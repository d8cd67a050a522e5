"""What the relay says of a message the spool took from SMTP, whichever process took it.

The in-process gateway (:mod:`relay.gateway.protocol`) and the spool's end of a gateway
worker's link (:mod:`relay.handoff.spool_side`) both store what a client sent: both
write the same "stored" line once the queue id is known, and both answer a full disk
with 452 rather than 451.  The two live here, beside the spool, so that neither package
imports the other for them.
"""

from __future__ import annotations

import errno

from twisted.logger import Logger

from relay.envelope import Envelope
from relay.oneline import escape

__all__ = ["disk_full", "log_stored"]

# The line keeps the namespace it has always been logged under (log readers filter on it).
_log = Logger(namespace="relay.gateway.protocol")


def log_stored(queue_id: str, envelope: Envelope, size: int) -> None:
    """The log line for a message the spool has taken (where it came from, how big)."""
    # One preformatted field for the text (the observer formats it per event, on the hot
    # path), the same values as separate keys for structured observers.
    sender = escape(envelope.sender_text)  # the client's words: escaped, like the HELO
    submitter = envelope.submitter
    client, protocol = submitter.client_address, submitter.protocol
    helo = None if submitter.helo is None else escape(submitter.helo)
    _log.info(
        "{summary}",
        summary=f"smtp: {queue_id} stored from=<{sender}> nrcpt={len(envelope.recipients)} "
        f"size={size} client={client} helo={helo} proto={protocol}",
        queue_id=queue_id,
        sender=sender,
        client=client,
        helo=helo,
        proto=protocol,
        size=size,
    )


def disk_full(error: BaseException | None) -> bool:
    """Whether a store failure is a full disk (ENOSPC/EDQUOT anywhere in its causes)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False

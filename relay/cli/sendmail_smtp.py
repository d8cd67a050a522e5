"""``sendmail -bs``: an SMTP dialogue on standard input and output, into the maildrop.

Programs that only know how to speak SMTP run ``sendmail -bs`` over a pipe instead of
connecting to port 25, as Postfix allows.  The protocol is the gateway's own sans-I/O
engine (:mod:`relay.sansio.smtp.server`), with a blocking loop around it instead of
Twisted: this process does one dialogue and exits.  No STARTTLS or AUTH (the pipe is
local, and the kernel says who is at the other end); every recipient is accepted here
and routed by the relay, like one given on the command line.  Each message is dropped
(:mod:`relay.maildrop.submit`) before its ``250`` is written; a message that cannot be
made durable gets ``451 4.3.0``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import BinaryIO

from relay.address import Address
from relay.config import Config
from relay.maildrop.compose import assemble, missing_fields, split_header
from relay.maildrop.dropfile import encode_drop_file
from relay.maildrop.layout import MaildropLayout
from relay.maildrop.submit import drop
from relay.sansio.smtp.events import EndOfMessage, Greeting, MailFrom, MessageData, RcptTo, Respond
from relay.sansio.smtp.server import CLOSED, Limits, ServerConnection, ServerSettings
from relay.sansio.smtp.wire import SmtpReply

__all__ = ["serve", "serve_stdio"]

_READ = 65536


def serve_stdio(config: Config) -> int:
    """The dialogue on this process's standard input and output; exit code 0."""
    return serve(config, sys.stdin.buffer, sys.stdout.buffer)


def serve(config: Config, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Run one SMTP dialogue between ``stdin`` and ``stdout`` until QUIT or end of input."""
    hostname = config.relay.hostname
    settings = ServerSettings(
        hostname=hostname,
        limits=Limits(
            max_message_size=config.smtp.max_message_size,
            max_recipients=config.smtp.max_recipients,
            max_errors=config.smtp.max_errors,
        ),
    )
    engine = ServerConnection(settings)
    layout = MaildropLayout(config.relay.maildrop)
    recipients: list[Address] = []
    text = bytearray()

    def write(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    write(engine.send(Greeting()))
    while True:
        event = engine.next_event()
        if event is CLOSED:
            return 0
        if isinstance(event, Respond):
            write(engine.send(event.reply))
        elif isinstance(event, MailFrom):
            recipients.clear()
            text.clear()
            write(engine.send(_ok("2.1.0")))
        elif isinstance(event, RcptTo):
            recipients.append(event.address)
            write(engine.send(_ok("2.1.5")))
        elif isinstance(event, MessageData):
            text += event.data
        elif isinstance(event, EndOfMessage):
            mail = engine.mail
            assert mail is not None
            reply = _store(engine, layout, mail, recipients, bytes(text), hostname)
            text.clear()
            write(engine.send(reply))
        else:  # NEED_DATA (the engine never pauses: every event is answered at once)
            engine.receive_data(os.read(stdin.fileno(), _READ))


def _store(
    engine: ServerConnection,
    layout: MaildropLayout,
    mail: MailFrom,
    recipients: list[Address],
    text: bytes,
    hostname: str,
) -> SmtpReply:
    """Drop one message: 250 once it is durable, 451 if it cannot be."""
    fields, body = split_header(text)
    sender = mail.reverse_path
    fields += missing_fields(
        fields,
        sender=str(sender) if sender is not None else f"MAILER-DAEMON@{hostname}",
        full_name=None,
        hostname=hostname,
        now=time.time(),
    )
    data = encode_drop_file(
        sender,
        list(dict.fromkeys(recipients)),
        assemble(fields, body),
        protocol=engine.protocol_name,
        helo=engine.helo_name,
    )
    try:
        name = drop(layout, data)
    except OSError as e:
        print(f"sendmail: cannot queue the message: {e}", file=sys.stderr)
        return SmtpReply(451, "4.3.0", ("Local error in processing, try again later",))
    return SmtpReply(250, "2.0.0", (f"Ok: queued as {name}",))


def _ok(enhanced: str) -> SmtpReply:
    return SmtpReply(250, enhanced, ("Ok",))

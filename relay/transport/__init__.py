"""Lines for the phone link: serial ports, modems, TCP and stdin/stdout.

This package opens the line a phone call runs over and hands it to the call protocol
(:class:`relay.phone.driver.PhoneProtocol`); it knows nothing of mail.  Its API, all of
it importable from here:

Calling out (the channel's scheduler)::

    endpoint = client_endpoint(reactor, "serial:/dev/ttyS0:baudrate=115200", lock_dir)
    #          or "tcp:host:2600" (any Twisted client string)
    plan = dial_plan(modem_init=["ATZ"], dial="ATDT5551234", chat="ogin: nuucp ssword: \\P",
                     substitutions={"P": b"secret"})      # dial=None, chat=None: direct line
    d = place_call(endpoint, plan, phone_protocol, reactor)
    # d fires with a LineSetup once phone_protocol has the line (setup.rate: the CONNECT
    # rate or None); setup.closed fires when the port is free again.  d fails with
    # CallFailed(reply): reply.code.action says RETRY (BUSY, port locked) or HOST_DEAD
    # (no answer, no carrier, timeout, refused): the caller backs off and retries.

Opening never blocks the reactor (pyserial opens with O_NONBLOCK; TCP is Twisted's);
retrying with backoff is the caller's (``relay.policy.retry`` or ``ClientService``:
:class:`SerialEndpoint` is an ``IStreamClientEndpoint``).

Answering (``twistd relay`` with ``[phone] answer``, ``twistd relay-slave``)::

    service = answering_service(reactor, ["serial:/dev/ttyS1:baudrate=115200", "tcp:2600"],
                                new_call, modem_init=["ATZ"] or None, lock_dir=...)
    # new_call() -> a fresh PhoneProtocol for each call; serial devices are re-opened
    # after every call (SerialAnswerer), TCP ports are Twisted listeners.
    setup = serve_stdio(reactor, phone_protocol)   # relay slave --stdio; stop at setup.closed

Devices are locked UUCP-style while open (:class:`DeviceLock`, ``LCK..ttyS0`` in
``lock_dir``, default ``/var/lock``); a port held by a live process fails the call with
``CallFailed`` (reply ``LOCK``, a retry).  Descriptions are parsed in one place
(:mod:`relay.transport.description`); a bad one raises :class:`TransportError` when
the endpoint is made, so a configuration check can call :func:`check_description`.

Configuration keys this API serves (parsed by :mod:`relay.config`, documented in
``docs/configuration.md``; the names are a proposal the channel follows):

* ``[phone] answer``: list of entries answered call after call: ``serial:...`` (see
  :mod:`relay.transport.description` for its keys) or a Twisted server string
  (``tcp:2600:interface=127.0.0.1``).  → ``answering_service(..., answer, ...)``.
* ``[phone] modem_init``: list of AT commands sent to each serial ``answer`` device
  every time it is opened, each answered ``OK`` (e.g. ``["ATZ", "ATE0 &C1 &D2"]``).
  Absent: the answer devices are direct lines (null modem), no modem talk at all.
  Keep ``S0=0``: the relay answers ``RING`` itself with ``ATA``.  ``&D2`` makes the
  modem hang up when DTR drops, ``&C1`` makes DCD follow the carrier (then write
  ``carrier=yes`` in the entry).  → ``modem_init=``.
* ``[phone] lock_dir``: where ``LCK..`` files go (default ``/var/lock``).  → ``lock_dir=``.
* ``[phone.sites.NAME] transport``: ``serial:...`` or a Twisted client string
  (``tcp:host:port``).  → ``client_endpoint``.
* ``[phone.sites.NAME] dial``: absent on a direct line or TCP.  An AT dial command sent
  as is (``ATDT5551234``, ``ATDP...``), or a bare number (``5551234``, ``9,555-1234``)
  that gets ``ATDT`` in front.  The modem's answer decides the call: ``CONNECT [rate]``
  goes on; ``BUSY`` is AGN (retry, the site is not marked down); ``NO CARRIER`` and
  ``NO ANSWER`` are DHST and silence is TIME (the site is marked down and backed off);
  ``NO DIALTONE`` is NIO; ``ERROR`` (a bad init or dial command) is LIO.
* ``[phone.sites.NAME] modem_init``: AT commands sent before dialling, each answered
  ``OK`` (default ``["ATZ"]``; only with ``dial``).
* ``[phone.sites.NAME] dial_timeout``: a duration, how long the modem may take to
  answer the dial command (default ``60s``).
* ``[phone.sites.NAME] chat``: a UUCP chat script run after ``CONNECT`` (or at once on a
  direct line or TCP) to log in at the far end, e.g. ``ogin:--ogin: nuucp ssword: \\P``.
  Expect/send pairs separated by white space; ``""`` expects nothing;
  ``expect-send-expect`` alternates; escapes ``\\r \\n \\s \\t \\b \\N \\\\ \\- \\ddd
  \\xhh``, in sends also ``\\c`` (no final CR), ``\\d`` (1 s), ``\\p`` (0.25 s), ``\\K``
  and ``BREAK`` (a break), ``EOT``; ``\\D``/``\\T`` are the dial number, ``\\L`` and
  ``\\P`` the values of ``chat_login`` and of ``chat_password_file``'s first line.
  Matching ignores parity.  Refused with a clear error: an unknown escape, UUCP's port
  escapes (``\\E \\e \\M \\m \\H``), ``\\L``/``\\P`` without a value.
* ``[phone.sites.NAME] chat_timeout``: seconds for each expect (default ``10s``).

Modules: ``description`` (parsing), ``lock`` (device locks), ``serial`` (the locked
port, its endpoint, carrier watch), ``setup`` (modem, login chat, hand-over, hang-up),
``answer`` (answering loops), ``endpoints`` (descriptions to endpoints).  The engines
are sans-I/O in :mod:`relay.sansio.chat` and :mod:`relay.sansio.modem`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from relay.sansio.chat import ChatError, parse_chat
from relay.sansio.modem import DIAL_TIMEOUT, dial_script, hangup_script
from relay.transport.answer import (
    CallFactory,
    SerialAnswerer,
    answer_factory,
    answer_plan,
    answering_service,
    serve_stdio,
)
from relay.transport.description import (
    SerialSettings,
    TransportError,
    is_serial,
    is_stdio,
    parse_serial,
)
from relay.transport.endpoints import client_endpoint, server_endpoint
from relay.transport.lock import DEFAULT_LOCK_DIR, DeviceLock, DeviceLocked, DeviceLockError
from relay.transport.serial import CarrierLost, LockedSerialPort, SerialEndpoint, open_serial
from relay.transport.setup import CallFailed, LinePlan, LineSetup, place_call

__all__ = [
    "DEFAULT_LOCK_DIR",
    "CallFactory",
    "CallFailed",
    "CarrierLost",
    "ChatError",
    "DeviceLock",
    "DeviceLockError",
    "DeviceLocked",
    "LinePlan",
    "LineSetup",
    "LockedSerialPort",
    "SerialAnswerer",
    "SerialEndpoint",
    "SerialSettings",
    "TransportError",
    "answer_factory",
    "answer_plan",
    "answering_service",
    "check_description",
    "client_endpoint",
    "dial_plan",
    "is_serial",
    "is_stdio",
    "open_serial",
    "parse_serial",
    "place_call",
    "serve_stdio",
    "server_endpoint",
]


_DIALLED = re.compile(r"^ATD[TP]?", re.IGNORECASE)  # the rest is the number (\D, \T)


def dial_plan(
    *,
    modem_init: Sequence[str] = ("ATZ",),
    dial: str | None = None,
    chat: str | None = None,
    substitutions: Mapping[str, bytes] | None = None,
    dial_timeout: float = DIAL_TIMEOUT,
    chat_timeout: float | None = None,
) -> LinePlan:
    """The caller's plan for a site: modem dialling if ``dial`` is set, then ``chat``.

    ``dial``: ``ATDT5551234`` (sent as is) or a bare number (``ATDT`` put in front);
    None on a direct line or TCP.  ``modem_init``: AT commands sent first, each
    answered OK.  ``chat``: a UUCP chat script for the far end's login (``\\D``/``\\T``
    in it are the number; ``substitutions`` may give ``L`` and ``P``).  Raises
    :class:`ChatError` for a script or number that cannot be used.  ``dial_timeout``:
    seconds for the modem's result code after the dial command; ``chat_timeout``:
    seconds for each expect of the login chat (default 10, as UUCP's)."""
    subs = dict(substitutions or {})
    if dial is not None and "D" not in subs:
        subs["D"] = _DIALLED.sub("", dial).encode("ascii", "replace")
    login = parse_chat(chat, subs, timeout=chat_timeout) if chat else None
    if dial is None:
        return LinePlan(None, login)
    modem = dial_script(modem_init, dial, dial_timeout=dial_timeout)
    return LinePlan.for_modem(modem, login, hangup_script())


def check_description(description: str) -> None:
    """Raise :class:`TransportError` if a transport or answer entry cannot be used."""
    if is_serial(description):
        parse_serial(description)
    elif not is_stdio(description) and ":" not in description:
        raise TransportError(f"not a transport description: {description!r}")

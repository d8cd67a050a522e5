"""smtplib clients guessing a password all at once: the failed-AUTH limit's real test."""

from __future__ import annotations

import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["guess_in_parallel"]


def guess_in_parallel(
    port: int, sessions: int, user: str = "carol", source: str = "127.0.0.1"
) -> list[int]:
    """``sessions`` clients from ``source`` (a loopback address) to 127.0.0.1:``port``,
    each sending one AUTH PLAIN for ``user`` with a wrong password at the same moment;
    the reply code each got.

    Blocking: run it in a thread when the relay under test shares this reactor.
    """
    ready = threading.Barrier(sessions)

    def guess(number: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=120, source_address=(source, 0)) as client:
            client.ehlo("client.test")
            client.user, client.password = user, f"guess {number}"
            ready.wait(timeout=120)
            try:  # AUTH PLAIN once (login() would try LOGIN after a failure too)
                client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
            return 235

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        return list(pool.map(guess, range(sessions)))

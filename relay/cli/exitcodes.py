"""Exit codes of the ``relay`` command, from sysexits.h (the values every MTA tool uses)."""

from __future__ import annotations

import os

OK = os.EX_OK  # 0
USAGE = os.EX_USAGE  # 64: bad command line
DATAERR = os.EX_DATAERR  # 65: bad input data
NOINPUT = os.EX_NOINPUT  # 66: an input file is missing
NOUSER = os.EX_NOUSER  # 67: no such user
NOHOST = os.EX_NOHOST  # 68: no such host
UNAVAILABLE = os.EX_UNAVAILABLE  # 69: service unavailable
SOFTWARE = os.EX_SOFTWARE  # 70: internal error
OSERR = os.EX_OSERR  # 71: system error
CANTCREAT = os.EX_CANTCREAT  # 73: cannot create an output file
IOERR = os.EX_IOERR  # 74: input/output error
TEMPFAIL = os.EX_TEMPFAIL  # 75: try again later
NOPERM = os.EX_NOPERM  # 77: permission denied
CONFIG = os.EX_CONFIG  # 78: configuration error

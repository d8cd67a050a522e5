"""``[relay]``: who this relay is and where it keeps its queue."""

from __future__ import annotations

from relay.config.model import RelaySection, field_default
from relay.config.reader import _Paths, _Table
from relay.config.values import _address, _domain


def _read_relay(t: _Table, paths: _Paths) -> RelaySection:
    hostname = t.require("hostname", _domain, "localhost")
    local_domains = t.get_list("local_domains", _domain, (hostname,), "domain names", unique=True)
    spool = t.get("spool", paths.path, paths.base / field_default(RelaySection, "spool"))
    postmaster = t.get("postmaster", _address, None)
    if postmaster is None:
        postmaster = f"postmaster@{(local_domains or (hostname,))[0]}"
    maildrop = t.get("maildrop", paths.path, paths.base / field_default(RelaySection, "maildrop"))
    return RelaySection(hostname, local_domains, postmaster, spool, maildrop)

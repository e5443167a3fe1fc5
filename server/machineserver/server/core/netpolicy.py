"""Where the server may listen: loopback unless the config says more.

Three listeners follow the same rule: the gRPC port (``listen``: beyond loopback only with
authentication and TLS, or ``--insecure``), the metrics port (``metrics_listen``: beyond
loopback only with ``metrics_allow_nonloopback`` or ``--insecure``: /metrics has neither)
and each session's GDB bridge (``StartGdbServer.bind_address``: beyond loopback only on
the addresses ``gdb_bridge_bind_allow`` lists; RSP has no authentication, so whoever
reaches a bridge acts as the identity that started it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def listen_host(listen: str) -> str:
    """The host part of a gRPC listen address ("host:port", "[::1]:port"); "unix:..."
    (a socket file: local by nature) gives "unix"."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return "unix"
    host, _, _ = listen.rpartition(":")
    return host.strip("[]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, from a listen address) reaches this host
    only: 127.0.0.0/8, ::1, "localhost", a unix socket. A wildcard is not."""
    if host in ("unix",) or host.lower() in LOOPBACK_NAMES:
        return True
    if host in WILDCARDS:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def bind_allowed(host: str, allow: Sequence[str]) -> bool:
    """Whether a listener may bind ``host``: loopback always; otherwise an address inside
    one of the ``allow`` networks ("10.0.0.0/8", "192.168.1.5"); the wildcards 0.0.0.0 and
    :: only when listed as such ("0.0.0.0", "::", or "any" for every address)."""
    if is_loopback(host):
        return True
    if "any" in allow:
        return True
    if host in WILDCARDS:
        return host in allow or (host in ("", "*") and "0.0.0.0" in allow)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in allow:
        if entry in WILDCARDS:
            continue
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_networks(entries: Sequence[str], setting: str) -> tuple[str, ...]:
    """A configured allow list, checked: each an address, a network, a wildcard or "any"."""
    for entry in entries:
        if entry == "any" or entry in WILDCARDS:
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{setting}: {entry!r} is not an address, a network (10.0.0.0/8), "
                             "0.0.0.0, :: or any") from None
    return tuple(entries)

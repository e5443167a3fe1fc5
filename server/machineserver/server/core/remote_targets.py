"""Which endpoints a gdbremote session may reach: the server's ``gdbremote_allow``
patterns (fnmatch) over an endpoint's normal form, ``tcp:HOST:PORT``, ``unix:/path`` or
``serial:/dev/x``. The server never connects to, or opens, what a client names unless the
configuration allows it: by default TCP to this host only."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from machineserver.server.core.errors import InvalidArgument

DEFAULT_REMOTE_ALLOW: tuple[str, ...] = ("tcp:127.0.0.1:*", "tcp:localhost:*", "tcp:[::1]:*")
MAX_ENDPOINT = 512


def normal_form(text: str, field: str, *, console: bool = False) -> str:
    """``HOST:PORT`` -> ``tcp:HOST:PORT``; ``unix:/p``; ``serial:/dev/x`` (console only);
    INVALID_ARGUMENT naming ``field`` for anything else."""
    text = text.strip()
    if not text or len(text) > MAX_ENDPOINT or any(c in text for c in "\n\r\x00"):
        raise InvalidArgument(field, "an endpoint: HOST:PORT, unix:/path" + (", serial:/dev/x" if console else ""))
    kind, sep, rest = text.partition(":")
    if sep and kind in ("unix", "serial"):
        if kind == "serial" and not console:
            raise InvalidArgument(field, "a serial device is a console endpoint, not a GDB server address")
        if not rest.startswith("/"):
            raise InvalidArgument(field, f"{kind}: needs an absolute path")
        return f"{kind}:{rest}"
    if sep and kind == "tcp":
        text = rest
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(field, f"{text!r} is not HOST:PORT (a TCP port 1..65535)")
    return f"tcp:{host}:{int(port)}"


def check_allowed(endpoint: str, allow: Sequence[str], field: str) -> None:
    if not any(fnmatch.fnmatchcase(endpoint, pattern) for pattern in allow):
        raise InvalidArgument(field, f"{endpoint} is not allowed by this server's gdbremote_allow "
                              f"({', '.join(allow) or 'nothing'}); an administrator can allow it")

"""The GDB remote serial protocol (RSP), once for the whole server: ``codec`` (framing,
escaping, run-length coding, the packet reader, stop replies) for both ends, and
``client`` (an asyncio client for a gdbstub, as a state machine).

A leaf package: it imports nothing from the rest of the server, so the core (the GDB
bridge) and the drivers (QEMU's gdbstub, other GDB targets) can both use it.
"""

from machineserver.server.rsp.client import (
    RspClient,
    RspClosed,
    RspError,
    RspProtocol,
    RspProtocolError,
    RspStateError,
    RspTimeout,
    State,
)
from machineserver.server.rsp.codec import CodecError, StopReply

__all__ = [
    "CodecError",
    "RspClient",
    "RspClosed",
    "RspError",
    "RspProtocol",
    "RspProtocolError",
    "RspStateError",
    "RspTimeout",
    "State",
    "StopReply",
]

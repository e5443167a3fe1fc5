"""The worker protocol's one codec: messages between the server and a worker process.

A frame is a 4-byte little-endian length and a pickle (protocol 5) of one message tuple.
Both ends are processes of ours (the server starts its workers and hands them one end of a
socket pair), so pickle is safe here; it is never used on anything a client sends. Messages
carry only the driver interface's plain data (drivers/base.py: dataclasses, enums, ints,
bytes, dicts), which is what lets a worker later run as a Ray actor unchanged.

Server -> worker::

    ("create", rid, mid, backend, board, options)      a machine, OFF; answers its Traits
    ("call", rid, mid, interface, method, args, kwargs)  interface "" is the lifecycle
    ("drop", rid, mid)                                 forget a powered-off machine
    ("cancel", rid)                                    cancel a call in progress

Worker -> server::

    ("ok", rid, result, status)                        status: see Status
    ("err", rid, error, status)                        error: encode_error()
    ("event", mid, kind, payload, status)              kind: console | stopped | failed
    ("status", [(mid, status), ...])                   running machines, periodically
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from machineserver.server.drivers import base as drv

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # snapshots and coverage tables are the big ones; limits are enforced above


class WireError(Exception):
    """A frame that cannot be read: the peer is not a worker of ours, or it broke."""


# a machine's synchronous view: state, counters, and its host footprint (process ids,
# thread ids): sent with every answer and event, and pushed while it runs
Status = tuple[drv.MachineState, drv.Counters, tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Traits:
    """What a remote machine's parts say about themselves without a round trip (the
    synchronous attributes of the driver interface)."""

    capabilities: tuple[str, ...]  # interface names the machine provides
    register_names: tuple[str, ...]
    memory_while_running: bool
    coverage_method: str
    coverage_exact: bool
    worker_pid: int


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=5)
    if len(body) > MAX_FRAME:
        raise WireError(f"message of {len(body)} bytes is over the frame limit of {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message; None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("the stream ended inside a frame header") from None
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes is over the limit")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise WireError("the stream ended inside a frame") from None
    message = pickle.loads(body)
    if not isinstance(message, tuple) or not message:
        raise WireError("a frame that is not a message")
    return message


# --------------------------------------------------------------------------- errors

_ERRORS: dict[str, type[drv.DriverError]] = {
    cls.__name__: cls
    for cls in (drv.BadImage, drv.BadRequest, drv.WrongState, drv.NotSupported, drv.BackendFailed, drv.DriverError)
}
EncodedError = tuple[str, str, dict[str, str]]
CANCELLED: EncodedError = ("CancelledError", "the call was cancelled", {})


def encode_error(exc: BaseException) -> EncodedError:
    """A driver error as plain data (exceptions with keyword fields do not pickle whole).
    Anything that is not a DriverError is a driver bug: it travels as BackendFailed."""
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    if isinstance(exc, drv.DriverError):
        fields: dict[str, str] = {}
        if isinstance(exc, drv.BadRequest):
            fields["field"] = exc.field
        elif isinstance(exc, drv.WrongState):
            fields["state"], fields["required"] = exc.state, exc.required
        return type(exc).__name__, str(exc), fields
    return "BackendFailed", f"the driver failed unexpectedly: {exc!r}", {}


def decode_error(data: EncodedError) -> BaseException:
    name, message, fields = data
    if name == CANCELLED[0]:
        return asyncio.CancelledError(message)
    cls = _ERRORS.get(name, drv.BackendFailed)
    if cls is drv.BadRequest:
        return drv.BadRequest(message, field=fields.get("field", ""))
    if cls is drv.WrongState:
        return drv.WrongState(message, state=fields.get("state", ""), required=fields.get("required", ""))
    return cls(message)

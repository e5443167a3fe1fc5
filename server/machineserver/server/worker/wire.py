"""The worker protocol's one codec: messages between the server and a worker process.

A frame is a 4-byte little-endian length and a pickle (protocol 5) of one message tuple.
Both ends are processes of ours (the server starts its workers and hands them one end of a
socket pair), so pickle is safe here; it is never used on anything a client sends. Messages
carry only the driver interface's plain data (drivers/base.py: dataclasses, enums, ints,
bytes, dicts), which is what lets a worker later run as a Ray actor unchanged.

Server -> worker::

    ("create", rid, mid, backend, board, options)      a machine, powered on; answers its Traits
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
from collections.abc import Callable
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
    lacking: tuple[tuple[str, str], ...] = ()  # (interface name, why the machine lacks it)
    details: tuple[tuple[str, str], ...] = ()  # Machine.details()


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=5)
    if len(body) > MAX_FRAME:
        raise WireError(f"message of {len(body)} bytes is over the frame limit of {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


class FrameProtocol(asyncio.Protocol):
    """Frames in, messages out, with no task in between: each complete frame is decoded
    and handed to ``on_message`` from the transport's own callback (a loop turn less per
    message than a reader task). ``on_lost(reason)`` once when the stream ends or breaks."""

    def __init__(self, on_message: Callable[[tuple[Any, ...]], None], on_lost: Callable[[str], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        try:
            while len(buf) - start >= HEADER.size:
                (size,) = HEADER.unpack_from(buf, start)
                if size > MAX_FRAME:
                    raise WireError(f"frame of {size} bytes is over the limit")
                end = start + HEADER.size + size
                if len(buf) < end:
                    break
                with memoryview(buf) as view, view[start + HEADER.size:end] as frame:
                    message = pickle.loads(frame)
                start = end
                if not isinstance(message, tuple) or not message:
                    raise WireError("a frame that is not a message")
                self._on_message(message)
        except (WireError, pickle.UnpicklingError, ValueError, EOFError) as exc:
            self._lose(f"a broken frame ({exc})")
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"({exc})" if exc else "")

    def _lose(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            self._on_lost(reason)

    def send(self, message: tuple[Any, ...]) -> None:
        if self.transport is None or self.transport.is_closing():
            raise OSError("the connection is closed")
        self.transport.write(encode(message))


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

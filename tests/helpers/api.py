"""The common path through the SDK: uploading test firmware, reading a console, and
waiting for something the server signals (a session state, an alert, executed
instructions) by reading the stream that says so, never by sleeping.

StreamSessionEvents and StreamAlerts send a first message (``subscribed``) once the
subscription is in place, with the state as it is then: ``session_events`` and
``alert_stream`` read it before handing the stream over, so whatever the test does next
is seen by the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as spb
from machineserver.v1 import telemetry_pb2 as tpb
from tests.helpers.firmware import firmware


async def until(condition: Callable[[], object], timeout: float = 10, poll: float = 0.01, *,
                what: str = "") -> None:
    """Poll a condition the server signals nowhere (a subscriber count, a finished span,
    a process reaped) until it holds; fails after ``timeout`` seconds, saying ``what``
    was awaited. For anything a stream tells (a session's state, an alert, console
    output), read the stream instead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what or 'the condition'}: still not true after {timeout} s")
        await asyncio.sleep(poll)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


async def upload(client: AsyncClient, board: str, program: str, ext: str = "elf") -> str:
    """Upload a test firmware image; its program name."""
    fmt = "bin" if ext == "bin" else ""
    return str((await client.upload_program(firmware(board, program, ext), format=fmt)).program.name)


async def console_until(client: AsyncClient, session: str, needle: bytes, timeout: float = 20) -> bytes:
    """Follow the console from offset 0 until ``needle`` shows; everything read."""
    out = b""

    async def read() -> None:
        nonlocal out
        async with contextlib.aclosing(client.console(session)) as chunks:
            async for data in chunks:
                out += data
                if needle in out:
                    return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"{session}: console never showed {needle!r} in {timeout} s; got {out!r}") from None
    return out


async def console_text(client: AsyncClient, session: str, offset: int = 0) -> bytes:
    """Everything the console holds from offset (no following)."""
    msgs = [m async for m in client.sessions.stream_console(name=session, offset=offset, follow=False)]
    return b"".join(m.data for m in msgs)


@dataclass
class Subscribed:
    """An event or alert stream whose first (``subscribed``) message was read."""

    first: Any  # SessionEventsSubscribed or AlertsSubscribed
    stream: AsyncIterator[Any]

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.stream

    async def next(self, timeout: float = 20) -> Any:
        try:
            return await asyncio.wait_for(anext(self.stream), timeout)
        except TimeoutError:
            raise AssertionError(f"no message in {timeout} s") from None


@contextlib.asynccontextmanager
async def _subscribed(stream: AsyncGenerator[Any, None], timeout: float) -> AsyncIterator[Subscribed]:
    async with contextlib.aclosing(stream):
        try:
            first = await asyncio.wait_for(anext(stream), timeout)
        except TimeoutError:
            raise AssertionError(f"the stream sent no first message in {timeout} s") from None
        assert first.HasField("subscribed"), f"the first message is not `subscribed`: {first}"
        yield Subscribed(first.subscribed, stream)


def session_events(client: AsyncClient, session: str = "", timeout: float = 20) -> contextlib.AbstractAsyncContextManager[Subscribed]:
    """``async with session_events(client, name) as events``: subscribed (events.first
    holds the sessions as they were), then ``async for ev in events``."""
    return _subscribed(client.sessions.stream_session_events(name=session), timeout)  # type: ignore[arg-type]


def alert_stream(client: AsyncClient, timeout: float = 20) -> contextlib.AbstractAsyncContextManager[Subscribed]:
    """``async with alert_stream(client) as alerts``: subscribed (alerts.first.firing
    lists what fires now), then ``async for alert in alerts``."""
    return _subscribed(client.telemetry.stream_alerts(), timeout)  # type: ignore[arg-type]


async def wait_state(client: AsyncClient, session: str, state: int, timeout: float = 20, *,
                     label: str = "") -> spb.Session:
    """The session once it is in ``state``: from the event stream's first message if it is
    there already, else at the event that says so (then read back with GetSession)."""

    async def watch() -> spb.Session:
        async with session_events(client, session, timeout) as events:
            if events.first.sessions[0].state == state:
                return events.first.sessions[0]  # type: ignore[no-any-return]
            async for ev in events:
                if ev.state == state:
                    return (await client.sessions.get_session(name=session)).session
        raise AssertionError(f"{session} was deleted while waiting for {cpb.SessionState.Name(state)}")  # type: ignore[arg-type]

    try:
        return await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        s = (await client.sessions.get_session(name=session)).session
        raise AssertionError(
            f"{label + ': ' if label else ''}{session} stayed {cpb.SessionState.Name(s.state)} ({s.state_reason}), "
            f"wanted {cpb.SessionState.Name(state)}") from None  # type: ignore[arg-type]


async def wait_progress(client: AsyncClient, session: str, virtual_ns: int = 1_000_000,
                        timeout: float = 20) -> tpb.SessionMetrics:
    """The session's metrics once its virtual time moved ``virtual_ns`` past where it was
    at the call (read from StreamSessionMetrics every 10 ms): a running firmware really
    ran for a while, not only was told to. Virtual time moves on every backend (QEMU
    without icount counts no instructions)."""

    async def watch() -> tpb.SessionMetrics:
        base: int | None = None
        stream = client.telemetry.stream_session_metrics(name=session, interval=duration(0.01))
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for msg in stream:
                if base is None:
                    base = msg.metrics.virtual_time_ns
                elif msg.metrics.virtual_time_ns >= base + virtual_ns:
                    return msg.metrics
        raise AssertionError(f"{session}: the metrics stream ended")

    try:
        return await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise AssertionError(f"{session} did not run {virtual_ns} ns of virtual time in {timeout} s") from None


def bad_request_field(exc: aio.AioRpcError) -> str:
    """The field a BadRequest detail of an INVALID_ARGUMENT names."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                br = error_details_pb2.BadRequest()
                if detail.Unpack(br):
                    return str(br.field_violations[0].field)
    raise AssertionError(f"no BadRequest in {exc!r}")

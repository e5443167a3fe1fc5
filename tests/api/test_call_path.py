"""One command path: unary RPCs, each command on an Attach stream and each target-touching
packet on a GDB bridge pass through the same hook chain (request ids, metrics, and the
auth that plugs in there), named after the RPC with the same effect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.app import RunningServer
from machineserver.server.config import ServerConfig
from machineserver.server.core.calls import CallInfo, Transport
from machineserver.server.core.errors import FailedPrecondition
from machineserver.server.rsp.client import RspClient
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.api import upload
from tests.helpers.server import serving

DEBUG = "/machineserver.v1.DebugService/"


class Recorder:
    """A hook that records every call it sees, and refuses or breaks chosen methods."""

    def __init__(self) -> None:
        self.calls: list[CallInfo] = []
        self.refuse: set[str] = set()
        self.crash: set[str] = set()

    async def before(self, call: CallInfo) -> None:
        if call.rpc in self.refuse:
            raise FailedPrecondition(f"{call.rpc} refused by the test hook")
        if call.rpc in self.crash:
            raise RuntimeError("a bug in a hook")

    def after(self, call: CallInfo) -> None:
        self.calls.append(call)

    def seen(self, transport: Transport) -> list[tuple[str, str]]:
        return [(c.rpc, c.code) for c in self.calls if c.transport is transport]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def hooked(tmp_path: Path, recorder: Recorder) -> AsyncIterator[tuple[RunningServer, AsyncClient]]:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", log_level="warning")
    async with serving(config, hooks=[recorder]) as pair:
        yield pair


async def _halted_at_main(client: AsyncClient) -> str:
    prog = await upload(client, "mps2-an385", "hello")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    await client.debug.set_breakpoint(name=s.name, location={"symbol": "main"})
    await client.debug.continue_(name=s.name, wait=True)
    return str(s.name)


async def _attach(client: AsyncClient, name: str, *commands: dpb.DebugCommand,
                  request_id: str = "") -> dict[int, dpb.DebugCommandResult]:
    async def requests() -> AsyncIterator[dpb.AttachRequest]:
        yield dpb.AttachRequest(open=dpb.AttachOpen(name=name, control=True))
        for cmd in commands:
            yield dpb.AttachRequest(command=cmd)

    metadata = (("x-request-id", request_id),) if request_id else ()
    return {m.result.tag: m.result async for m in client.debug.attach(requests(), metadata=metadata)
            if m.HasField("result")}


async def test_attach_commands_are_calls_of_their_own(hooked: tuple[RunningServer, AsyncClient],
                                                      recorder: Recorder) -> None:
    _, client = hooked
    name = await _halted_at_main(client)
    recorder.calls.clear()
    results = await _attach(
        client, name,
        dpb.DebugCommand(tag=1, read_registers=dpb.ReadRegistersRequest(names=["pc"])),
        dpb.DebugCommand(tag=2, step=dpb.StepRequest(count=1)),
        dpb.DebugCommand(tag=3, read_memory=dpb.ReadMemoryRequest(address=0x2000_0000, size=0)),
        request_id="stream-7",
    )
    assert [results[t].code for t in (1, 2, 3)] == [0, 0, 3]
    assert [results[t].request_id for t in (1, 2, 3)] == ["stream-7.1", "stream-7.2", "stream-7.3"]
    assert recorder.seen(Transport.ATTACH) == [
        ("ReadRegisters", "OK"), ("Step", "OK"), ("ReadMemory", "INVALID_ARGUMENT")]
    # the stream itself is one RPC too
    assert ("Attach", "OK") in recorder.seen(Transport.RPC)


async def test_a_hook_refuses_attach_commands_like_rpcs(hooked: tuple[RunningServer, AsyncClient],
                                                        recorder: Recorder) -> None:
    _, client = hooked
    name = await _halted_at_main(client)
    recorder.refuse.add("WriteMemory")
    with pytest.raises(errors.FailedPrecondition):
        await client.debug.write_memory(name=name, address=0x2000_0000, data=b"x")
    results = await _attach(
        client, name,
        dpb.DebugCommand(tag=1, write_memory=dpb.WriteMemoryRequest(address=0x2000_0000, data=b"x")),
        dpb.DebugCommand(tag=2, read_memory=dpb.ReadMemoryRequest(address=0x2000_0000, size=1)))
    assert results[1].code == 9 and "refused by the test hook" in results[1].message
    assert results[2].code == 0  # the stream goes on


async def test_an_unexpected_error_answers_that_command_with_internal(
        hooked: tuple[RunningServer, AsyncClient], recorder: Recorder) -> None:
    _, client = hooked
    name = await _halted_at_main(client)
    recorder.crash.add("Backtrace")
    results = await _attach(
        client, name,
        dpb.DebugCommand(tag=1, backtrace=dpb.BacktraceRequest()),
        dpb.DebugCommand(tag=2, read_registers=dpb.ReadRegistersRequest(names=["pc"])),
        request_id="crashy")
    assert results[1].code == 13  # INTERNAL, on that command
    assert results[1].request_id == "crashy.1" and "crashy.1" in results[1].message
    assert "bug in a hook" not in results[1].message  # no internals leak
    assert results[2].code == 0  # and the stream went on
    assert ("Backtrace", "INTERNAL") in recorder.seen(Transport.ATTACH)


async def test_gdb_packets_go_through_the_chain(hooked: tuple[RunningServer, AsyncClient],
                                               recorder: Recorder) -> None:
    _, client = hooked
    name = await _halted_at_main(client)
    port = (await client.debug.start_gdb_server(name=name)).gdb_server.port
    recorder.calls.clear()
    rsp = await RspClient.connect_tcp("127.0.0.1", port, xml_registers="arm")
    try:
        assert len(await rsp.read_memory(0x2000_0000, 8)) == 8
        await rsp.read_all_registers()
        await rsp.insert_point(0, 0x2000_0000 + 0x100, 2)
        await rsp.remove_point(0, 0x2000_0000 + 0x100, 2)
        seen = recorder.seen(Transport.GDB)
        # the connection itself is an event the hooks see after the fact (the audit log's gdb/connect)
        assert seen == [("connect", "OK"), ("ReadMemory", "OK"), ("ReadRegisters", "OK"),
                        ("SetBreakpoint", "OK"), ("ClearBreakpoint", "OK")]
        assert all(c.request_id for c in recorder.calls)
        # a refusing hook refuses the packet as it refuses the RPC: gdb gets an error reply
        recorder.refuse.add("WriteMemory")
        with pytest.raises(Exception) as exc:
            await rsp.write_memory(0x2000_0000, b"\x01\x02")
        assert "E01" in str(exc.value)
        assert recorder.seen(Transport.GDB)[-1] == ("WriteMemory", "FAILED_PRECONDITION")
        assert (await client.debug.read_memory(name=name, address=0x2000_0000, size=2)).data != b"\x01\x02"
    finally:
        await rsp.close()


async def test_a_cancelled_stream_counts_as_cancelled(hooked: tuple[RunningServer, AsyncClient],
                                                      recorder: Recorder) -> None:
    _, client = hooked
    prog = await upload(client, "mps2-an385", "echo")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, run=True)).session
    stream = client.sessions.stream_console(name=s.name, follow=True)
    await stream.__anext__()  # "echo ready"
    await stream.aclose()  # the client goes away mid-stream

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while ("StreamConsole", "CANCELLED") not in recorder.seen(Transport.RPC):
        assert loop.time() < deadline, recorder.seen(Transport.RPC)
        await asyncio.sleep(0.01)
    assert ("StreamConsole", "OK") not in recorder.seen(Transport.RPC)

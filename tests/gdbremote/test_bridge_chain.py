"""A gdbremote session driving a Unicorn session of ANOTHER MachineServer through that
server's GDB bridge (StartGdbServer there; the gdbremote session names 127.0.0.1:PORT):
load, break, continue, registers, memory, step; and what happens to the other server's
session (a halt there, the firmware's exit) is seen here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.config import ServerConfig
from machineserver.v1 import common_pb2 as cpb
from tests.helpers import api
from tests.helpers.firmware import elf_symbol
from tests.helpers.server import serving

BOARD = "mps2-an385"


@pytest.fixture
async def other(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """A second server in this process, with its own data dir."""
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "other", log_level="warning")
    async with serving(config) as (_, client):
        yield client


async def bridged(other: AsyncClient, client: AsyncClient, program: str) -> tuple[str, str]:
    """(the Unicorn session on the other server, the gdbremote session here driving it)."""
    prog = await api.upload(other, BOARD, program)
    there = (await other.sessions.create_session(board_template=BOARD, program=prog, backend="unicorn",
                                                 power_on=True)).session.name
    port = (await other.debug.start_gdb_server(name=there)).gdb_server.port
    here_prog = await api.upload(client, BOARD, program)
    here = (await client.sessions.create_session(
        board_template=BOARD, program=here_prog, backend="gdbremote", power_on=True,
        options={"remote": {"address": f"127.0.0.1:{port}"}})).session
    assert here.state == cpb.SESSION_STATE_HALTED
    return str(there), str(here.name)


async def registers(client: AsyncClient, name: str) -> dict[str, int]:
    names = [*(f"r{i}" for i in range(13)), "sp", "lr", "pc"]
    return {r.name: r.value for r in (await client.debug.read_registers(name=name, names=names)).registers}


async def test_break_continue_registers_memory_step_through_another_servers_bridge(
        other: AsyncClient, client: AsyncClient) -> None:
    there, here = await bridged(other, client, "crc32")
    main = elf_symbol(BOARD, "crc32", "main")
    bp = (await client.debug.set_breakpoint(name=here, location={"symbol": "main"})).breakpoint
    stop = (await client.debug.continue_(name=here, wait=True)).stop
    assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == main, stop
    # the other server's session stopped there too, and both read the same machine
    assert (await other.sessions.get_session(name=there)).session.state == cpb.SESSION_STATE_HALTED
    assert await registers(client, here) == await registers(other, there)
    buf = elf_symbol(BOARD, "crc32", "buf")
    await client.debug.clear_breakpoint(name=here, id=bp.id)
    step = await client.debug.step(name=here, count=40)
    assert step.stop.reason == cpb.STOP_REASON_STEP
    regs = await registers(client, here)
    assert regs == await registers(other, there) and regs["pc"] == step.stop.pc != main
    mine = (await client.debug.read_memory(name=here, address=buf, size=64)).data
    assert mine == (await other.debug.read_memory(name=there, address=buf, size=64)).data != bytes(64)
    # a write through the chain lands in the other server's machine
    await client.debug.write_memory(name=here, address=buf, data=b"chained!")
    assert (await other.debug.read_memory(name=there, address=buf, size=8)).data == b"chained!"
    await client.debug.write_register(name=here, register="r7", value=0x1234)
    assert (await registers(other, there))["r7"] == 0x1234


async def test_a_halt_on_the_other_server_is_seen(other: AsyncClient, client: AsyncClient) -> None:
    """Running here: a halt on the other server ends the run here (HALTED, same pc)."""
    there, here = await bridged(other, client, "echo")
    await client.sessions.run_session(name=here)
    await api.wait_state(other, there, cpb.SESSION_STATE_RUNNING)
    await api.console_until(other, there, b"echo ready\n")
    await other.debug.halt(name=there)
    halted = await api.wait_state(client, here, cpb.SESSION_STATE_HALTED, timeout=10)
    assert halted.last_stop.pc == (await other.sessions.get_session(name=there)).session.last_stop.pc


async def test_the_firmware_exiting_there_is_an_exit_here(other: AsyncClient, client: AsyncClient) -> None:
    there, here = await bridged(other, client, "echo")
    await client.sessions.run_session(name=here)
    await api.wait_state(other, there, cpb.SESSION_STATE_RUNNING)
    await api.console_until(other, there, b"echo ready\n")
    await other.sessions.write_console(name=there, data=b"q")
    done = await api.wait_state(client, here, cpb.SESSION_STATE_EXITED, timeout=10)
    assert done.exit_code == 0 and done.last_stop.reason == cpb.STOP_REASON_EXIT
    assert (await api.console_text(other, there)).endswith(b"bye\n")

"""Fixtures for the GDB bridge tests: an in-process server (tests/conftest.py's `server`),
a session made through the SDK, and a GdbServer started on it from the engine objects on
a free port; the real `gdb-multiarch` runs as a child process in batch mode."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.server.app import RunningServer
from machineserver.server.core.gdbserver import GdbServer
from machineserver.server.core.sessions import LiveSession
from tests.conftest import FIRMWARE, firmware

GDB = shutil.which("gdb-multiarch")
HAVE_QEMU_ARM = shutil.which("qemu-system-arm") is not None
HAVE_QEMU_RISCV = shutil.which("qemu-system-riscv32") is not None

needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb-multiarch is not installed")


def backend_param(backend: str, riscv: bool = False) -> object:
    have = HAVE_QEMU_RISCV if riscv else HAVE_QEMU_ARM
    tool = "qemu-system-riscv32" if riscv else "qemu-system-arm"
    marks = [pytest.mark.skipif(not have, reason=f"{tool} is not installed")] if backend == "qemu" else []
    return pytest.param(backend, marks=marks, id=backend)


@dataclass
class Target:
    name: str  # sessions/{id}
    live: LiveSession
    gdbserver: GdbServer
    port: int
    elf: Path


Attach = Callable[..., Awaitable[Target]]


@pytest.fixture
async def gdb_target(server: RunningServer, client: AsyncClient) -> AsyncIterator[Attach]:
    """attach(board, program, backend) -> Target: a powered-on, halted session with a
    GdbServer listening on 127.0.0.1:<free port>."""
    started: list[GdbServer] = []

    async def attach(board: str, program: str, backend: str) -> Target:
        elf = firmware(board, program)
        prog = (await client.upload_program(elf)).program.name
        s = (await client.sessions.create_session(
            board_template=board, program=prog, power_on=True, backend=backend)).session
        live = server.engine.sessions.get(s.name)
        gs = GdbServer(server.engine.sessions, server.engine.debugger, live)
        started.append(gs)
        host, port = await gs.start("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        return Target(s.name, live, gs, port, elf)

    try:
        yield attach
    finally:
        for gs in started:
            await gs.stop()


async def run_gdb(target: Target, *commands: str, timeout: float = 60) -> str:
    """gdb-multiarch -q -batch -nx with the ELF as symbol file, connected to the target,
    running ``commands`` (each an -ex); returns stdout+stderr. Runs in tests/firmware so
    the DWARF's relative source paths resolve."""
    assert GDB is not None
    args = [GDB, "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote 127.0.0.1:{target.port}"]
    for cmd in commands:
        args += ["-ex", cmd]
    args.append(str(target.elf))
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=FIRMWARE, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"gdb did not finish in {timeout} s:\n{out.decode(errors='replace')}") from None
    return out.decode(errors="replace")


async def wait_for_clients(gs: GdbServer, count: int, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while gs.clients != count:
        assert loop.time() < deadline, f"{gs.clients} gdb clients, expected {count}"
        await asyncio.sleep(0.01)

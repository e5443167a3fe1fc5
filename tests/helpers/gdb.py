"""The GDB bridge tests' helpers: a session with a GdbServer on a free port (``Target``),
the real gdb-multiarch in batch mode, and waiting for the bridge's client count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from machineserver.server.core.gdbserver import GdbServer
from machineserver.server.core.sessions import LiveSession
from tests.helpers.firmware import FIRMWARE
from tests.helpers.tools import require_tool


def gdb_multiarch() -> Path:
    """gdb-multiarch's path; skips (or, under scripts/test, fails) the test without it."""
    return require_tool("gdb-multiarch")


@dataclass
class Target:
    name: str  # sessions/{id}
    live: LiveSession
    gdbserver: GdbServer
    port: int
    elf: Path


Attach = Callable[..., Awaitable[Target]]


async def run_gdb(target: Target, *commands: str, timeout: float = 60) -> str:
    """gdb-multiarch -q -batch -nx with the ELF as symbol file, connected to the target,
    running ``commands`` (each an -ex); returns stdout+stderr. Runs in tests/firmware so
    the DWARF's relative source paths resolve."""
    args = [str(gdb_multiarch()), "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off",
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
    """Until the bridge has ``count`` clients (it signals nothing: polled every 10 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while gs.clients != count:
        assert loop.time() < deadline, f"{gs.clients} gdb clients, expected {count}"
        await asyncio.sleep(0.01)

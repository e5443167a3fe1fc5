"""The backend conformance suite: the same end-to-end tests, through the SDK against a
real in-process server (port 0, a temporary data dir), run once per backend.

`backend` is parametrized over every backend; `qemu` is skipped (with the reason) when
its binaries are missing. Where a backend cannot do something, the test checks that the
server says so (UNIMPLEMENTED with the reason, and the matching capability flag or
board limit), never that it silently differs.

Every test also checks that no QEMU child process outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
from elftools.elf.elffile import ELFFile

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.conftest import firmware

BACKENDS = ("unicorn", "qemu")
QEMU_BINARIES = {"arm-cortex-m": "qemu-system-arm", "riscv32": "qemu-system-riscv32"}
BOARD_ARCH = {
    "lm3s6965evb": "arm-cortex-m",
    "mps2-an385": "arm-cortex-m",
    "netduinoplus2": "arm-cortex-m",
    "sifive_e": "riscv32",
}
# the boards every behaviour runs on: two Cortex-M3 and one RV32
BOARDS = ("lm3s6965evb", "mps2-an385", "sifive_e")
# the registers both backends must have (and agree on in the differential test)
CORE_REGISTERS = {
    "arm-cortex-m": [*(f"r{i}" for i in range(13)), "sp", "lr", "pc"],
    "riscv32": [*(f"x{i}" for i in range(32)), "pc"],
}


def qemu_missing(board: str = "lm3s6965evb") -> str | None:
    """Why the qemu backend cannot run this board here, or None."""
    binary = QEMU_BINARIES[BOARD_ARCH[board]]
    if shutil.which(binary) is None:
        return f"{binary} is not installed (Debian: apt-get install --no-install-recommends qemu-system-arm)"
    return None


def skip_unless_runnable(backend: str, board: str) -> None:
    if backend == "qemu" and (why := qemu_missing(board)):
        pytest.skip(f"qemu backend on {board}: {why}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "qemu" and (why := qemu_missing()):
        pytest.skip(f"qemu backend: {why}")
    return str(request.param)


# --------------------------------------------------------------------------- process hygiene


def qemu_children() -> list[psutil.Process]:
    """qemu-system-* processes started by this test process (zombies included)."""
    out = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.name().startswith("qemu-system"):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    """Set up before (so torn down after) the server: every QEMU must be gone by then."""
    before = {p.pid for p in qemu_children()}
    yield
    left: list[psutil.Process] = []
    for _ in range(100):  # reaping is asynchronous: give it up to 2 s
        left = [p for p in qemu_children() if p.pid not in before]
        if not left:
            break
        time.sleep(0.02)
    for p in left:  # do not leak them into the next test, but fail this one
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"QEMU processes left behind (or not reaped): {[p.pid for p in left]}"


# server and client: the fixtures of tests/conftest.py


# --------------------------------------------------------------------------- helpers


def elf_symbol(board: str, program: str, name: str) -> int:
    with firmware(board, program).open("rb") as f:
        syms = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)  # type: ignore[union-attr]
        assert syms, f"no symbol {name} in {board}/{program}"
        return int(syms[0]["st_value"]) & ~1


@dataclass
class Conf:
    """One backend seen through the SDK: sessions, consoles, states."""

    client: AsyncClient
    backend: str

    async def upload(self, board: str, program: str) -> str:
        return (await self.client.upload_program(firmware(board, program))).program.name

    async def session(self, board: str, program: str | None = None, **kw: object) -> str:
        skip_unless_runnable(self.backend, board)
        prog = await self.upload(board, program) if program else ""
        s = (await self.client.sessions.create_session(
            board_template=board, program=prog, backend=self.backend, **kw)).session  # type: ignore[arg-type]
        assert s.backend == self.backend
        return str(s.name)

    async def halted_at(self, board: str, program: str, symbol: str = "main") -> str:
        """A powered-on session stopped at a breakpoint on `symbol` (breakpoint cleared)."""
        name = await self.session(board, program, power_on=True)
        bp = (await self.client.debug.set_breakpoint(name=name, location={"symbol": symbol})).breakpoint
        stop = (await self.client.debug.continue_(name=name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT, stop
        assert stop.pc == elf_symbol(board, program, symbol)
        await self.client.debug.clear_breakpoint(name=name, id=bp.id)
        return name

    async def state(self, name: str) -> object:
        return (await self.client.sessions.get_session(name=name)).session

    async def wait_state(self, name: str, state: int, timeout: float = 20) -> object:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            s = (await self.client.sessions.get_session(name=name)).session
            if s.state == state:
                return s
            if loop.time() > deadline:
                raise AssertionError(
                    f"{self.backend}: session stayed {cpb.SessionState.Name(s.state)} ({s.state_reason}), "
                    f"wanted {cpb.SessionState.Name(state)}")  # type: ignore[arg-type]
            await asyncio.sleep(0.01)

    async def console_until(self, name: str, needle: bytes, timeout: float = 20) -> bytes:
        out = b""

        async def read() -> None:
            nonlocal out
            async for data in self.client.console(name):
                out += data
                if needle in out:
                    return

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.backend}: console never showed {needle!r}; got {out!r}") from None
        return out

    async def console(self, name: str, offset: int = 0) -> bytes:
        """Everything the console holds from offset (no following)."""
        msgs = [m async for m in self.client.sessions.stream_console(name=name, offset=offset, follow=False)]
        return b"".join(m.data for m in msgs)

    async def console_size(self, name: str) -> int:
        return int((await self.client.telemetry.get_session_metrics(name=name)).metrics.console_bytes)

    async def run_to_exit(self, name: str) -> object:
        """Continue until the firmware exits; the session afterwards."""
        resp = await self.client.debug.continue_(name=name, wait=True)
        assert resp.stop.reason == cpb.STOP_REASON_EXIT, resp.stop
        return await self.wait_state(name, cpb.SESSION_STATE_EXITED)

    async def registers(self, name: str, names: list[str] | None = None) -> dict[str, int]:
        regs = (await self.client.debug.read_registers(name=name, names=names or [])).registers
        return {r.name: r.value for r in regs}


@pytest.fixture
def conf(client: AsyncClient, backend: str) -> Conf:
    return Conf(client, backend)

"""Shared by the QEMU driver tests (tests/drivers/test_qemu_*.py): the test firmware,
an event recorder, a machine with its parts at hand (:class:`Qm`), and the ``machines``
fixture, which powers off every machine a test made and checks that no QEMU child of
this process is left behind (import the fixture into the test module to use it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from machineserver.server.core.boards import load_shipped_boards
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.drivers.base import (
    BoardSpec,
    Breakpoints,
    ConsoleInput,
    Counters,
    MachineOptions,
    MachineState,
    MemoryAccess,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    StopInfo,
    StopReason,
    Watchpoints,
)
from machineserver.server.drivers.qemu import QemuBackend, QemuMachine
from machineserver.server.drivers.qemu.process import QemuProcess

FIRMWARE = Path(__file__).resolve().parents[1] / "firmware"
BOARDS = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")
ARM_BOARDS = BOARDS[:3]
QEMU_MISSING = not (shutil.which("qemu-system-arm") and shutil.which("qemu-system-riscv32"))

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def firmware_dir() -> Path:
    """tests/firmware/build, built once per session if any board's programs are missing."""
    build = FIRMWARE / "build"
    if not all((build / b / "echo.elf").exists() for b in BOARDS) and shutil.which("make"):
        subprocess.run(["make", "-C", str(FIRMWARE)], capture_output=True, timeout=600)
    return build


def elf_path(firmware_dir: Path, board: str, program: str) -> Path:
    path = firmware_dir / board / f"{program}.elf"
    if not path.exists():
        pytest.skip(f"{board}/{program}.elf not built (no cross compiler?)")
    return path


def elf_image(path: Path) -> ProgramImage:
    """The ELF's loadable image, through the server's own loader."""
    return parse_image(path.read_bytes(), ImageFormat.ELF).image


def symbol(path: Path, name: str) -> int:
    with path.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name(name)
        assert syms, f"no symbol {name} in {path}"
        return int(syms[0]["st_value"]) & ~1


_BOARDS: dict[str, BoardSpec] = {}


def board(name: str) -> BoardSpec:
    if not _BOARDS:
        _BOARDS.update(load_shipped_boards())
    return _BOARDS[name]


class Events:
    """MachineEvents that records everything; tests await conditions on it."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.stops: list[StopInfo] = []
        self.failures: list[str] = []
        self.first_byte_at: float | None = None
        self._taken = 0

    def console_output(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        self.console += data

    def stopped(self, info: StopInfo) -> None:
        self.stops.append(info)

    def failed(self, reason: str) -> None:
        self.failures.append(reason)

    async def until(self, cond: Callable[[], bool], limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out: console={bytes(self.console)!r} stops={self.stops} "
                    f"failures={self.failures}"
                )
            await asyncio.sleep(0.002)

    async def next_stop(self, limit: float = 10.0) -> StopInfo:
        """The next stop event not returned yet."""
        want = self._taken + 1
        await self.until(lambda: len(self.stops) >= want or bool(self.failures), limit)
        assert not self.failures, self.failures
        self._taken = want
        return self.stops[want - 1]


def qemu_children() -> list[int]:
    """PIDs of qemu-system-* processes whose parent is this test process (zombies too)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == me and comm.startswith("qemu-system"):
            out.append(int(entry))
    return out


class Qm:
    """A QEMU machine with its parts at hand: ``m.rc`` is its RunControl part, ``m.regs``
    RegisterAccess, and so on; the lifecycle is the machine's own."""

    def __init__(self, machine: QemuMachine) -> None:
        self.machine = machine
        self.rc = machine.capability(RunControl)
        self.regs = machine.capability(RegisterAccess)
        self.mem = machine.capability(MemoryAccess)
        self.bp = machine.capability(Breakpoints)
        self.wp = machine.capability(Watchpoints)
        self.con = machine.capability(ConsoleInput)
        self.snap = machine.capability(Snapshots)

    @property
    def state(self) -> MachineState:
        return self.machine.state

    def counters(self) -> Counters:
        return self.machine.counters()

    async def power_on(self) -> None:
        await self.machine.power_on()

    async def power_off(self) -> None:
        await self.machine.power_off()

    async def reset(self) -> None:
        await self.machine.reset()

    async def load(self, image: ProgramImage) -> None:
        await self.machine.load(image)

    @property
    def process(self) -> QemuProcess:
        return self.machine.target.process

    @property
    def qemu_pid(self) -> int:
        pids = self.process.pids()
        assert pids, "no QEMU runs"
        return pids[0]


MachineFactory = Callable[..., tuple[Qm, Events]]


@pytest.fixture
async def machines() -> AsyncIterator[MachineFactory]:
    made: list[QemuMachine] = []
    backend = QemuBackend()

    def make(board_name: str, *, icount: bool = False, extra_args: tuple[str, ...] = (),
             **extra: str) -> tuple[Qm, Events]:
        """A machine (OFF); ``extra``: MachineOptions.extra; ``extra_args``: appended to
        QEMU's command line (a QemuMachine knob the API never reaches)."""
        events = Events()
        options = MachineOptions(icount=icount, extra=extra)
        spec = board(board_name)
        m = (QemuMachine(spec, options, events, binary=backend.binaries[spec.arch], extra_args=extra_args)
             if extra_args else backend.create_machine(spec, options, events))
        assert isinstance(m, QemuMachine)
        made.append(m)
        return Qm(m), events

    yield make
    for m in made:
        await m.power_off()
    await asyncio.sleep(0.05)
    assert qemu_children() == [], "a QEMU child process was left behind"


async def halted_at(make: MachineFactory, fw: Path, board_name: str, program: str, function: str,
                    **kw: Any) -> tuple[Qm, Events, Path]:
    """A machine halted at the start of ``function`` (reached through a breakpoint, which
    is cleared again)."""
    m, ev, path = await boot(make, fw, board_name, program, **kw)
    address = symbol(path, function)
    await m.bp.set_breakpoint(address)
    await m.rc.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, address), stop
    await m.bp.clear_breakpoint(address)
    return m, ev, path


async def boot(make: MachineFactory, fw: Path, board_name: str, program: str,
               **kw: Any) -> tuple[Qm, Events, Path]:
    m, ev = make(board_name, **kw)
    await m.power_on()
    path = elf_path(fw, board_name, program)
    await m.load(elf_image(path))
    return m, ev, path

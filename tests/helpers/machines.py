"""For tests that drive a backend's Machine directly (below the API), whatever the
backend: the shipped board specs, program images and analyses through the server's own
loader, a machine with its capability parts at hand (:class:`Parts`), and cancelling a
driver call. The events a machine sends are recorded by tests/helpers/events.py."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any, Generic, TypeVar

from machineserver.server.core.boards import load_shipped_boards
from machineserver.server.core.coverage_analysis import ProgramAnalysis
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.core.symbols import SymbolTable
from machineserver.server.drivers.base import (
    BoardSpec,
    Breakpoints,
    Capability,
    ConsoleInput,
    Counters,
    Coverage,
    HostFootprint,
    Machine,
    MachineState,
    MemoryAccess,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    Watchpoints,
)

C = TypeVar("C", bound=Capability)


@functools.cache
def _shipped_boards() -> dict[str, BoardSpec]:
    return load_shipped_boards()


def board(name: str) -> BoardSpec:
    """A board template shipped with the server (specs are frozen: shared safely)."""
    return _shipped_boards()[name]


def elf_image(path: Path) -> ProgramImage:
    """The ELF's loadable image, through the server's own loader."""
    return parse_image(path.read_bytes(), ImageFormat.ELF).image


def program_analysis(board_name: str, elf: Path) -> ProgramAnalysis:
    """The coverage analysis of a program (its branches, lines, functions) for a board."""
    data = elf.read_bytes()
    return ProgramAnalysis(data, SymbolTable(data), board(board_name).arch)


class _Part(Generic[C]):
    """A class attribute that reads as the machine's part for ``iface``."""

    def __init__(self, iface: type[C]) -> None:
        self.iface = iface

    def __get__(self, parts: Parts, owner: object = None) -> C:
        return parts.machine.capability(self.iface)


class Parts:
    """A machine with its capability parts at hand, each reached through the typed
    accessor as the core reaches it: ``run`` (RunControl), ``regs``, ``mem``, ``bp``,
    ``wp``, ``console`` (ConsoleInput), ``snap``, ``cov``, ``footprint``. The lifecycle
    is the machine's own (``power_on``, ``load``, ``reset``, ``power_off``)."""

    run = _Part(RunControl)
    regs = _Part(RegisterAccess)
    mem = _Part(MemoryAccess)
    bp = _Part(Breakpoints)
    wp = _Part(Watchpoints)
    console = _Part(ConsoleInput)
    snap = _Part(Snapshots)
    cov = _Part(Coverage)
    footprint = _Part(HostFootprint)

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

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


async def cancel(task: asyncio.Task[Any], within_s: float = 5.0) -> None:
    """Cancel a driver call's task and wait until it ended cancelled: within ``within_s``
    seconds (a generous bound, not a speed: a cancelled call must stop its work soon, not
    finish it)."""
    task.cancel()
    try:
        await asyncio.wait_for(task, within_s)
    except asyncio.CancelledError:
        pass
    except TimeoutError:
        raise AssertionError(f"the cancelled call was still going after {within_s} s") from None
    assert task.cancelled(), "the call finished instead of being cancelled"

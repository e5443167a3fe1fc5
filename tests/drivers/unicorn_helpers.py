"""Helpers for the Unicorn driver tests: firmware images from ELF files (pyelftools),
an event recorder, board specs, and a machine's capability parts by short names."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from machineserver.server.core.boards import load_shipped_boards
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.drivers.base import (
    Breakpoints,
    ConsoleInput,
    Coverage,
    HostFootprint,
    Machine,
    MemoryAccess,
    ProgramImage,
    RegisterAccess,
    RunControl,
    Snapshots,
    StopInfo,
    Watchpoints,
)

FIRMWARE = Path(__file__).resolve().parents[1] / "firmware"
BUILD = FIRMWARE / "build"
BOARDS = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")
ARM_BOARDS = BOARDS[:3]
_build_lock = threading.Lock()


def ensure_firmware(board: str) -> Path | None:
    """Build tests/firmware for ``board`` if missing; None when it cannot be built."""
    out = BUILD / board
    if (out / "hello.elf").exists():
        return out
    with _build_lock:
        if not (out / "hello.elf").exists() and shutil.which("make"):
            subprocess.run(["make", "-C", str(FIRMWARE), f"BOARDS={board}"],
                           capture_output=True, check=False, timeout=300)
    return out if (out / "hello.elf").exists() else None


def elf_image(path: Path) -> ProgramImage:
    """The ELF's loadable image, through the server's own loader."""
    return parse_image(path.read_bytes(), ImageFormat.ELF).image


def elf_symbol(path: Path, name: str) -> int:
    with path.open("rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        assert sym, name
        return int(sym[0]["st_value"])


def board(name: str):
    return load_shipped_boards()[name]


@dataclass(frozen=True)
class Parts:
    """A machine's capability parts, reached through the typed accessor as callers do."""

    run: RunControl
    regs: RegisterAccess
    mem: MemoryAccess
    bp: Breakpoints
    wp: Watchpoints
    console: ConsoleInput
    snap: Snapshots
    cov: Coverage
    footprint: HostFootprint


def parts(m: Machine) -> Parts:
    return Parts(m.capability(RunControl), m.capability(RegisterAccess), m.capability(MemoryAccess),
                 m.capability(Breakpoints), m.capability(Watchpoints), m.capability(ConsoleInput),
                 m.capability(Snapshots), m.capability(Coverage), m.capability(HostFootprint))


class Recorder:
    """MachineEvents that records everything and lets a test await the next stop."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.stops: list[StopInfo] = []
        self.failures: list[str] = []
        self._cond = threading.Condition()

    def console_output(self, data: bytes) -> None:
        with self._cond:
            self.console += data
            self._cond.notify_all()

    def stopped(self, info: StopInfo) -> None:
        with self._cond:
            self.stops.append(info)
            self._cond.notify_all()

    def failed(self, reason: str) -> None:
        with self._cond:
            self.failures.append(reason)
            self._cond.notify_all()

    def _wait(self, pred, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    async def wait_stop(self, n: int = 1, wait_s: float = 20.0) -> StopInfo:
        ok = await asyncio.to_thread(self._wait, lambda: len(self.stops) >= n or self.failures,
                                     wait_s)
        assert not self.failures, self.failures
        assert ok, f"no stop after {wait_s}s; console={bytes(self.console)!r}"
        return self.stops[n - 1]

    async def wait_console(self, text: bytes, wait_s: float = 20.0) -> None:
        ok = await asyncio.to_thread(self._wait, lambda: text in self.console, wait_s)
        assert ok, f"{text!r} not seen; console={bytes(self.console)!r}"

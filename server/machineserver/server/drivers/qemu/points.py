"""The machine's breakpoints, watchpoints and hidden semihosting trap sites, as data, and
their insertion into QEMU's gdbstub.

They outlive any one QEMU (reset, load after an exit, snapshot restore start a new one):
:meth:`PointTable.insert_all` puts them into a fresh QEMU. The trap sites (see
:mod:`.semihosting`) are gdbstub breakpoints too, but never user breakpoints: a user
breakpoint at the same address is a second, separate entry in QEMU (clearing it leaves
the trap in place), and a stop there reports the user's breakpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

from machineserver.server.drivers.base import Arch, WatchKind
from machineserver.server.drivers.qemu.rsp import RspClient
from machineserver.server.drivers.qemu.target import refusals_ignored

# gdbstub Z/z types
SOFTWARE, HARDWARE = 0, 1
WATCH_TYPE = {WatchKind.WRITE: 2, WatchKind.READ: 3, WatchKind.ACCESS: 4}


class PointTable:
    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.breakpoints: dict[int, bool] = {}  # address -> hardware
        self.watchpoints: set[tuple[int, int, WatchKind]] = set()
        self.traps: frozenset[int] = frozenset()

    def clear(self) -> None:
        self.breakpoints.clear()
        self.watchpoints.clear()
        self.traps = frozenset()

    def code_address(self, address: int) -> int:
        """A breakpoint address as the stub wants it (Thumb bit cleared)."""
        return address & ~1 if self.arch is Arch.ARM_CORTEX_M else address

    def watch_size(self, address: int) -> int:
        """The size of the (first) watchpoint at ``address``, for reading its value."""
        for addr, size, _ in self.watchpoints:
            if addr == address:
                return min(size, 8)
        return 4

    # ------------------------------------------------------------------ into QEMU
    async def _kind(self, stub: RspClient, address: int) -> int:
        """The breakpoint "kind" (instruction length): 2 for Thumb; on RISC-V 4, or 2
        for a compressed instruction."""
        if self.arch is not Arch.RISCV32:
            return 2
        with refusals_ignored():
            low = await stub.read_memory(address, 2)
            if low[0] & 3 != 3:
                return 2
        return 4

    async def insert_breakpoint(self, stub: RspClient, address: int, hardware: bool) -> None:
        await stub.insert_point(HARDWARE if hardware else SOFTWARE, address,
                                await self._kind(stub, address))

    async def remove_breakpoint(self, stub: RspClient, address: int, hardware: bool) -> None:
        with refusals_ignored():  # QEMU refuses to remove what it lacks: fine
            await stub.remove_point(HARDWARE if hardware else SOFTWARE, address,
                                    await self._kind(stub, address))

    async def insert_watchpoints(self, stub: RspClient) -> None:
        for addr, size, kind in self.watchpoints:
            await stub.insert_point(WATCH_TYPE[kind], addr, size)

    async def remove_watchpoints(self, stub: RspClient) -> None:
        for addr, size, kind in self.watchpoints:
            with refusals_ignored():
                await stub.remove_point(WATCH_TYPE[kind], addr, size)

    async def set_traps(self, stub: RspClient | None, sites: Iterable[int]) -> None:
        """Replace the trap sites (``stub``: the running QEMU to update, if any)."""
        new = frozenset(sites)
        if stub is not None:
            for site in self.traps - new:
                await self.remove_breakpoint(stub, site, False)
            for site in new - self.traps:
                await self.insert_breakpoint(stub, site, False)
        self.traps = new

    async def insert_all(self, stub: RspClient) -> None:
        """Everything into a fresh QEMU."""
        for addr, hardware in self.breakpoints.items():
            await self.insert_breakpoint(stub, addr, hardware)
        for site in self.traps:
            await self.insert_breakpoint(stub, site, False)
        await self.insert_watchpoints(stub)

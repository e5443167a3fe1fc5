"""The user's breakpoints and watchpoints, as data, and their insertion into QEMU's
gdbstub.

They outlive any one QEMU (reset, load after an exit, snapshot restore start a new one):
:meth:`PointTable.insert_all` puts them into a fresh QEMU. Hidden breakpoints at
semihosting trap sites (:mod:`.semihosting`, without the plugin) are separate entries
in QEMU: clearing a user breakpoint at the same address leaves the hidden one.
"""

from __future__ import annotations

from machineserver.server.drivers.base import Arch, WatchKind
from machineserver.server.drivers.qemu.gdbstub import refusals_ignored
from machineserver.server.rsp import RspClient

# gdbstub Z/z types
SOFTWARE, HARDWARE = 0, 1
WATCH_TYPE = {WatchKind.WRITE: 2, WatchKind.READ: 3, WatchKind.ACCESS: 4}


class PointTable:
    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.breakpoints: dict[int, bool] = {}  # address -> hardware
        self.watchpoints: set[tuple[int, int, WatchKind]] = set()

    def clear(self) -> None:
        self.breakpoints.clear()
        self.watchpoints.clear()

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

    async def insert_all(self, stub: RspClient) -> None:
        """Everything into a fresh QEMU."""
        for addr, hardware in self.breakpoints.items():
            await self.insert_breakpoint(stub, addr, hardware)
        await self.insert_watchpoints(stub)

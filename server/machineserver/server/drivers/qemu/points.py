"""The user's breakpoints and watchpoints, as data, and their insertion into QEMU's
gdbstub.

They outlive any one QEMU (reset, load after an exit, snapshot restore start a new one):
:meth:`PointTable.insert_all` puts them into a fresh QEMU. Hidden breakpoints at
semihosting trap sites (:mod:`.semihosting`, without the plugin) are separate entries
in QEMU: clearing a user breakpoint at the same address leaves the hidden one.
"""

from __future__ import annotations

from machineserver.server.drivers.base import Arch, WatchKind
from machineserver.server.drivers.qemu.gate import InstructionGate
from machineserver.server.drivers.qemu.gate_channel import WATCH_READ, WATCH_WRITE
from machineserver.server.drivers.qemu.gdbstub import refusals_ignored
from machineserver.server.rsp import RspClient

# gdbstub Z/z types
SOFTWARE, HARDWARE = 0, 1
WATCH_TYPE = {WatchKind.WRITE: 2, WatchKind.READ: 3, WatchKind.ACCESS: 4}
WATCH_BITS = {WatchKind.WRITE: WATCH_WRITE, WatchKind.READ: WATCH_READ,
              WatchKind.ACCESS: WATCH_WRITE | WATCH_READ}


class PointTable:
    """``held``: lock-step (see :mod:`.lockstep`): the points live in the plugin's gate
    (breakpoint sites held like trap sites, watchpoints checked after each access), not
    in the gdbstub, whose debug stops let QEMU warp its virtual clock."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.breakpoints: dict[int, bool] = {}  # address -> hardware
        self.watchpoints: set[tuple[int, int, WatchKind]] = set()
        self.held = False

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

    async def insert_all(self, stub: RspClient, gate: InstructionGate | None) -> None:
        """Everything into a fresh QEMU (into its gate while held)."""
        if self.held and gate is not None:
            await self.hold_in(gate, flush=False)
            return
        for addr, hardware in self.breakpoints.items():
            await self.insert_breakpoint(stub, addr, hardware)
        await self.insert_watchpoints(stub)

    async def remove_all(self, stub: RspClient) -> None:
        for addr, hardware in self.breakpoints.items():
            await self.remove_breakpoint(stub, addr, hardware)
        await self.remove_watchpoints(stub)

    async def hold_in(self, gate: InstructionGate, *, flush: bool = True) -> None:
        """The table as the gate's breakpoint sites and watchpoints; translations made
        before are flushed (``flush``: QEMU may have translated since they changed)."""
        gate.sites.set_break_sites(self.breakpoints)
        gate.lockstep.set_watches((addr, size, WATCH_BITS[kind]) for addr, size, kind in self.watchpoints)
        if flush:
            await gate.commands.run(b"f")

    def watched(self) -> bool:
        return bool(self.watchpoints)

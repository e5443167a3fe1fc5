"""Memory access on Unicorn: RAM and flash regions of the board only (MMIO pages are
refused: reads have side effects, e.g. popping a UART FIFO). Flash is writable from the
debugger and, as mapped here, from the guest too.

Also while the machine runs: the access waits for the end of the current slice (at most
~10 ms) through the lock hand-off (:class:`~.context.HandOffLock`), then runs between two
slices."""

from __future__ import annotations

from machineserver.server.drivers.base import BadRequest, MachineState, MemoryAccess
from machineserver.server.drivers.unicorn.context import BoardInstance, MachineContext

ACCESSIBLE = (MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED, MachineState.RUNNING)


class UnicornMemory(MemoryAccess):
    access_while_running = True

    def __init__(self, ctx: MachineContext) -> None:
        self._ctx = ctx

    def _check_range(self, inst: BoardInstance, address: int, size: int) -> None:
        board = self._ctx.board
        if size < 0 or address < 0 or address + size > 1 << 32:
            raise BadRequest(f"address range 0x{address:x}+{size} is outside 32 bits", field="address")
        if size and board.region_at(address, size) is None:
            for base, length in inst.mmio:
                if address < base + length and address + size > base:
                    raise BadRequest(f"0x{address:08x}..0x{address + size - 1:08x} is MMIO; "
                                     "peripheral registers are not accessible from the debugger",
                                     field="address")
            raise BadRequest(f"0x{address:08x}..0x{address + size - 1:08x} is not in a memory "
                             f"region of board {board.name}", field="address")

    async def read_memory(self, address: int, size: int) -> bytes:
        self._ctx.require(*ACCESSIBLE)

        def read(inst: BoardInstance) -> bytes:
            self._check_range(inst, address, size)
            return bytes(inst.uc.mem_read(address, size)) if size else b""

        return await self._ctx.locked("read memory", read)

    async def write_memory(self, address: int, data: bytes) -> None:
        self._ctx.require(*ACCESSIBLE)
        data = bytes(data)

        def write(inst: BoardInstance) -> None:
            self._check_range(inst, address, len(data))
            if data:
                inst.uc.mem_write(address, data)
                inst.uc.ctl_remove_cache(address, address + len(data))  # code may have changed

        await self._ctx.locked("write memory", write)

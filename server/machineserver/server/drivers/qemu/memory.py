"""Memory access of a QEMU machine, through the gdbstub (QEMU's debug accesses reach
flash and ROM too)."""

from __future__ import annotations

from machineserver.server.drivers.base import BadRequest, MemoryAccess
from machineserver.server.drivers.qemu.breakpoints import check_range
from machineserver.server.drivers.qemu.gdbstub import refused
from machineserver.server.drivers.qemu.target import QemuTarget, guarded
from machineserver.server.rsp import RspError


class QemuMemory(MemoryAccess):
    """Readable and writable while the CPU is stopped and QEMU holds it (as registers).
    Unmapped addresses: BadRequest(field="address")."""

    def __init__(self, target: QemuTarget) -> None:
        self.target = target

    def _unmapped(self, exc: RspError, address: int) -> BadRequest:
        bad = exc.address if exc.address is not None else address  # the chunk QEMU refused
        return BadRequest(f"address 0x{bad:08x} is not mapped on {self.target.board.name}",
                          field="address")

    @guarded
    async def read_memory(self, address: int, size: int) -> bytes:
        check_range(address, size)
        async with self.target.op:
            self.target.require_inspectable()
            if size == 0:
                return b""
            try:
                return await self.target.stub().read_memory(address, size)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise self._unmapped(exc, address) from None

    @guarded
    async def write_memory(self, address: int, data: bytes) -> None:
        check_range(address, len(data))
        async with self.target.op:
            self.target.require_inspectable()
            if not data:
                return
            stub = self.target.stub()
            try:
                if self.target.board.region_at(address, len(data)) is None:
                    # QEMU's gdbstub silently drops writes to unmapped addresses: probe by
                    # reading first (outside the board's known memory only)
                    await stub.read_memory(address, len(data))
                await stub.write_memory(address, data)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise self._unmapped(exc, address) from None

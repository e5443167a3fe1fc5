"""Memory of a gdbremote machine: ``m`` reads and ``X`` (binary, where the remote takes
it) or ``M`` writes, in chunks that fit the remote's PacketSize."""

from __future__ import annotations

from machineserver.server.drivers.base import BadRequest, MemoryAccess
from machineserver.server.drivers.gdbremote.link import RemoteLink, guarded, refused
from machineserver.server.rsp import RspClient, RspError


def check_range(address: int, size: int) -> None:
    if address < 0 or address >= 1 << 32:
        raise BadRequest(f"address 0x{address:x} is outside the 32-bit space", field="address")
    if size < 0 or address + size > 1 << 32:
        raise BadRequest("the range runs past the 32-bit address space", field="size")


async def write_memory(link: RemoteLink, stub: RspClient, address: int, data: bytes) -> None:
    if link.x_packets:
        await stub.write_memory_binary(address, data)
    else:
        await stub.write_memory(address, data)


class RemoteMemory(MemoryAccess):
    def __init__(self, link: RemoteLink) -> None:
        self.link = link

    def _refused(self, exc: RspError, address: int) -> BadRequest:
        bad = exc.address if exc.address is not None else address
        return BadRequest(f"the remote refused access at 0x{bad:08x}: {exc}", field="address")

    def _check_board(self, address: int, size: int) -> None:
        """The contract's rule: the board's memory only (a remote stub may answer for
        addresses where nothing is, e.g. QEMU's gdbstub reads unmapped space as zeros)."""
        check_range(address, size)
        if size and self.link.board.region_at(address, size) is None:
            raise BadRequest(f"0x{address:08x}+{size} is not in the memory of board {self.link.board.name}",
                             field="address")

    @guarded
    async def read_memory(self, address: int, size: int) -> bytes:
        self._check_board(address, size)
        async with self.link.op:
            self.link.require_inspectable("read memory")
            if size == 0:
                return b""
            try:
                return await self.link.stub().read_memory(address, size)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise self._refused(exc, address) from None

    @guarded
    async def write_memory(self, address: int, data: bytes) -> None:
        self._check_board(address, len(data))
        async with self.link.op:
            self.link.require_inspectable("write memory")
            if not data:
                return
            try:
                await write_memory(self.link, self.link.stub(), address, data)
            except RspError as exc:
                if not refused(exc):
                    raise
                raise self._refused(exc, address) from None

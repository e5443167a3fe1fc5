"""Soft snapshots of a gdbremote machine: the registers and the board's writable RAM
regions, read through the remote (``g``/``p`` and ``m`` in PacketSize chunks). Nothing
else: peripheral state is not held (a remote target has no way to give it), which the
blob's header says.

Blob: ``MSGDBREMOTE-SNAP1\\n``, a 4-byte big-endian header length, a JSON header (board,
arch, registers, regions with their sizes, ``not_held``), then the regions' bytes in
header order."""

from __future__ import annotations

import json
import struct
from typing import Any

from machineserver.server.drivers.base import BadRequest, BoardSpec, MachineState, Snapshots
from machineserver.server.drivers.gdbremote.link import RemoteLink, guarded, refused
from machineserver.server.drivers.gdbremote.memory import write_memory
from machineserver.server.drivers.gdbremote.registers import RemoteRegisters
from machineserver.server.rsp import RspError

MAGIC = b"MSGDBREMOTE-SNAP1\n"
NOT_HELD = "peripheral state (timers, UARTs, interrupt controller), caches, flash"


MAX_HEADER = 1 << 20
MAX_REGISTERS = 512


def writable_ram(board: BoardSpec) -> list[tuple[str, int, int]]:
    return [(r.name, r.base, r.size) for r in board.memory if r.kind == "ram" and r.writable]


def parse_snapshot(blob: bytes, board: BoardSpec) -> tuple[dict[str, Any], list[tuple[int, bytes]]]:
    """(header, [(base, bytes)] per region) of a soft snapshot of ``board``: the header's
    board, registers (names to integers) and regions (exactly the board's writable RAM)
    checked, and the blob exactly as long as they say. BadRequest(field="snapshot")."""
    def bad(why: str) -> BadRequest:
        return BadRequest(f"not a gdbremote soft snapshot of board {board.name}: {why}", field="snapshot")

    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise bad("no header")
    (n,) = struct.unpack_from(">I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(blob):
        raise bad(f"a header of {n} bytes in a blob of {len(blob)}")
    try:
        header = json.loads(blob[start : start + n])
    except (ValueError, RecursionError):
        raise bad("an unreadable header") from None
    if not isinstance(header, dict):
        raise bad("an unreadable header")
    if header.get("board") != board.name:
        raise BadRequest(f"the snapshot is of board {str(header.get('board'))[:64]!r}, not {board.name!r}",
                         field="snapshot")
    registers = header.get("registers")
    if (not isinstance(registers, dict) or len(registers) > MAX_REGISTERS
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 128
                   for v in registers.values())):
        raise bad("registers that are not names with unsigned integers")
    raw = header.get("regions")
    try:
        declared = [(str(r["name"]), r["base"], r["size"]) for r in raw]  # type: ignore[union-attr]
    except (TypeError, KeyError):
        raise bad("regions that are not objects with name, base and size") from None
    if declared != writable_ram(board):
        raise bad("regions other than the board's writable RAM")
    pos = start + n
    regions = []
    for _, base, size in declared:
        regions.append((base, blob[pos : pos + size]))
        pos += size
    if pos != len(blob):
        raise bad(f"{len(blob)} bytes where the header says {pos}")
    return header, regions


class RemoteSnapshots(Snapshots):
    def __init__(self, link: RemoteLink, registers: RemoteRegisters) -> None:
        self.link = link
        self.registers = registers

    def _regions(self) -> list[tuple[str, int, int]]:
        return writable_ram(self.link.board)

    async def save_state(self) -> bytes:
        regs = await self.registers.read_registers()
        return await self._save_memory(regs)

    @guarded
    async def _save_memory(self, regs: dict[str, int]) -> bytes:
        async with self.link.op:
            self.link.require_inspectable("save a snapshot")
            stub = self.link.stub()
            blobs = [await stub.read_memory(base, size) for _, base, size in self._regions()]
        header = {"board": self.link.board.name, "arch": self.link.arch.value, "registers": regs,
                  "regions": [{"name": n, "base": b, "size": s} for n, b, s in self._regions()],
                  "not_held": NOT_HELD}
        head = json.dumps(header, sort_keys=True).encode()
        return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)

    @guarded
    async def restore_state(self, blob: bytes) -> None:
        header, regions = parse_snapshot(blob, self.link.board)
        registers = header["registers"]
        async with self.link.op:
            self.link.require(MachineState.HALTED, MachineState.EXITED, MachineState.FAULTED,
                              action="restore a snapshot")
            self.link.require_inspectable("restore a snapshot")
            stub = self.link.stub()
            for base, data in regions:
                await write_memory(self.link, stub, base, data)
            for name, value in registers.items():
                try:
                    await self.link.write_register(name, int(value))
                except RspError as exc:
                    if not refused(exc):
                        raise
                    # a register the remote describes but will not write (read-only)
            self.link.state = MachineState.HALTED

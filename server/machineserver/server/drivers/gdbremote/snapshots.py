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

from machineserver.server.drivers.base import BadRequest, MachineState, Snapshots
from machineserver.server.drivers.gdbremote.link import RemoteLink, guarded, refused
from machineserver.server.drivers.gdbremote.memory import write_memory
from machineserver.server.drivers.gdbremote.registers import RemoteRegisters
from machineserver.server.rsp import RspError

MAGIC = b"MSGDBREMOTE-SNAP1\n"
NOT_HELD = "peripheral state (timers, UARTs, interrupt controller), caches, flash"


class RemoteSnapshots(Snapshots):
    def __init__(self, link: RemoteLink, registers: RemoteRegisters) -> None:
        self.link = link
        self.registers = registers

    def _regions(self) -> list[tuple[str, int, int]]:
        return [(r.name, r.base, r.size) for r in self.link.board.memory if r.kind == "ram" and r.writable]

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

    def _parse(self, blob: bytes) -> tuple[dict[str, object], list[tuple[int, bytes]]]:
        bad = BadRequest("not a gdbremote soft snapshot", field="snapshot")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
            raise bad
        (n,) = struct.unpack_from(">I", blob, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = json.loads(blob[start : start + n])
        except ValueError:
            raise bad from None
        if header.get("board") != self.link.board.name:
            raise BadRequest(f"the snapshot is of board {header.get('board')!r}, not {self.link.board.name!r}",
                             field="snapshot")
        pos = start + n
        regions = []
        for region in header["regions"]:
            size = int(region["size"])
            regions.append((int(region["base"]), blob[pos : pos + size]))
            pos += size
        if pos != len(blob):
            raise bad
        return header, regions

    @guarded
    async def restore_state(self, blob: bytes) -> None:
        header, regions = self._parse(blob)
        registers = header["registers"]
        assert isinstance(registers, dict)
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

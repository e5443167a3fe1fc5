"""Semihosting trap sites, so that a program's exit does not end QEMU.

QEMU 7.2 performs semihosting calls itself (``-semihosting-config target=native``) and
ends the *process* on SYS_EXIT / SYS_EXIT_EXTENDED: the machine's registers and memory
would go with it. So when an image is loaded, the driver finds its trap sites (the
instructions that make the calls) and makes QEMU stop *before* one runs; a stop there
reads the operation register and

* for SYS_EXIT (0x18) and SYS_EXIT_EXTENDED (0x20) decodes the exit code as QEMU does
  and reports the exit, leaving QEMU alive and halted at the trap (state EXITED:
  registers and memory readable; reset or load bring the machine back);
* for any other operation lets QEMU perform it (one step with the trap instruction in
  place) and goes on silently.

How QEMU is made to stop there (:class:`TrapSites`):

* **the plugin's gate** (:mod:`.gate`, plugin/msplugin.c), when usable: the sites are
  listed to the plugin, which notices a trap instruction at a listed site when QEMU
  *translates* it (so it is code, about to run), makes that block leave before it runs
  and holds the vCPU; the driver stops the VM (^C) at the block's start and single-steps
  up to the site. Costs nothing until a call is made; memory is never changed.
* **hidden breakpoints** (no plugin): gdbstub breakpoints at the sites, kept apart from
  the user's. QEMU 7.2 runs every block on a breakpoint's page one instruction at a
  time, so code sharing a page with a trap runs 30-70x slower.

The cost: one stop per semihosting call, about 3 ms each here (a hold, a ^C, a few
gdbstub steps up to the trap and over it; 1000 SYS_WRITEC calls take ~3.4 s against
~13 ms without traps). Programs that print through semihosting one character at a time
pay it per character; ``MachineOptions.extra["semihosting_traps"] = "off"`` turns the
scan off (QEMU then exits on its own at SYS_EXIT, as before: state EXITED, QEMU gone).

Trap sites: Thumb ``bkpt 0xab`` (halfword 0xBEAB, 2-byte aligned); RISC-V the
uncompressed sequence ``slli x0,x0,0x1f; ebreak; srai x0,x0,7`` (the site is the
``ebreak``). A match inside data is harmless: never translated, and a breakpoint there
never fires; a stop at a site checks the instruction bytes again before trusting them.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable

from machineserver.server.drivers.base import Arch, ProgramImage
from machineserver.server.drivers.qemu.gate import InstructionGate
from machineserver.server.drivers.qemu.gate_channel import MAX_TRAPS
from machineserver.server.drivers.qemu.points import PointTable
from machineserver.server.rsp import RspClient, StopReply

SYS_EXIT = 0x18
SYS_EXIT_EXTENDED = 0x20
ADP_STOPPED_APPLICATION_EXIT = 0x20026

THUMB_BKPT_AB = struct.pack("<H", 0xBEAB)
RISCV_SLLI = struct.pack("<I", 0x01F01013)  # slli x0, x0, 0x1f
RISCV_EBREAK = struct.pack("<I", 0x00100073)
RISCV_SRAI = struct.pack("<I", 0x40705013)  # srai x0, x0, 7
RISCV_SEQUENCE = RISCV_SLLI + RISCV_EBREAK + RISCV_SRAI

# where each architecture keeps the operation and its argument
OPERATION_REGISTER = {Arch.ARM_CORTEX_M: "r0", Arch.RISCV32: "x10"}
ARGUMENT_REGISTER = {Arch.ARM_CORTEX_M: "r1", Arch.RISCV32: "x11"}


def find_trap_sites(image: ProgramImage, arch: Arch) -> frozenset[int]:
    """The addresses of the image's semihosting traps."""
    sites: set[int] = set()
    for segment in image.segments:
        data, base = segment.data, segment.address
        if arch is Arch.ARM_CORTEX_M:
            at = data.find(THUMB_BKPT_AB)
            while at >= 0:
                if (base + at) % 2 == 0:
                    sites.add(base + at)
                at = data.find(THUMB_BKPT_AB, at + 1)
        else:
            at = data.find(RISCV_SEQUENCE)
            while at >= 0:
                if (base + at) % 2 == 0:
                    sites.add(base + at + 4)
                at = data.find(RISCV_SEQUENCE, at + 1)
    return frozenset(sites)


def _signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


async def exit_code(operation: int, argument: int,
                    read_memory: Callable[[int, int], Awaitable[bytes | None]]) -> int | None:
    """The exit code QEMU 7.2 would end with for this call on a 32-bit target (as the
    program meant it: the full 32-bit value, signed; the process status would keep its
    low 8 bits), or None when the call is not an exit. SYS_EXIT takes the reason code
    itself (only ADP_Stopped_ApplicationExit means success: 0; anything else 1);
    SYS_EXIT_EXTENDED takes the address of {reason, subcode}: the subcode when the reason
    is ADP_Stopped_ApplicationExit, else 1. A block QEMU cannot read makes it fail the
    call instead of exiting: None (QEMU then performs it)."""
    if operation == SYS_EXIT:
        return 0 if argument == ADP_STOPPED_APPLICATION_EXIT else 1
    if operation == SYS_EXIT_EXTENDED:
        block = await read_memory(argument, 8)
        if block is None or len(block) != 8:
            return None
        reason, subcode = struct.unpack("<II", block)
        return _signed32(subcode) if reason == ADP_STOPPED_APPLICATION_EXIT else 1
    return None


class TrapSites:
    """The loaded image's trap sites, and how they are armed in the running QEMU:
    through the plugin's gate, or as hidden gdbstub breakpoints."""

    def __init__(self, arch: Arch, points: PointTable) -> None:
        self.arch = arch
        self.points = points  # for the hidden breakpoints' insertion
        self.sites: frozenset[int] = frozenset()
        self.gate: InstructionGate | None = None  # the gate holding at them, if any
        self._breakpoints_in: RspClient | None = None  # the QEMU holding our breakpoints

    def __contains__(self, address: object) -> bool:
        return address in self.sites

    def forget(self) -> None:
        """No sites (power on/off); the QEMU they were armed in is gone."""
        self.sites, self.gate, self._breakpoints_in = frozenset(), None, None

    async def install(self, stub: RspClient, gate: InstructionGate | None, sites: Iterable[int]) -> None:
        """Arm ``sites`` in the running QEMU (the VM stopped)."""
        if self._breakpoints_in is stub:
            for site in self.sites:
                await self.points.remove_breakpoint(stub, site, False)
        self._breakpoints_in = None
        self.sites, self.gate = frozenset(sites), None
        if gate is not None and gate.usable and len(self.sites) <= MAX_TRAPS:
            gate.sites.set_traps(self.sites)
            self.gate = gate
            return
        if gate is not None and gate.usable:
            gate.sites.set_traps(())
        for site in self.sites:
            await self.points.insert_breakpoint(stub, site, False)
        self._breakpoints_in = stub

    async def is_trap(self, stub: RspClient, pc: int) -> bool:
        """Whether the site at ``pc`` still holds a trap (the program, or a debugger,
        may have written over it)."""
        if pc not in self.sites:
            return False
        if self.arch is Arch.ARM_CORTEX_M:
            return await stub.read_memory(pc, 2) == THUMB_BKPT_AB
        return await stub.read_memory(pc - 4, 12) == RISCV_SEQUENCE

    async def perform(self, pc: int, step: Callable[[], Awaitable[StopReply]]) -> StopReply:
        """Let QEMU perform the call at ``pc``: one ``step`` that the gate lets through."""
        if self.gate is None:
            return await step()  # a single step passes a breakpoint at the pc
        self.gate.sites.pass_trap(pc)
        try:
            return await step()
        finally:
            self.gate.sites.pass_trap(None)

    def pending(self) -> int | None:
        """The site the gate last held the vCPU before (once)."""
        return self.gate.sites.take_pending_trap() if self.gate is not None else None

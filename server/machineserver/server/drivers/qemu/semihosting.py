"""Semihosting trap sites, so that a program's exit does not end QEMU.

QEMU 7.2 performs semihosting calls itself (``-semihosting-config target=native``) and
ends the *process* on SYS_EXIT / SYS_EXIT_EXTENDED: the machine's registers and memory
would go with it. So when an image is loaded, the driver finds its trap sites (the
instructions that make the calls) and sets hidden breakpoints there; a stop at one reads
the operation register and

* for SYS_EXIT (0x18) and SYS_EXIT_EXTENDED (0x20) decodes the exit code as QEMU does
  and reports the exit, leaving QEMU alive and halted at the trap (state EXITED:
  registers and memory readable; reset or load bring the machine back);
* for any other operation single-steps the trap (QEMU performs the call) and goes on
  silently.

The cost: one stop (a gdbstub round trip, a few hundred microseconds) per semihosting
call. Programs that print through semihosting one character at a time pay it per
character; ``MachineOptions.extra["semihosting_traps"] = "off"`` turns the scan off (QEMU
then exits on its own at SYS_EXIT, as before: state EXITED, QEMU gone).

Trap sites: Thumb ``bkpt 0xab`` (halfword 0xBEAB, 2-byte aligned); RISC-V the
uncompressed sequence ``slli x0,x0,0x1f; ebreak; srai x0,x0,7`` (the site is the
``ebreak``). A match inside data is harmless: a breakpoint there never fires, and a stop
at a site checks the instruction bytes again before trusting them.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from machineserver.server.drivers.base import Arch, ProgramImage

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


def site_bytes(arch: Arch) -> tuple[int, bytes]:
    """(offset from the site, bytes) that must be in memory for a site to be a trap."""
    if arch is Arch.ARM_CORTEX_M:
        return 0, THUMB_BKPT_AB
    return -4, RISCV_SEQUENCE


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

"""Semihosting on the QEMU driver: exits caught at their trap (QEMU kept alive, the
machine readable), other calls performed silently, the old path (QEMU exiting itself)
when the scan is off, and the trap scan and exit-code decoding themselves."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from machineserver.server.drivers.base import (
    Arch,
    MachineState,
    ProgramImage,
    Segment,
    StopReason,
    WrongState,
)
from machineserver.server.drivers.qemu import launch as launch_module
from machineserver.server.drivers.qemu import semihosting
from machineserver.server.drivers.qemu.plugin import PluginStatus
from tests.drivers.qemu_helpers import MachineFactory, boot, halted_at, usable_gate
from tests.helpers.backends import reaped
from tests.helpers.firmware import BOARDS, firmware
from tests.helpers.machines import elf_image

RAM = {"lm3s6965evb": 0x20000000, "mps2-an385": 0x20000000, "netduinoplus2": 0x20000000,
       "sifive_e": 0x80000000}
OPERATION = {"sifive_e": "x10"}


# --------------------------------------------------------------------------- hand-made programs
# Two semihosting calls: SYS_WRITE0 of a string (QEMU writes it to the semihosting
# console, which the driver forwards as console output), then SYS_EXIT_EXTENDED with
# {ADP_Stopped_ApplicationExit, 7}; then a loop that is never reached.


def thumb_program() -> ProgramImage:
    """Cortex-M (mps2-an385: RAM at 0 holds the vector table and the code)."""
    code = struct.pack(
        "<8H",
        0x2004,  # 0x40 movs r0, #4 (SYS_WRITE0)
        0x4903,  # 0x42 ldr r1, [pc, #12] -> the word at 0x50
        0xBEAB,  # 0x44 bkpt 0xab
        0x2020,  # 0x46 movs r0, #0x20 (SYS_EXIT_EXTENDED)
        0x4902,  # 0x48 ldr r1, [pc, #8] -> the word at 0x54
        0xBEAB,  # 0x4a bkpt 0xab
        0xE7FE,  # 0x4c b .
        0xBF00,  # 0x4e nop
    ) + struct.pack("<II", 0x60, 0x70)  # 0x50, 0x54: the string's and the block's address
    image = bytearray(0x80)
    image[0:8] = struct.pack("<II", 0x20001000, 0x41)  # initial SP, reset handler (Thumb)
    image[0x40 : 0x40 + len(code)] = code
    image[0x60 : 0x6C] = b"semihosted\n\0"
    image[0x70:0x78] = struct.pack("<II", semihosting.ADP_STOPPED_APPLICATION_EXIT, 7)
    return ProgramImage((Segment(0, bytes(image)),), entry=0x41, arch=Arch.ARM_CORTEX_M)


def riscv_program(base: int = 0x20400000) -> ProgramImage:
    """RV32 (sifive_e: flash at 0x20400000, where the driver starts it)."""
    call = [0x01F01013, 0x00100073, 0x40705013]  # slli x0,x0,0x1f; ebreak; srai x0,x0,7
    words = [
        0x00400513,  # 0x00 addi a0, zero, 4 (SYS_WRITE0)
        0x00000597,  # 0x04 auipc a1, 0
        0x03C58593,  # 0x08 addi a1, a1, 60 -> base + 0x40
        0x00000013,  # 0x0c nop
        *call,  # 0x10..0x1b (the trap site: the ebreak at 0x14)
        0x02000513,  # 0x1c addi a0, zero, 32 (SYS_EXIT_EXTENDED)
        0x00000597,  # 0x20 auipc a1, 0
        0x03058593,  # 0x24 addi a1, a1, 48 -> base + 0x50
        *call,  # 0x28..0x33 (the ebreak at 0x2c)
        0x0000006F,  # 0x34 j .
    ]
    image = bytearray(0x58)
    code = struct.pack(f"<{len(words)}I", *words)
    image[: len(code)] = code
    image[0x40:0x4C] = b"semihosted\n\0"
    image[0x50:0x58] = struct.pack("<II", semihosting.ADP_STOPPED_APPLICATION_EXIT, 7)
    return ProgramImage((Segment(base, bytes(image)),), entry=base, arch=Arch.RISCV32)


# --------------------------------------------------------------------------- the scan (no QEMU)


def test_trap_sites_are_found_where_the_calls_are() -> None:
    assert semihosting.find_trap_sites(thumb_program(), Arch.ARM_CORTEX_M) == {0x44, 0x4A}
    assert semihosting.find_trap_sites(riscv_program(), Arch.RISCV32) == {0x20400014, 0x2040002C}
    # a 0xBEAB halfword at an odd address is no Thumb instruction
    odd = ProgramImage((Segment(0x101, b"\xab\xbe\x00\x00"),))
    assert semihosting.find_trap_sites(odd, Arch.ARM_CORTEX_M) == frozenset()
    # an ebreak alone is a debugger breakpoint, not a semihosting call
    alone = ProgramImage((Segment(0x1000, struct.pack("<I", 0x00100073)),))
    assert semihosting.find_trap_sites(alone, Arch.RISCV32) == frozenset()


async def test_exit_codes_are_decoded_as_qemu_does() -> None:
    blocks = {0x100: struct.pack("<II", 0x20026, 7), 0x200: struct.pack("<II", 0x20023, 7),
              0x300: struct.pack("<Ii", 0x20026, -2)}

    async def read(address: int, size: int) -> bytes | None:
        return blocks.get(address)

    code = semihosting.exit_code
    assert await code(semihosting.SYS_EXIT, 0x20026, read) == 0
    assert await code(semihosting.SYS_EXIT, 0x20023, read) == 1  # another reason: failure
    assert await code(semihosting.SYS_EXIT_EXTENDED, 0x100, read) == 7
    assert await code(semihosting.SYS_EXIT_EXTENDED, 0x200, read) == 1
    assert await code(semihosting.SYS_EXIT_EXTENDED, 0x300, read) == -2
    assert await code(semihosting.SYS_EXIT_EXTENDED, 0x999, read) is None  # QEMU fails the call
    assert await code(0x04, 0x100, read) is None  # SYS_WRITE0 is no exit


# --------------------------------------------------------------------------- on QEMU


@pytest.mark.parametrize("board_name", BOARDS)
async def test_after_the_exit_qemu_lives_and_the_machine_is_readable(
        machines: MachineFactory, board_name: str) -> None:
    m, ev, _ = await boot(machines, board_name, "hello")
    pid = m.qemu_pid
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert m.state is MachineState.EXITED
    assert not reaped(pid), "QEMU ended with the program"
    regs = await m.regs.read_registers()
    assert regs["pc"] == stop.pc  # halted at the trap, the call not made
    assert regs[OPERATION.get(board_name, "r0")] == semihosting.SYS_EXIT
    ram = RAM[board_name]
    await m.mem.write_memory(ram, b"after the end")
    assert await m.mem.read_memory(ram, 13) == b"after the end"
    with pytest.raises(WrongState):
        await m.run.run()  # the program ended: reset or load first
    await m.reset()
    assert m.state is MachineState.HALTED and m.qemu_pid == pid  # the same QEMU
    ev.console.clear()
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT and bytes(ev.console) == f"Hello from {board_name}!\n".encode()
    assert ev.failures == []


@pytest.mark.parametrize("board_name,program", [("mps2-an385", thumb_program),
                                                ("sifive_e", riscv_program)])
async def test_other_calls_are_performed_silently(machines: MachineFactory, board_name: str,
                                                  program: object) -> None:
    m, ev = machines(board_name)
    await m.power_on()
    await m.load(program())  # type: ignore[operator]
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 7)
    assert bytes(ev.console) == b"semihosted\n"  # SYS_WRITE0, performed by QEMU
    assert len(ev.stops) == 1 and m.state is MachineState.EXITED
    # and by steps: a step onto the SYS_WRITE0 trap performs it, onto the exit ends
    await m.reset()
    ev.console.clear()
    stop = await m.run.step(50)  # the exit comes first (6 or 12 instructions in)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 7)
    assert bytes(ev.console) == b"semihosted\n" and len(ev.stops) == 1


async def test_the_plugin_holds_before_traps(machines: MachineFactory) -> None:
    """With the plugin, no breakpoint marks a trap (QEMU 7.2 would run that page one
    instruction per block): the plugin's gate holds before it."""
    m, ev, _ = await boot(machines, "mps2-an385", "hello")
    gate = usable_gate(m)
    assert m.machine.traps.gate is gate
    holds = gate.holds
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT and gate.holds == holds + 1


async def test_without_the_plugin_hidden_breakpoints_catch_the_exit(
        machines: MachineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_module, "plugin_status",
                        lambda: PluginStatus(None, "no host C compiler (simulated)"))
    for board_name in ("mps2-an385", "sifive_e"):
        m, ev, _ = await boot(machines, board_name, "fault")
        assert m.process.gate is None and m.machine.traps.gate is None
        await m.run.run()
        stop = await ev.next_stop()
        assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 3)
        assert m.state is MachineState.EXITED and m.process.alive
        assert (await m.regs.read_registers(["pc"]))["pc"] == stop.pc


async def test_a_user_breakpoint_on_a_trap_is_the_users(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "mps2-an385", "hello")
    (site,) = m.machine.traps.sites
    await m.bp.set_breakpoint(site)
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, site)
    stop = await m.run.step(1)  # stepping onto the exit trap ends the program
    assert (stop.reason, stop.exit_code, stop.pc) == (StopReason.EXIT, 0, site)
    assert m.state is MachineState.EXITED and len(ev.stops) == 1
    await m.bp.clear_breakpoint(site)  # the user's; the hidden trap stays
    await m.reset()
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.pc) == (StopReason.EXIT, site)
    assert not reaped(m.qemu_pid)


async def test_a_snapshot_carries_its_trap_sites(machines: MachineFactory) -> None:
    m, _, _ = await halted_at(machines, "mps2-an385", "hello", "main")
    blob = await m.snap.save_state()
    other, ev = machines("mps2-an385")
    await other.power_on()  # nothing loaded: no trap sites of its own
    await other.snap.restore_state(blob)
    await other.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert other.state is MachineState.EXITED and other.process.alive


async def test_without_the_scan_qemu_exits_itself(machines: MachineFactory) -> None:
    """extra semihosting_traps=off: the old path. QEMU performs the exit and ends (its
    stop reply carries the code); the machine is EXITED with nothing left to read."""
    m, ev = machines("mps2-an385", semihosting_traps="off")
    await m.power_on()
    path = firmware("mps2-an385", "fault")
    await m.load(elf_image(path))
    assert m.machine.traps.sites == frozenset()
    pid, first = m.qemu_pid, m.process.instance
    assert first is not None
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 3)
    assert m.state is MachineState.EXITED
    await ev.until(lambda: reaped(pid), 5.0)  # ended and reaped
    with pytest.raises(WrongState, match="QEMU"):
        await m.regs.read_registers(["pc"])
    await m.reset()  # a fresh QEMU, the image written again
    second = m.process.instance
    assert second is not None and second is not first
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 3)
    assert ev.failures == []
    await m.power_off()  # nothing of either QEMU is left: sockets, FIFOs, directories
    assert not Path(first.dir).exists() and not Path(second.dir).exists()  # noqa: ASYNC240

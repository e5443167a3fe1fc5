"""Unicorn counts instructions exactly in every slice (drivers/unicorn/blockcount.py: a
native block hook), also in the default mode where slices are not counted (no timer
armed, no icount) and the watchdog ends them.

The reference for each count is a run of the same program in icount mode *without* the
block counter: the slicer then reads Unicorn's own ``count=`` counter (drivers/unicorn/
counter.py), a different mechanism (a native code hook per instruction).

QEMU without icount counts through its TCG plugin (the tests at the end): its references
are QEMU's own icount and crc32's known count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from machineserver.server.drivers.base import MachineState, StopReason
from machineserver.server.drivers.qemu import launch as launch_module
from machineserver.server.drivers.qemu.plugin import PluginStatus
from machineserver.server.drivers.unicorn.blockcount import BlockCounter
from tests.drivers.qemu_helpers import MachineFactory, boot
from tests.drivers.unicorn_helpers import start
from tests.helpers.backends import require_qemu_plugin
from tests.helpers.firmware import BOARDS, elf_address, elf_symbol
from tests.helpers.machines import board

CRC32_LM3S = 55_326_126  # lm3s6965evb crc32.elf: Unicorn count= and a QEMU plugin agree


@contextlib.contextmanager
def unicorn_own_counter() -> Iterator[None]:
    """Machines made inside run without the block counter (Unicorn's count= counter only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockCounter, "attach", classmethod(lambda cls, uc, thumb: None))
        yield


async def run_to_stop(board_name: str, program: str, icount: bool) -> tuple[int, bool, object]:
    m, p, rec = await start(board_name, program, icount=icount)
    await p.run.run()
    stop = await rec.wait_stop()
    counters = m.counters()
    await m.power_off()
    return counters.instructions, counters.exact, stop


@pytest.mark.parametrize("program", ["hello", "fault", "coverage"])
@pytest.mark.parametrize("board_name", BOARDS)
async def test_uncounted_run_to_exit_is_exact(board_name, program):
    insns, exact, stop = await run_to_stop(board_name, program, icount=False)
    with unicorn_own_counter():
        ref, ref_exact, ref_stop = await run_to_stop(board_name, program, icount=True)
    assert ref_exact and ref > 100
    assert exact, "the default mode's count is exact"
    assert insns == ref
    assert (stop.reason, stop.exit_code) == (ref_stop.reason, ref_stop.exit_code) == (StopReason.EXIT, 3 if program == "fault" else 0)


async def test_crc32_uncounted_over_many_slices_is_exact():
    """~55 M instructions: dozens of watchdog-ended slices, each stopped by the hook."""
    insns, exact, stop = await run_to_stop("lm3s6965evb", "crc32", icount=False)
    assert stop.reason == StopReason.EXIT and exact
    assert insns == CRC32_LM3S


async def test_pauses_mid_run_keep_the_count_exact():
    m, p, rec = await start("lm3s6965evb", "crc32")
    pauses = 0
    await p.run.run()
    while m.state == MachineState.RUNNING and pauses < 5:
        await asyncio.sleep(0.02)
        if m.state != MachineState.RUNNING:
            break
        await p.run.pause()
        pauses += 1
        halted = m.counters().instructions
        await asyncio.sleep(0.05)
        assert m.counters().instructions == halted, "a halted machine's count does not move"
        await p.run.run()
    await rec.until(lambda: any(s.reason == StopReason.EXIT for s in rec.stops))
    assert pauses >= 1, "the run ended before the first pause"
    assert m.counters().exact and m.counters().instructions == CRC32_LM3S
    await m.power_off()


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_breakpoint_inside_a_block_counts_only_what_ran(board_name):
    """A breakpoint a few instructions into crc32's function: the slice stops in the
    middle of a translated block; the count is the instructions before the breakpoint."""
    main = elf_symbol(board_name, "crc32", "main")

    async def to_breakpoint(icount: bool) -> tuple[int, bool]:
        m, p, rec = await start(board_name, "crc32", icount=icount)
        await p.bp.set_breakpoint(main + 6)
        await p.run.run()
        stop = await rec.wait_stop()
        assert stop.reason == StopReason.BREAKPOINT and stop.pc == main + 6
        first = m.counters().instructions
        await p.run.step(3)
        stepped = m.counters().instructions - first
        await m.power_off()
        assert stepped == 3
        return first, m.counters().exact

    insns, exact = await to_breakpoint(False)
    with unicorn_own_counter():
        ref, _ = await to_breakpoint(True)
    assert exact and insns == ref


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "mps2-an385", "sifive_e"])
async def test_fault_stop_counts_only_what_ran(board_name):
    """A fault with no handler stops at the faulting instruction, mid-block."""

    async def to_fault(icount: bool) -> tuple[int, int]:
        m, p, rec = await start(board_name, "fault", icount=icount)
        n = 1
        if board_name == "sifive_e":
            await p.bp.set_breakpoint(elf_symbol(board_name, "fault", "main"))
            await p.run.run()
            assert (await rec.wait_stop()).reason == StopReason.BREAKPOINT
            await p.regs.write_register("mtvec", 0)
            n = 2
        else:
            await p.mem.write_memory(board(board_name).vector_table + 4 * 3, b"\0\0\0\0")
        await p.run.run()
        stop = await rec.wait_stop(n)
        assert stop.reason == StopReason.FAULT
        count = m.counters().instructions
        assert m.counters().exact
        await m.power_off()
        return count, stop.pc

    got = await to_fault(False)
    with unicorn_own_counter():
        ref = await to_fault(True)
    assert got == ref


async def test_uart_polling_session_counts_what_it_runs():
    """echo busy-polls the UART for input: the count is exact (no estimate), a pause
    freezes it, and input then runs it to its exit with the count still exact."""
    m, p, rec = await start("mps2-an385", "echo")
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    await asyncio.sleep(0.3)
    await p.run.pause()
    polled = m.counters()
    assert polled.exact and polled.instructions > 1000
    await asyncio.sleep(0.05)
    assert m.counters().instructions == polled.instructions
    await p.console.console_input(b"q")
    await p.run.run()
    await rec.until(lambda: any(s.reason == StopReason.EXIT for s in rec.stops))
    assert m.counters().exact
    assert m.counters().instructions > polled.instructions
    await m.power_off()


# --------------------------------------------------------------------------- QEMU
# Without -icount QEMU's count is the plugin's total (drivers/qemu/gate.py: each translated
# block adds its size when it starts), read from the plugin's shared page at any moment.
# The references: QEMU's own icount (a run with -icount, read at its stops) and the count
# Unicorn and the plugin agree on for crc32.


async def qemu_to_stop(machines: MachineFactory, board_name: str, program: str, *, icount: bool,
                       at: str | None = None) -> tuple[int, bool, object]:
    m, ev, path = await boot(machines, board_name, program, icount=icount)
    if at is not None:
        await m.bp.set_breakpoint(elf_address(path, at))
    await m.run.run()
    stop = await ev.next_stop()
    counters = m.counters()
    await m.machine.power_off()
    return counters.instructions, counters.exact, stop


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "mps2-an385"])
@pytest.mark.parametrize(("program", "at"), [("hello", None), ("crc32", "main"), ("coverage", None)])
async def test_qemu_count_without_icount_is_qemus_own(machines: MachineFactory, board_name: str,
                                                       program: str, at: str | None) -> None:
    """Run to the exit or to a breakpoint: the plugin's count is QEMU's icount, exactly."""
    require_qemu_plugin()
    insns, exact, stop = await qemu_to_stop(machines, board_name, program, icount=False, at=at)
    ref, ref_exact, ref_stop = await qemu_to_stop(machines, board_name, program, icount=True, at=at)
    assert ref_exact and ref > 100
    assert exact, "the plugin counts: exact"
    assert insns == ref
    assert (stop.reason, stop.pc) == (ref_stop.reason, ref_stop.pc)


async def test_qemu_crc32_to_exit_counts_what_unicorn_counts(machines: MachineFactory) -> None:
    require_qemu_plugin()
    insns, exact, stop = await qemu_to_stop(machines, "lm3s6965evb", "crc32", icount=False)
    assert stop.reason == StopReason.EXIT and exact
    assert insns == CRC32_LM3S


async def test_qemu_count_moves_while_running_and_not_while_halted(machines: MachineFactory) -> None:
    """echo busy-polls the UART: its count moves between two reads while QEMU runs (no stop
    in between), stands still while halted, and steps add exactly what they ran."""
    require_qemu_plugin()
    m, ev, _ = await boot(machines, "mps2-an385", "echo")
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    first = m.counters()
    await asyncio.sleep(0.1)
    second = m.counters()
    assert m.state is MachineState.RUNNING
    assert first.exact and second.instructions > first.instructions > 100, (first, second)
    await m.run.pause()
    halted = m.counters()
    assert halted.instructions >= second.instructions
    await asyncio.sleep(0.05)
    assert m.counters().instructions == halted.instructions, "a halted machine's count does not move"
    for n in (1, 20, 5_000):
        before = m.counters().instructions
        assert (await m.run.step(n)).reason is StopReason.STEP
        assert m.counters().instructions - before == n, n
    await m.run.run()
    await asyncio.sleep(0.05)
    assert m.counters().instructions > halted.instructions + 5_021


async def test_qemu_count_survives_a_snapshot_restore(machines: MachineFactory) -> None:
    """A restore starts a new QEMU: the count goes on from the snapshot's."""
    require_qemu_plugin()
    m, ev, path = await boot(machines, "mps2-an385", "crc32")
    await m.bp.set_breakpoint(elf_address(path, "main"))
    await m.run.run()
    await ev.next_stop()
    await m.bp.clear_breakpoint(elf_address(path, "main"))
    saved = m.counters()
    blob = await m.snap.save_state()
    await m.run.step(100)
    await m.snap.restore_state(blob)
    assert m.counters().instructions == saved.instructions
    await m.run.step(100)
    assert m.counters().instructions == saved.instructions + 100


async def test_qemu_without_the_plugin_says_its_count_is_not_exact(machines: MachineFactory) -> None:
    """No plugin (no C compiler): nothing counts without icount; 0, and not exact."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch_module, "plugin_status", lambda: PluginStatus(None, "test: no plugin"))
        m, ev, _ = await boot(machines, "lm3s6965evb", "hello")
        assert m.process.gate is None
        await m.run.run()
        stop = await ev.next_stop()
    assert stop.reason == StopReason.EXIT
    assert m.counters().instructions == 0 and not m.counters().exact

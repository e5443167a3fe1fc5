"""QEMU run control against real QEMU: counted steps (the plugin's instruction gate),
cancellation of step and pause, and single steps that run interrupts like normal
execution (Qqemu.sstep=0x1)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from machineserver.server.drivers.base import MachineState, StopReason
from machineserver.server.drivers.qemu import launch as launch_module
from machineserver.server.drivers.qemu.plugin import PluginStatus
from tests.drivers.qemu_helpers import MachineFactory, boot, halted_at, usable_gate
from tests.helpers.firmware import elf_address
from tests.helpers.machines import cancel

# generous: how long a cancelled step may take to leave the machine halted
CANCEL_BOUND_S = 5.0


# --------------------------------------------------------------------------- counted steps


@pytest.mark.parametrize("board_name", ["mps2-an385", "sifive_e"])
async def test_counted_steps_are_exact_under_icount(machines: MachineFactory, board_name: str) -> None:
    """With icount QEMU counts instructions itself: every step(n) must advance it by n,
    whether it single-steps (n < 16), runs one-instruction blocks, or runs QEMU's normal
    blocks first (n >= 1024)."""
    m, _, _ = await halted_at(machines, board_name, "crc32", "main", icount=True)
    gate = usable_gate(m)
    for n in (1, 15, 16, 700, 5_000, 1_000_003):
        before, counted_before = m.counters().instructions, gate.executed
        stop = await m.run.step(n)
        assert stop.reason is StopReason.STEP, (n, stop)
        assert m.counters().instructions - before == n, n
        # counted by the plugin (with icount its counting is always on)
        assert gate.executed - counted_before == n, n
        assert m.state is MachineState.HALTED
        assert (await m.regs.read_registers(["pc"]))["pc"] == stop.pc


@pytest.mark.parametrize("board_name", ["mps2-an385", "sifive_e"])
async def test_a_counted_step_lands_where_single_steps_do(machines: MachineFactory, board_name: str) -> None:
    """crc32 takes no interrupts: one step(3000) (through the gate) and 3000 step(1)
    (gdbstub single steps) end in the same CPU state."""
    counted, _, _ = await halted_at(machines, board_name, "crc32", "main")
    single, _, _ = await halted_at(machines, board_name, "crc32", "main")
    usable_gate(counted)
    await counted.run.step(3000)
    for _ in range(3000):
        stop = await single.run.step(1)
        assert stop.reason is StopReason.STEP
    assert await counted.regs.read_registers() == await single.regs.read_registers()


async def test_a_huge_step_runs_as_one_counted_continue(machines: MachineFactory) -> None:
    """crc32 ends after ~55 M instructions: step(10^9) reaches its exit as a counted
    continue (the plugin counts them), and returns the exit once."""
    m, ev, _ = await boot(machines, "mps2-an385", "crc32")
    gate = usable_gate(m)
    before = gate.executed
    stop = await m.run.step(10**9)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(ev.console) == b"crc32=0x80f45f04\n"
    assert gate.executed - before > 50_000_000
    assert m.state is MachineState.EXITED and ev.stops == []


async def test_a_step_stops_at_a_breakpoint_on_the_way(machines: MachineFactory) -> None:
    m, ev, path = await boot(machines, "mps2-an385", "crc32")
    usable_gate(m)
    main = elf_address(path, "main")
    await m.bp.set_breakpoint(main)
    stop = await m.run.step(10**6)
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)
    assert ev.stops == [] and m.state is MachineState.HALTED


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("board_name", ["mps2-an385", "sifive_e"])
async def test_a_cancelled_huge_step_leaves_the_machine_halted(machines: MachineFactory, board_name: str) -> None:
    m, ev, _ = await boot(machines, board_name, "echo")  # polls the UART forever
    task = asyncio.create_task(m.run.step(10**9))
    await ev.until(lambda: b"echo ready\n" in ev.console)
    assert not task.done()
    await cancel(task, CANCEL_BOUND_S)
    assert m.state is MachineState.HALTED
    # the gdbstub stream is in sync: every kind of request still gets its own answer
    pc = (await m.regs.read_registers(["pc"]))["pc"]
    assert len(await m.mem.read_memory(pc & ~1, 4)) == 4
    stop = await m.run.step(1)
    assert stop.reason is StopReason.STEP
    assert (await m.run.step(100)).reason is StopReason.STEP  # the gate is usable again
    await m.run.run()
    await m.console.console_input(b"ok\n")
    await ev.until(lambda: b"ok\n" in ev.console)
    assert (await m.run.pause()).reason is StopReason.HALT
    assert ev.stops == [] and ev.failures == []


async def test_a_cancelled_pause_still_stops_the_machine(machines: MachineFactory) -> None:
    """A pause waiting on QEMU (SIGSTOPped here, so the ^C waits) is cancelled; once QEMU
    goes on, the machine stops anyway, and its stop, which nobody returned, is an event."""
    m, ev, _ = await boot(machines, "lm3s6965evb", "echo")
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    pid = m.qemu_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        pause = asyncio.create_task(m.run.pause())
        await asyncio.sleep(0.2)
        assert not pause.done()
        await cancel(pause, CANCEL_BOUND_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    stop = await ev.next_stop()
    assert stop.reason is StopReason.HALT
    assert m.state is MachineState.HALTED
    assert (await m.regs.read_registers(["pc"]))["pc"] == stop.pc
    assert (await m.run.step(1)).reason is StopReason.STEP
    assert ev.failures == [] and len(ev.stops) == 1


async def test_without_the_plugin_steps_fall_back_to_single_steps(
        machines: MachineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the plugin cannot be built (no C compiler; simulated here), QEMU runs
    without it: counted steps are gdbstub single steps, still exact and cancellable."""
    monkeypatch.setattr(launch_module, "plugin_status",
                        lambda: PluginStatus(None, "no host C compiler (simulated)"))
    m, ev, _ = await boot(machines, "mps2-an385", "echo", icount=True)
    inst = m.process.instance
    assert m.process.gate is None and inst is not None
    assert "-plugin" not in inst.command_line({"con": 1, "semi": 2, "gdb": 3, "qmp": 4})
    before = m.counters().instructions
    assert (await m.run.step(50)).reason is StopReason.STEP
    assert m.counters().instructions - before == 50
    task = asyncio.create_task(m.run.step(10**9))
    await asyncio.sleep(0.3)
    assert not task.done()
    await cancel(task, CANCEL_BOUND_S)
    assert m.state is MachineState.HALTED
    assert (await m.run.step(1)).reason is StopReason.STEP
    assert ev.stops == [] and ev.failures == []


# --------------------------------------------------------------------------- single steps


async def test_single_steps_take_interrupts(machines: MachineFactory) -> None:
    """QEMU's gdbstub masks interrupts and stops timers while single-stepping unless told
    otherwise; the driver tells it to step like normal execution, so stepping systick's
    main (SysTick enabled, then wfi) enters SysTick_Handler."""
    m, _, path = await halted_at(machines, "mps2-an385", "systick", "main")
    handler = elf_address(path, "SysTick_Handler")
    for _ in range(4000):
        stop = await m.run.step(1)
        assert stop.reason is StopReason.STEP
        if handler <= stop.pc < handler + 0x40:
            break
    else:
        raise AssertionError("4000 single steps never entered SysTick_Handler")

"""Unicorn driver: the test firmware runs to its expected output on every board."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from machineserver.server.drivers.base import MachineOptions, MachineState, StopReason
from machineserver.server.drivers.unicorn import UnicornBackend
from tests.drivers.unicorn_helpers import start
from tests.helpers.events import Recorder
from tests.helpers.firmware import ARM_BOARDS, BOARDS, elf_address, elf_symbol, firmware
from tests.helpers.machines import Parts, board, elf_image


@pytest.mark.parametrize("board_name", BOARDS)
async def test_hello_prints_and_exits_0(board_name):
    m, p, rec = await start(board_name, "hello")
    await p.run.run()
    stop = await rec.wait_stop()
    assert stop.reason == StopReason.EXIT and stop.exit_code == 0
    assert bytes(rec.console) == f"Hello from {board_name}!\n".encode()
    assert m.state == MachineState.EXITED
    # an exited machine stays inspectable: the pc is where it exited, the code is there
    regs = await p.regs.read_registers(["pc"])
    assert regs["pc"] == stop.pc
    image = elf_image(firmware(board_name, "hello"))
    seg = next(s for s in image.segments if s.data)
    assert await p.mem.read_memory(seg.address, 16) == seg.data[:16]
    await m.power_off()


# program -> (console, exit code); on sifive_e, the timer program is "timer" (the CLINT
# machine timer) and a fault is a trap; elsewhere SysTick (exception 15, real entry and
# return) and a HardFault
RUNS = {
    "crc32": (b"crc32=0x80f45f04\n", 0),
    "systick": (b"ticks=10\n", 0),
    "fault": (b"about to fault\nhardfault\n", 3),  # the guest's own handler ran
    "mmio": (b"mmio=0x656c62a1\n", 0),  # 200000 UART status polls
}
ON_SIFIVE_E = {"systick": ("timer", b"ticks=10\n"), "fault": ("fault", b"about to fault\ntrap mcause=5\n")}


@pytest.mark.parametrize("program", RUNS)
@pytest.mark.parametrize("board_name", BOARDS)
async def test_program_runs_to_its_output_and_exit_code(board_name, program):
    console, exit_code = RUNS[program]
    if board_name == "sifive_e" and program in ON_SIFIVE_E:
        program, console = ON_SIFIVE_E[program]
    m, p, rec = await start(board_name, program)
    await p.run.run()
    stop = await rec.wait_stop()
    assert bytes(rec.console) == console
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, exit_code)
    await m.power_off()


async def test_systick_period_is_exact_in_virtual_time():
    """Ticks every SYSTICK_RELOAD (10000) cycles: the handler first runs at a cycle
    count that is a multiple of the period after SysTick was enabled."""
    m, p, rec = await start("lm3s6965evb", "systick", icount=True)
    path = firmware("lm3s6965evb", "systick")
    handler = elf_address(path, "SysTick_Handler")
    await p.bp.set_breakpoint(handler)
    hits = []
    for i in range(3):
        await p.run.run()
        stop = await rec.wait_stop(i + 1)
        assert stop.reason == StopReason.BREAKPOINT and stop.pc == handler
        hits.append(m.counters().virtual_time_ns)
    periods = {b - a for a, b in itertools.pairwise(hits)}
    assert all(abs(p - 10000 * 1000 / 12) <= 1 for p in periods)  # 10000 cycles at 12 MHz
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_fault_without_handler_is_faulted(board_name):
    m, p, rec = await start(board_name, "fault")
    spec = board(board_name)
    if board_name == "sifive_e":
        main = elf_symbol(board_name, "fault", "main")
        await p.bp.set_breakpoint(main)
        await p.run.run()
        assert (await rec.wait_stop()).reason == StopReason.BREAKPOINT
        await p.regs.write_register("mtvec", 0)
        n = 2
    else:
        await p.mem.write_memory(spec.vector_table + 4 * 3, b"\0\0\0\0")  # no HardFault vector
        n = 1
    await p.run.run()
    stop = await rec.wait_stop(n)
    assert stop.reason == StopReason.FAULT
    assert stop.fault_address == 0xF0000000 or stop.fault_address == 0x40000000
    assert m.state == MachineState.FAULTED
    assert bytes(rec.console) == b"about to fault\n"
    # a faulted machine stays inspectable (and writable) for a post-mortem
    assert (await p.regs.read_registers(["pc"]))["pc"] == stop.pc
    ram = next(r for r in spec.memory if r.kind == "ram" and r.base >= 0x20000000)
    await p.mem.write_memory(ram.base + 0x200, b"post")
    assert await p.mem.read_memory(ram.base + 0x200, 4) == b"post"
    # the machine is still usable: reset and run the program again
    await m.reset()
    assert m.state == MachineState.HALTED
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_echo_with_console_input(board_name):
    m, p, rec = await start(board_name, "echo")
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    await p.console.console_input(b"hi there\n")
    await rec.wait_console(b"hi there\n")
    await p.console.console_input(b"q")
    stop = await rec.wait_stop()
    assert bytes(rec.console) == b"echo ready\nhi there\nbye\n"
    assert stop.exit_code == 0
    await m.power_off()


async def test_fifty_machines_run_concurrently():
    backend = UnicornBackend()
    machines = []
    for i in range(52):
        name = BOARDS[i % len(BOARDS)]
        rec = Recorder()
        m = backend.create_machine(board(name), MachineOptions(), rec)
        await m.power_on()
        await m.load(elf_image(firmware(name, "hello" if i % 2 else "crc32")))
        machines.append((name, i, m, rec))
    await asyncio.gather(*(Parts(m).run.run() for _, _, m, _ in machines))
    stops = await asyncio.gather(*(rec.wait_stop(wait_s=60) for _, _, _, rec in machines))
    for (name, i, m, rec), stop in zip(machines, stops, strict=True):
        want = f"Hello from {name}!\n".encode() if i % 2 else b"crc32=0x80f45f04\n"
        assert bytes(rec.console) == want
        assert stop.exit_code == 0
        await m.power_off()


@pytest.mark.parametrize("board_name", ARM_BOARDS)
async def test_reset_reruns_program(board_name):
    m, p, rec = await start(board_name, "hello")
    await p.run.run()
    await rec.wait_stop()
    await m.reset()
    assert m.counters().instructions == 0
    await p.run.run()
    await rec.wait_stop(2)
    assert bytes(rec.console) == f"Hello from {board_name}!\n".encode() * 2
    await m.power_off()

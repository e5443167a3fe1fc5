"""Unicorn driver: run control, breakpoints, stepping, registers, memory, watchpoints,
power cycling, probe and board support (snapshots: test_unicorn_snapshots.py)."""

from __future__ import annotations

import asyncio

import pytest

from machineserver.server.drivers.base import (
    Arch,
    BadImage,
    BadRequest,
    Feature,
    MachineOptions,
    MachineState,
    ProgramImage,
    Segment,
    StopReason,
    WatchKind,
    WrongState,
)
from machineserver.server.drivers.unicorn import UnicornBackend
from tests.drivers.unicorn_helpers import start
from tests.helpers.events import Recorder
from tests.helpers.firmware import ARM_BOARDS, BOARDS, elf_address, elf_symbol, firmware
from tests.helpers.machines import Parts, board, elf_image


@pytest.mark.parametrize("board_name", BOARDS)
async def test_breakpoint_at_symbol_then_step_off_and_continue(board_name):
    m, p, rec = await start(board_name, "hello")
    main = elf_symbol(board_name, "hello", "main")
    await p.bp.set_breakpoint(main)
    await p.run.run()
    stop = await rec.wait_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)
    assert (await p.regs.read_registers(["pc"]))["pc"] == main
    assert rec.console == b""
    step = await p.run.step(1)
    assert step.reason == StopReason.STEP and step.pc != main
    await p.run.run()
    stop = await rec.wait_stop(2)
    assert stop.reason == StopReason.EXIT
    assert bytes(rec.console) == f"Hello from {board_name}!\n".encode()
    await m.power_off()


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_run_from_breakpoint_steps_off_it(board_name):
    m, p, rec = await start(board_name, "crc32")
    main = elf_symbol(board_name, "crc32", "main")
    await p.bp.set_breakpoint(main)
    await p.run.run()
    assert (await rec.wait_stop()).pc == main
    await p.bp.clear_breakpoint(main)
    await p.run.run()  # resumes from the breakpoint address itself
    assert (await rec.wait_stop(2)).reason == StopReason.EXIT
    await p.bp.clear_breakpoint(main)  # not set (any more): a no-op, as on every backend
    await p.bp.clear_breakpoint(main + 0x40)
    assert len(rec.stops) == 2
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_step_counts_are_exact(board_name):
    m, p, rec = await start(board_name, "crc32")
    for n in (1, 7, 1000, 123457):
        before = m.counters().instructions
        stop = await p.run.step(n)
        assert stop.reason == StopReason.STEP and m.state == MachineState.HALTED
        assert m.counters().instructions - before == n
    assert rec.stops == []  # a step's stop is its return value, never also an event
    # stepping one at a time lands where one multi-step lands
    m2, p2, _ = await start(board_name, "crc32")
    await m.reset()
    await m2.reset()
    for _ in range(300):
        await p.run.step(1)
    await p2.run.step(300)
    assert await p.regs.read_registers() == await p2.regs.read_registers()
    await m.power_off()
    await m2.power_off()


async def test_step_into_systick_handler_and_back():
    """Exception entry/return under stepping keeps counts exact (icount mode)."""
    m, p, rec = await start("mps2-an385", "systick", icount=True)
    handler = elf_symbol("mps2-an385", "systick", "SysTick_Handler")
    await p.bp.set_breakpoint(handler)
    await p.run.run()
    stop = await rec.wait_stop()
    assert stop.pc == handler
    regs = await p.regs.read_registers(["xpsr", "lr", "msp", "sp"])
    assert regs["xpsr"] & 0x1FF == 15  # IPSR: SysTick
    assert regs["lr"] == 0xFFFFFFF9
    for _ in range(40):  # out of the handler through EXC_RETURN
        await p.run.step(1)
        if (await p.regs.read_registers(["xpsr"]))["xpsr"] & 0x1FF == 0:
            break
    assert (await p.regs.read_registers(["xpsr"]))["xpsr"] & 0x1FF == 0
    await m.power_off()


@pytest.mark.parametrize("board_name", ARM_BOARDS)
async def test_cortex_m_registers_read_write(board_name):
    m, p, _ = await start(board_name, "hello")
    names = p.regs.register_names()
    for n in ("r0", "r12", "sp", "lr", "pc", "xpsr", "msp", "psp", "primask", "basepri",
              "faultmask", "control"):
        assert n in names
    regs = await p.regs.read_registers()
    assert regs["sp"] == regs["msp"]
    assert regs["xpsr"] & (1 << 24)
    await p.regs.write_register("r0", 0x12345678)
    await p.regs.write_register("r13", 0x20000100)
    await p.regs.write_register("primask", 1)
    await p.regs.write_register("basepri", 0x40)
    await p.regs.write_register("psp", 0x20000200)
    got = await p.regs.read_registers(["r0", "sp", "msp", "primask", "basepri", "psp"])
    assert got == {"r0": 0x12345678, "sp": 0x20000100, "msp": 0x20000100, "primask": 1,
                   "basepri": 0x40, "psp": 0x20000200}
    pc = regs["pc"]
    await p.regs.write_register("pc", pc + 2)
    assert (await p.regs.read_registers(["pc"]))["pc"] == pc + 2
    with pytest.raises(BadRequest) as err:
        await p.regs.read_registers(["r99"])
    assert err.value.field == "name"
    with pytest.raises(BadRequest):
        await p.regs.write_register("x5", 1)
    await m.power_off()


async def test_riscv_registers_abi_names():
    m, p, _ = await start("sifive_e", "hello")
    await p.regs.write_register("a0", 0xCAFE)
    got = await p.regs.read_registers(["x10", "a0", "zero", "pc"])
    assert got["x10"] == got["a0"] == 0xCAFE
    assert got["zero"] == 0
    assert got["pc"] == elf_image(firmware("sifive_e", "hello")).entry
    await p.regs.write_register("x0", 5)
    assert (await p.regs.read_registers(["x0"]))["x0"] == 0
    with pytest.raises(BadRequest):
        await p.regs.read_registers(["r0"])
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_memory_read_write_and_unmapped(board_name):
    m, p, _ = await start(board_name, "hello")
    ram = next(r for r in board(board_name).memory if r.kind == "ram" and r.base >= 0x20000000)
    addr = ram.base + 0x100
    await p.mem.write_memory(addr, bytes(range(16)))
    assert await p.mem.read_memory(addr, 16) == bytes(range(16))
    with pytest.raises(BadRequest) as err:
        await p.mem.read_memory(0xF0000000, 4)
    assert "0xf0000000" in str(err.value) and err.value.field == "address"
    with pytest.raises(BadRequest):
        await p.mem.write_memory(0xF0000000, b"x")
    uart = board(board_name).peripheral(board(board_name).console)
    with pytest.raises(BadRequest) as err:
        await p.mem.read_memory(uart.base, 4)
    assert "MMIO" in str(err.value)
    with pytest.raises(BadRequest):  # runs off the end of the region
        await p.mem.read_memory(ram.end - 2, 4)
    await m.power_off()


@pytest.mark.parametrize("board_name", ["netduinoplus2", "sifive_e"])
async def test_watchpoint_on_variable(board_name):
    program = "timer" if board_name == "sifive_e" else "systick"
    path = firmware(board_name, program)
    ticks = elf_address(path, "ticks")
    m, p, rec = await start(board_name, program)
    await p.wp.set_watchpoint(ticks, 4, WatchKind.WRITE)
    values = []
    for i in range(3):
        await p.run.run()
        stop = await rec.wait_stop(i + 1)
        assert stop.reason == StopReason.WATCHPOINT
        assert stop.watch_address == ticks and stop.watch_access == "write"
        values.append(stop.watch_value)
        assert int.from_bytes(await p.mem.read_memory(ticks, 4), "little") == stop.watch_value
    assert values == [0, 1, 2]  # bss clearing at startup, then the first two ticks
    await p.wp.clear_watchpoint(ticks, 4, WatchKind.WRITE)
    await p.wp.set_watchpoint(ticks, 4, WatchKind.READ)
    await p.run.run()
    stop = await rec.wait_stop(4)
    assert stop.reason == StopReason.WATCHPOINT and stop.watch_access == "read"
    await p.wp.clear_watchpoint(ticks, 4, WatchKind.READ)
    await p.run.run()
    stop = await rec.wait_stop(5)
    assert stop.reason == StopReason.EXIT and bytes(rec.console) == b"ticks=10\n"
    await m.power_off()


async def test_watchpoint_sizes_and_ranges():
    m, p, _ = await start("lm3s6965evb", "systick")
    ram = next(r for r in board("lm3s6965evb").memory if r.kind == "ram")
    for size in (0, 3, 5, 16):
        with pytest.raises(BadRequest) as err:
            await p.wp.set_watchpoint(ram.base, size, WatchKind.WRITE)
        assert err.value.field == "size"
    with pytest.raises(BadRequest) as err:
        await p.wp.set_watchpoint(0xF0000000, 4, WatchKind.WRITE)
    assert err.value.field == "address"
    with pytest.raises(BadRequest) as err:
        await p.wp.set_watchpoint(ram.end - 2, 4, WatchKind.WRITE)  # runs off the region
    assert err.value.field == "address"
    for size in (1, 2, 4, 8):
        await p.wp.set_watchpoint(ram.base + 0x100, size, WatchKind.ACCESS)
        await p.wp.set_watchpoint(ram.base + 0x100, size, WatchKind.ACCESS)  # twice: a no-op
        await p.wp.clear_watchpoint(ram.base + 0x100, size, WatchKind.ACCESS)
    # clearing what is not set is a no-op (also a size that can never be set)
    await p.wp.clear_watchpoint(ram.base + 0x100, 4, WatchKind.READ)
    await p.wp.clear_watchpoint(ram.base + 0x100, 3, WatchKind.READ)
    await m.power_off()


async def test_breakpoints_and_watchpoints_survive_power_cycle():
    """Set while off, kept across power_off/power_on, cleared while off."""
    path = firmware("netduinoplus2", "systick")
    ticks, main = elf_address(path, "ticks"), elf_address(path, "main")
    rec = Recorder()
    m = UnicornBackend().create_machine(board("netduinoplus2"), MachineOptions(), rec)
    p = Parts(m)
    await p.bp.set_breakpoint(main)
    await p.wp.set_watchpoint(ticks, 4, WatchKind.WRITE)
    await m.power_on()
    await m.load(elf_image(path))
    await p.run.run()
    assert (await rec.wait_stop()).reason == StopReason.WATCHPOINT  # bss clearing first
    await p.run.run()
    assert (await rec.wait_stop(2)).pc == main
    await m.power_off()
    await p.bp.clear_breakpoint(main)
    await m.power_on()
    await m.load(elf_image(path))
    await p.run.run()
    assert (await rec.wait_stop(3)).reason == StopReason.WATCHPOINT
    await p.run.run()
    stop = await rec.wait_stop(4)
    assert stop.reason == StopReason.WATCHPOINT and stop.watch_value == 1  # main's breakpoint is gone
    await m.power_off()


async def test_memory_while_running_and_registers_refused():
    """Unicorn reads and writes memory between slices of a running machine (the lock
    hand-off); registers need the machine stopped."""
    path = firmware("lm3s6965evb", "echo")
    m, p, rec = await start("lm3s6965evb", "echo")  # polls the UART forever
    assert p.mem.access_while_running
    image = elf_image(path)
    code = next(s for s in image.segments if s.data)
    scratch = elf_address(path, "_ebss") + 0x100
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    for i in range(20):
        assert m.state == MachineState.RUNNING
        data = bytes((i + k) & 0xFF for k in range(16))
        await p.mem.write_memory(scratch, data)
        assert await p.mem.read_memory(scratch, 16) == data
        assert await p.mem.read_memory(code.address, 32) == code.data[:32]
    with pytest.raises(BadRequest):
        await p.mem.read_memory(0xF0000000, 4)
    with pytest.raises(WrongState):
        await p.regs.read_registers(["pc"])
    with pytest.raises(WrongState):
        await p.regs.write_register("r0", 1)
    await p.console.console_input(b"q")
    assert (await rec.wait_stop()).exit_code == 0
    assert bytes(rec.console) == b"echo ready\nbye\n"
    await m.power_off()


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_pause_while_running(board_name):
    m, p, rec = await start(board_name, "echo")  # polls the UART forever
    await p.run.run()
    await rec.wait_console(b"echo ready\n")
    assert m.state == MachineState.RUNNING
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = await p.run.pause()
    assert loop.time() - t0 < 0.5
    assert stop.reason == StopReason.HALT and m.state == MachineState.HALTED
    assert rec.stops == []  # pause() returns its stop; it is not also an event
    assert (await p.regs.read_registers(["pc"]))["pc"] == stop.pc
    assert (await p.run.pause()).pc == stop.pc  # on a halted machine: where it is
    await p.console.console_input(b"ok\nq")
    await p.run.run()
    assert (await rec.wait_stop(1)).reason == StopReason.EXIT
    assert bytes(rec.console) == b"echo ready\nok\nbye\n"
    await m.power_off()


async def test_power_off_and_on_again():
    m, p, rec = await start("mps2-an385", "hello")
    await m.power_off()
    assert m.state == MachineState.OFF
    await m.power_off()  # idempotent
    with pytest.raises(WrongState):
        await p.regs.read_registers()
    with pytest.raises(WrongState):
        await p.run.step()
    await m.power_on()
    assert m.state == MachineState.HALTED
    await m.load(elf_image(firmware("mps2-an385", "hello")))
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    assert bytes(rec.console) == b"Hello from mps2-an385!\n"
    await m.power_off()


async def test_bad_images_rejected():
    m, _, _ = await start("lm3s6965evb", "hello")
    with pytest.raises(BadImage) as err:
        await m.load(ProgramImage((Segment(0x90000000, b"\0" * 16),), arch=Arch.ARM_CORTEX_M))
    assert "0x90000000-0x9000000f" in str(err.value)
    with pytest.raises(BadImage):
        await m.load(elf_image(firmware("sifive_e", "hello")))
    await m.power_off()


async def test_exit_state_needs_reset_to_run_again():
    m, p, rec = await start("lm3s6965evb", "hello")
    await p.run.run()
    await rec.wait_stop()
    with pytest.raises(WrongState):
        await p.run.run()
    await m.power_off()


def test_probe_and_board_support():
    backend = UnicornBackend()
    info = backend.probe()
    assert info.available and info.version.startswith("2.")
    assert Feature.SNAPSHOTS in info.features and Feature.COVERAGE in info.features
    for name in BOARDS:
        assert backend.board_support(board(name)) is None
    from dataclasses import replace

    bad = replace(board("lm3s6965evb"), cpu="cortex-a9")
    assert "cortex-a9" in backend.board_support(bad)
    spec = board("lm3s6965evb")
    odd = replace(spec, peripherals=(*spec.peripherals,
                                     replace(spec.peripherals[0], name="x", model="gpio-pl061")))
    assert "gpio-pl061" in backend.board_support(odd)

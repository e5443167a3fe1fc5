"""Unicorn driver: run control, breakpoints, stepping, registers, memory, watchpoints,
snapshots, power cycling, probe and board support."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_unicorn_programs import fw, start
from unicorn_helpers import ARM_BOARDS, BOARDS, Recorder, board, elf_image, elf_symbol

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

pytest.importorskip("unicorn")


@pytest.mark.parametrize("board_name", BOARDS)
async def test_breakpoint_at_symbol_then_step_off_and_continue(board_name):
    m, rec = await start(board_name, "hello")
    main = elf_symbol(fw(board_name, "hello"), "main") & ~1
    await m.set_breakpoint(main)
    await m.run()
    stop = await rec.wait_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)
    assert (await m.read_registers(["pc"]))["pc"] == main
    assert rec.console == b""
    step = await m.step(1)
    assert step.reason == StopReason.STEP and step.pc != main
    await m.run()
    stop = await rec.wait_stop(2)
    assert stop.reason == StopReason.EXIT
    assert bytes(rec.console) == f"Hello from {board_name}!\n".encode()
    await m.power_off()


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_run_from_breakpoint_steps_off_it(board_name):
    m, rec = await start(board_name, "crc32")
    main = elf_symbol(fw(board_name, "crc32"), "main") & ~1
    await m.set_breakpoint(main)
    await m.run()
    assert (await rec.wait_stop()).pc == main
    await m.clear_breakpoint(main)
    await m.run()  # resumes from the breakpoint address itself
    assert (await rec.wait_stop(2)).reason == StopReason.EXIT
    with pytest.raises(BadRequest):
        await m.clear_breakpoint(main)
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_step_counts_are_exact(board_name):
    m, _ = await start(board_name, "crc32")
    for n in (1, 7, 1000, 123457):
        before = m.counters().instructions
        stop = await m.step(n)
        assert stop.reason == StopReason.STEP
        assert m.counters().instructions - before == n
    # stepping one at a time lands where one multi-step lands
    m2, _ = await start(board_name, "crc32")
    await m.reset()
    await m2.reset()
    for _ in range(300):
        await m.step(1)
    await m2.step(300)
    assert await m.read_registers() == await m2.read_registers()
    await m.power_off()
    await m2.power_off()


async def test_step_into_systick_handler_and_back():
    """Exception entry/return under stepping keeps counts exact (icount mode)."""
    m, rec = await start("mps2-an385", "systick", icount=True)
    handler = elf_symbol(fw("mps2-an385", "systick"), "SysTick_Handler") & ~1
    await m.set_breakpoint(handler)
    await m.run()
    stop = await rec.wait_stop()
    assert stop.pc == handler
    regs = await m.read_registers(["xpsr", "lr", "msp", "sp"])
    assert regs["xpsr"] & 0x1FF == 15  # IPSR: SysTick
    assert regs["lr"] == 0xFFFFFFF9
    for _ in range(40):  # out of the handler through EXC_RETURN
        await m.step(1)
        if (await m.read_registers(["xpsr"]))["xpsr"] & 0x1FF == 0:
            break
    assert (await m.read_registers(["xpsr"]))["xpsr"] & 0x1FF == 0
    await m.power_off()


@pytest.mark.parametrize("board_name", ARM_BOARDS)
async def test_cortex_m_registers_read_write(board_name):
    m, _ = await start(board_name, "hello")
    names = m.register_names()
    for n in ("r0", "r12", "sp", "lr", "pc", "xpsr", "msp", "psp", "primask", "basepri",
              "faultmask", "control"):
        assert n in names
    regs = await m.read_registers()
    assert regs["sp"] == regs["msp"]
    assert regs["xpsr"] & (1 << 24)
    await m.write_register("r0", 0x12345678)
    await m.write_register("r13", 0x20000100)
    await m.write_register("primask", 1)
    await m.write_register("basepri", 0x40)
    await m.write_register("psp", 0x20000200)
    got = await m.read_registers(["r0", "sp", "msp", "primask", "basepri", "psp"])
    assert got == {"r0": 0x12345678, "sp": 0x20000100, "msp": 0x20000100, "primask": 1,
                   "basepri": 0x40, "psp": 0x20000200}
    pc = regs["pc"]
    await m.write_register("pc", pc + 2)
    assert (await m.read_registers(["pc"]))["pc"] == pc + 2
    with pytest.raises(BadRequest) as err:
        await m.read_registers(["r99"])
    assert err.value.field == "name"
    with pytest.raises(BadRequest):
        await m.write_register("x5", 1)
    await m.power_off()


async def test_riscv_registers_abi_names():
    m, _ = await start("sifive_e", "hello")
    await m.write_register("a0", 0xCAFE)
    got = await m.read_registers(["x10", "a0", "zero", "pc"])
    assert got["x10"] == got["a0"] == 0xCAFE
    assert got["zero"] == 0
    assert got["pc"] == elf_image(fw("sifive_e", "hello")).entry
    await m.write_register("x0", 5)
    assert (await m.read_registers(["x0"]))["x0"] == 0
    with pytest.raises(BadRequest):
        await m.read_registers(["r0"])
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_memory_read_write_and_unmapped(board_name):
    m, _ = await start(board_name, "hello")
    ram = next(r for r in board(board_name).memory if r.kind == "ram" and r.base >= 0x20000000)
    addr = ram.base + 0x100
    await m.write_memory(addr, bytes(range(16)))
    assert await m.read_memory(addr, 16) == bytes(range(16))
    with pytest.raises(BadRequest) as err:
        await m.read_memory(0xF0000000, 4)
    assert "0xf0000000" in str(err.value) and err.value.field == "address"
    with pytest.raises(BadRequest):
        await m.write_memory(0xF0000000, b"x")
    uart = board(board_name).peripheral(board(board_name).console)
    with pytest.raises(BadRequest) as err:
        await m.read_memory(uart.base, 4)
    assert "MMIO" in str(err.value)
    with pytest.raises(BadRequest):  # runs off the end of the region
        await m.read_memory(ram.end - 2, 4)
    await m.power_off()


@pytest.mark.parametrize("board_name", ["netduinoplus2", "sifive_e"])
async def test_watchpoint_on_variable(board_name):
    program = "timer" if board_name == "sifive_e" else "systick"
    path = fw(board_name, program)
    ticks = elf_symbol(path, "ticks")
    m, rec = await start(board_name, program)
    await m.set_watchpoint(ticks, 4, WatchKind.WRITE)
    values = []
    for i in range(3):
        await m.run()
        stop = await rec.wait_stop(i + 1)
        assert stop.reason == StopReason.WATCHPOINT
        assert stop.watch_address == ticks and stop.watch_access == "write"
        values.append(stop.watch_value)
        assert int.from_bytes(await m.read_memory(ticks, 4), "little") == stop.watch_value
    assert values == [0, 1, 2]  # bss clearing at startup, then the first two ticks
    await m.clear_watchpoint(ticks, 4, WatchKind.WRITE)
    await m.set_watchpoint(ticks, 4, WatchKind.READ)
    await m.run()
    stop = await rec.wait_stop(4)
    assert stop.reason == StopReason.WATCHPOINT and stop.watch_access == "read"
    await m.clear_watchpoint(ticks, 4, WatchKind.READ)
    await m.run()
    stop = await rec.wait_stop(5)
    assert stop.reason == StopReason.EXIT and bytes(rec.console) == b"ticks=10\n"
    await m.power_off()


@pytest.mark.parametrize("board_name", ["lm3s6965evb", "sifive_e"])
async def test_pause_while_running(board_name):
    m, rec = await start(board_name, "echo")  # polls the UART forever
    await m.run()
    await rec.wait_console(b"echo ready\n")
    assert m.state == MachineState.RUNNING
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = await m.pause()
    assert loop.time() - t0 < 0.5
    assert stop.reason == StopReason.HALT and m.state == MachineState.HALTED
    assert (await m.read_registers(["pc"]))["pc"] == stop.pc
    await m.console_input(b"ok\nq")
    await m.run()
    assert (await rec.wait_stop(2)).reason == StopReason.EXIT
    assert bytes(rec.console) == b"echo ready\nok\nbye\n"
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
@pytest.mark.parametrize("program", ["crc32", "timer-or-systick"])
async def test_snapshot_restore_is_deterministic(board_name, program):
    if program != "crc32":
        program = "timer" if board_name == "sifive_e" else "systick"
    m, rec = await start(board_name, program)
    await m.step(200 if program != "crc32" else 300000)
    blob = await m.save_state()
    assert isinstance(blob, bytes) and blob.startswith(b"MSUCSNAP")
    mark = len(rec.console)
    await m.run()
    await rec.wait_stop()
    first = (bytes(rec.console[mark:]), await m.read_registers(), m.counters())
    await m.restore_state(blob)
    assert m.state == MachineState.HALTED
    mark = len(rec.console)
    await m.run()
    await rec.wait_stop(2)
    second = (bytes(rec.console[mark:]), await m.read_registers(), m.counters())
    assert first[0] and first[0] == second[0]
    assert first[1] == second[1]
    # into a freshly powered-on machine of the same board
    rec3 = Recorder()
    m3 = UnicornBackend().create_machine(board(board_name), MachineOptions(), rec3)
    await m3.power_on()
    await m3.restore_state(blob)
    await m3.run()
    await rec3.wait_stop()
    assert bytes(rec3.console) == first[0]
    assert await m3.read_registers() == first[1]
    await m3.reset()  # the image came with the snapshot
    await m3.run()
    await rec3.wait_stop(2)
    await m.power_off()
    await m3.power_off()


async def test_snapshot_rejects_other_board_and_garbage():
    m, _ = await start("lm3s6965evb", "hello")
    blob = await m.save_state()
    other, _ = await start("mps2-an385", "hello")
    with pytest.raises(BadRequest):
        await other.restore_state(blob)
    with pytest.raises(BadRequest):
        await m.restore_state(b"garbage")
    await m.power_off()
    await other.power_off()


async def test_power_off_and_on_again():
    m, rec = await start("mps2-an385", "hello")
    await m.power_off()
    assert m.state == MachineState.OFF
    await m.power_off()  # idempotent
    with pytest.raises(WrongState):
        await m.read_registers()
    with pytest.raises(WrongState):
        await m.step()
    await m.power_on()
    assert m.state == MachineState.HALTED
    await m.load(elf_image(fw("mps2-an385", "hello")))
    await m.run()
    assert (await rec.wait_stop()).exit_code == 0
    assert bytes(rec.console) == b"Hello from mps2-an385!\n"
    await m.power_off()


async def test_bad_images_rejected():
    m, _ = await start("lm3s6965evb", "hello")
    with pytest.raises(BadImage) as err:
        await m.load(ProgramImage((Segment(0x90000000, b"\0" * 16),), arch=Arch.ARM_CORTEX_M))
    assert "0x90000000-0x9000000f" in str(err.value)
    with pytest.raises(BadImage):
        await m.load(elf_image(fw("sifive_e", "hello")))
    await m.power_off()


async def test_exit_state_needs_reset_to_run_again():
    m, rec = await start("lm3s6965evb", "hello")
    await m.run()
    await rec.wait_stop()
    with pytest.raises(WrongState):
        await m.run()
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

"""Conformance: breakpoints (symbol, file:line), exact stepping, registers, memory and
watchpoints, one body for every backend."""

from __future__ import annotations

import pytest
from elftools.elf.elffile import ELFFile

from machineserver.sdk import errors
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.backends import BOARD_ARCH
from tests.helpers.conformance import BOARDS, CORE_REGISTERS, Conf
from tests.helpers.firmware import elf_symbol, firmware

# crc32's main starts with a straight-line prologue, then the LCG fill loop:
#   Cortex-M: push movs movs movw ldr ldr | mla adds lsrs cmp.w strb.w bne   (counter r3)
#   RV32:     12 instructions            | mul add addi add srli sb bne    (counter x14/a4)
# so after PROLOGUE + k*LOOP steps the pc is back at the loop head and the counter is k.
STRAIGHT = {"arm-cortex-m": (6, 6, "r3"), "riscv32": (12, 7, "x14")}
UNMAPPED = {"arm-cortex-m": 0x90000000, "riscv32": 0x90000000}
RAM = {"lm3s6965evb": 0x20008000, "mps2-an385": 0x20008000, "sifive_e": 0x80002000}


@pytest.mark.parametrize("board", BOARDS)
async def test_breakpoint_at_main_by_symbol(conf: Conf, board: str) -> None:
    name = await conf.session(board, "hello", power_on=True)
    main = elf_symbol(board, "hello", "main")
    bp = (await conf.client.debug.set_breakpoint(name=name, location={"symbol": "main"})).breakpoint
    assert bp.address == main and bp.source.function == "main" and bp.source.file.endswith("hello.c")
    resp = await conf.client.debug.continue_(name=name, wait=True)
    assert resp.stop.reason == cpb.STOP_REASON_BREAKPOINT and resp.stop.pc == main
    assert resp.stop.location.function == "main" and resp.state == cpb.SESSION_STATE_HALTED
    assert (await conf.registers(name, ["pc"]))["pc"] == main
    assert await conf.console(name) == b""  # nothing printed before main
    listed = (await conf.client.debug.list_breakpoints(name=name)).breakpoints
    assert [(b.id, b.hit_count) for b in listed] == [(bp.id, 1)]
    # continuing from the breakpoint's own address does not hit it again
    done = await conf.client.debug.continue_(name=name, wait=True)
    assert done.stop.reason == cpb.STOP_REASON_EXIT and done.state == cpb.SESSION_STATE_EXITED
    assert await conf.console(name) == f"Hello from {board}!\n".encode()
    # the breakpoint survives a reset
    await conf.client.sessions.reset_session(name=name)
    again = await conf.client.debug.continue_(name=name, wait=True)
    assert again.stop.reason == cpb.STOP_REASON_BREAKPOINT and again.stop.pc == main


@pytest.mark.parametrize("board", BOARDS)
async def test_breakpoint_by_file_line(conf: Conf, board: str) -> None:
    name = await conf.session(board, "coverage", power_on=True)
    func = await conf.client.debug.resolve_symbol(name=name, symbol="called_three_times")
    assert func.address == elf_symbol(board, "coverage", "called_three_times")
    where = f"coverage.c:{func.source.line}"
    bp = (await conf.client.debug.set_breakpoint(name=name, location={"file_line": where})).breakpoint
    assert bp.source.function == "called_three_times" and bp.source.line == func.source.line
    for _ in range(3):
        stop = (await conf.client.debug.continue_(name=name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_BREAKPOINT, stop
        assert stop.pc == bp.address and stop.location.function == "called_three_times"
    assert (await conf.client.debug.list_breakpoints(name=name)).breakpoints[0].hit_count == 3
    await conf.client.debug.clear_breakpoint(name=name, id=bp.id)
    await conf.run_to_exit(name)
    assert await conf.console(name) == b"coverage done\n"


@pytest.mark.parametrize("board", BOARDS)
async def test_step_counts_are_exact(conf: Conf, board: str) -> None:
    prologue, loop, counter = STRAIGHT[BOARD_ARCH[board]]
    name = await conf.halted_at(board, "crc32")
    main = elf_symbol(board, "crc32", "main")
    insns = (await conf.client.debug.disassemble(name=name, location={"address": main},
                                                 count=prologue + loop)).instructions
    assert insns[-1].mnemonic in ("bne", "bne.n"), [i.mnemonic for i in insns]
    head = insns[prologue].address
    # one at a time through the prologue and the first loop iteration: pc follows the code
    expected = [i.address for i in insns[1:]] + [head]
    for want in expected:
        step = await conf.client.debug.step(name=name, count=1)
        assert step.stop.reason == cpb.STOP_REASON_STEP and step.state == cpb.SESSION_STATE_HALTED
        assert step.stop.pc == want, (hex(step.stop.pc), hex(want))
    assert (await conf.registers(name, [counter]))[counter] == 1
    # many at once: exactly 99 more loop iterations, not one instruction more or less
    step = await conf.client.debug.step(name=name, count=99 * loop)
    assert step.stop.pc == head
    assert await conf.registers(name, ["pc", counter]) == {"pc": head, counter: 100}
    step = await conf.client.debug.step(name=name, count=loop + 3)
    assert step.stop.pc == insns[prologue + 3].address
    assert (await conf.registers(name, [counter]))[counter] == 102  # the 3rd step of the loop counted
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.step(name=name, count=10**10)


@pytest.mark.parametrize("board", BOARDS)
async def test_registers_read_and_write(conf: Conf, board: str) -> None:
    arch = BOARD_ARCH[board]
    name = await conf.halted_at(board, "hello")
    regs = await conf.registers(name)
    core = CORE_REGISTERS[arch]
    assert set(core) <= set(regs), sorted(set(core) - set(regs))
    assert regs["pc"] == elf_symbol(board, "hello", "main")
    # write every general register (not x0: hardwired zero), read them back
    writable = [r for r in core if r not in ("pc", "x0")]
    values = {r: 0x10203040 + 0x111 * i for i, r in enumerate(writable)}
    if arch == "arm-cortex-m":
        values["sp"] = 0x20000F00  # stays word aligned
    else:
        values["x2"] = 0x80000F00
    for reg, value in values.items():
        w = await conf.client.debug.write_register(name=name, register=reg, value=value)
        assert w.register.name == reg and w.register.value == value
    assert {r: v for r, v in (await conf.registers(name)).items() if r in values} == values
    # pc: write, read back, and the next step executes from there
    target = elf_symbol(board, "hello", "main") + (2 if arch == "arm-cortex-m" else 0)
    await conf.client.debug.write_register(name=name, register="pc", value=target)
    assert (await conf.registers(name, ["pc"]))["pc"] == target
    if arch == "riscv32":
        await conf.client.debug.write_register(name=name, register="x0", value=5)
        assert (await conf.registers(name, ["x0"]))["x0"] == 0
        # ABI names are aliases of the x registers
        abi = await conf.registers(name, ["sp", "ra", "a4"])
        assert abi == {"sp": values["x2"], "ra": values["x1"], "a4": values["x14"]}
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.read_registers(name=name, names=["r99"])
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.write_register(name=name, register=core[1], value=1 << 33)


@pytest.mark.parametrize("board", ["lm3s6965evb", "mps2-an385"])
async def test_special_registers_or_a_clear_no(conf: Conf, board: str) -> None:
    """Cortex-M msp/psp/primask/control: a backend has them (and they agree with the
    core registers), or reading/writing one is INVALID_ARGUMENT naming it. QEMU 7.2's
    gdbstub does not expose them for M-profile cores."""
    name = await conf.halted_at(board, "hello")
    regs = await conf.registers(name)
    specials = ("msp", "psp", "primask", "control")
    if conf.backend == "unicorn":
        assert set(specials) <= set(regs)
    for reg in specials:
        if reg in regs:
            continue
        with pytest.raises(errors.InvalidArgument) as exc:
            await conf.client.debug.read_registers(name=name, names=[reg])
        assert reg in exc.value.message and exc.value.field_violations
        with pytest.raises(errors.InvalidArgument) as exc:
            await conf.client.debug.write_register(name=name, register=reg, value=0)
        assert reg in exc.value.message
    if "msp" in regs:
        assert regs["msp"] == regs["sp"]  # thread mode on the main stack
        assert regs["control"] == 0 and regs["primask"] == 0


@pytest.mark.parametrize("board", BOARDS)
async def test_memory_read_write_and_unmapped(conf: Conf, board: str) -> None:
    arch = BOARD_ARCH[board]
    name = await conf.halted_at(board, "hello")
    ram = RAM[board]
    await conf.client.debug.write_memory(name=name, address=ram, data=b"\x01\x02\x03\x04conformance")
    got = (await conf.client.debug.read_memory(name=name, address=ram, size=15)).data
    assert got == b"\x01\x02\x03\x04conformance"
    # code memory holds the ELF's bytes
    main = elf_symbol(board, "hello", "main")
    with firmware(board, "hello").open("rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        assert text is not None
        want = text.data()[main - text["sh_addr"]: main - text["sh_addr"] + 16]
    assert (await conf.client.debug.read_memory(name=name, address=main, size=16)).data == want
    bad = UNMAPPED[arch]
    with pytest.raises(errors.InvalidArgument) as exc:
        await conf.client.debug.read_memory(name=name, address=bad, size=4)
    assert exc.value.field_violations[0][0] == "address" and f"{bad:08x}" in exc.value.message
    with pytest.raises(errors.InvalidArgument) as exc:
        await conf.client.debug.write_memory(name=name, address=bad, data=b"\0\0\0\0")
    assert exc.value.field_violations[0][0] == "address"
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.read_memory(name=name, address=ram, size=0)
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.read_memory(name=name, address=ram, size=2 << 20)
    # still healthy afterwards
    await conf.run_to_exit(name)
    assert await conf.console(name) == f"Hello from {board}!\n".encode()


@pytest.mark.parametrize(("board", "program", "handler"), [
    ("lm3s6965evb", "systick", "SysTick_Handler"),
    ("mps2-an385", "systick", "SysTick_Handler"),
    ("sifive_e", "timer", "handle_trap"),
])
async def test_watchpoint_on_ticks(conf: Conf, board: str, program: str, handler: str) -> None:
    name = await conf.halted_at(board, program)
    ticks = await conf.client.debug.resolve_symbol(name=name, symbol="ticks")
    assert ticks.address == elf_symbol(board, program, "ticks")
    wp = (await conf.client.debug.set_breakpoint(name=name, location={"address": ticks.address},
                                                 kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=4)).breakpoint
    for expect in (1, 2, 3):
        stop = (await conf.client.debug.continue_(name=name, wait=True)).stop
        assert stop.reason == cpb.STOP_REASON_WATCHPOINT, stop
        assert stop.watch_address == ticks.address and stop.watch_value == expect
        # stopped after the store, inside the interrupt handler
        assert stop.location.function == handler, stop.location
        mem = (await conf.client.debug.read_memory(name=name, address=ticks.address, size=4)).data
        assert int.from_bytes(mem, "little") == expect
    assert (await conf.client.debug.list_breakpoints(name=name)).breakpoints[0].hit_count == 3
    await conf.client.debug.clear_breakpoint(name=name, id=wp.id)
    await conf.run_to_exit(name)
    assert await conf.console(name) == b"ticks=10\n"
    with pytest.raises(errors.InvalidArgument):
        await conf.client.debug.set_breakpoint(name=name, location={"address": ticks.address},
                                               kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=3)


@pytest.mark.parametrize("board", ["mps2-an385", "sifive_e"])
async def test_instruction_counter_with_icount(conf: Conf, board: str) -> None:
    """With the icount option every backend counts retired instructions exactly (QEMU
    counts nothing without it: its counter is icount)."""
    name = await conf.session(board, "crc32", power_on=True, options={"icount": True})
    metrics = conf.client.telemetry.get_session_metrics
    before = (await metrics(name=name)).metrics.instructions
    await conf.client.debug.step(name=name, count=1000)
    assert (await metrics(name=name)).metrics.instructions - before == 1000
    await conf.client.debug.step(name=name, count=1)
    assert (await metrics(name=name)).metrics.instructions - before == 1001
    # the whole program, up to its exit call (after it, QEMU is gone and counts no more):
    # within a few instructions of the TCG plugin's count in tests/firmware/EXPECTED.md
    await conf.client.debug.set_breakpoint(name=name, location={"symbol": "fw_exit"})
    stop = (await conf.client.debug.continue_(name=name, wait=True)).stop
    assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.location.function == "fw_exit"
    assert await conf.console(name) == b"crc32=0x80f45f04\n"
    total = (await metrics(name=name)).metrics.instructions
    expected = {"mps2-an385": 55_326_132, "sifive_e": 76_219_571}[board]
    assert abs(total - expected) < 64, total


@pytest.mark.parametrize("board", ["lm3s6965evb", "sifive_e"])
async def test_breakpoints_edited_while_running(conf: Conf, board: str) -> None:
    """Setting or clearing a breakpoint does not need a halted machine, and does not stop it."""
    name = await conf.session(board, "echo", run=True)  # polls the UART forever
    await conf.console_until(name, b"echo ready\n")
    bp = (await conf.client.debug.set_breakpoint(name=name, location={"symbol": "uart_putc"})).breakpoint
    assert (await conf.state(name)).state == cpb.SESSION_STATE_RUNNING  # type: ignore[attr-defined]
    await conf.client.sessions.write_console(name=name, data=b"x")
    stop = (await conf.wait_state(name, cpb.SESSION_STATE_HALTED)).last_stop  # type: ignore[attr-defined]
    assert stop.reason == cpb.STOP_REASON_BREAKPOINT and stop.pc == bp.address
    assert await conf.console(name) == b"echo ready\n"  # stopped before echoing
    assert stop.location.function == "uart_putc"
    await conf.client.sessions.run_session(name=name)
    await conf.console_until(name, b"echo ready\nx")
    # clear it while running: the next byte is echoed without a stop
    await conf.client.debug.clear_breakpoint(name=name, id=bp.id)
    assert (await conf.state(name)).state == cpb.SESSION_STATE_RUNNING  # type: ignore[attr-defined]
    await conf.client.sessions.write_console(name=name, data=b"yq")
    assert await conf.console_until(name, b"bye\n") == b"echo ready\nxybye\n"
    done = await conf.wait_state(name, cpb.SESSION_STATE_EXITED)
    assert done.last_stop.reason == cpb.STOP_REASON_EXIT  # type: ignore[attr-defined]

"""The QEMU driver against real QEMU (qemu-system-arm / qemu-system-riscv32) running the
real test firmware (tests/firmware, built with `make` when missing).

Every QEMU a test starts is powered off (killed and reaped) by the `machines` fixture,
which also checks that no QEMU child of this process is left behind.
"""

from __future__ import annotations

import asyncio

import pytest

from machineserver.server.drivers.base import (
    Arch,
    BadRequest,
    BoardSpec,
    Feature,
    MachineState,
    NotSupported,
    StopInfo,
    StopReason,
    WatchKind,
    WrongState,
    features_of,
)
from machineserver.server.drivers.qemu import QemuBackend, QemuMachine
from tests.drivers.qemu_helpers import MachineFactory, boot
from tests.helpers.backends import require_backend
from tests.helpers.firmware import BOARDS, elf_address, firmware
from tests.helpers.machines import board, elf_image

# --------------------------------------------------------------------------- backend


def test_probe_reports_version_features_and_limits() -> None:
    require_backend("qemu", "lm3s6965evb")
    info = QemuBackend().probe()
    assert info.available, info.unavailable_reason
    assert info.version.startswith(("7.", "8.", "9.", "10."))
    assert Feature.SNAPSHOTS in info.features
    # coverage is claimed exactly when the TCG plugin could be built here
    assert (Feature.COVERAGE in info.features) == (info.details["coverage_method"] == "tcg-plugin")
    assert info.features <= features_of(QemuMachine)
    assert Feature.SNAPSHOTS in info.board_limits["lm3s6965evb"]
    assert "qemu_version" in info.details


def test_probe_without_qemu_says_why() -> None:
    missing = {Arch.ARM_CORTEX_M: "qemu-system-nonexistent-a", Arch.RISCV32: "qemu-nope-b"}
    backend = QemuBackend(binaries=missing)
    info = backend.probe()
    assert not info.available and "not installed" in info.unavailable_reason
    assert "not installed" in (backend.board_support(board("mps2-an385")) or "")


def test_board_support() -> None:
    backend = QemuBackend()
    for name in BOARDS:
        require_backend("qemu", name)
        assert backend.board_support(board(name)) is None
    spec = board("mps2-an385")
    no_qemu = BoardSpec(spec.name, "", spec.arch, spec.cpu, 1.0, spec.memory)
    assert "names no QEMU machine" in (backend.board_support(no_qemu) or "")
    bogus = BoardSpec(spec.name, "", spec.arch, spec.cpu, 1.0, spec.memory,
                      backend_machines={"qemu": "no-such-board"})
    assert "no machine" in (backend.board_support(bogus) or "")


# --------------------------------------------------------------------------- programs


@pytest.mark.parametrize("board_name", BOARDS)
async def test_hello_crc32_fault(machines: MachineFactory, board_name: str) -> None:
    m, ev, _ = await boot(machines, board_name, "hello")
    assert m.state is MachineState.HALTED
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT and stop.exit_code == 0
    assert bytes(ev.console) == f"Hello from {board_name}!\n".encode()
    assert m.state is MachineState.EXITED

    # load after the program ended: a fresh QEMU, same machine object
    path = firmware(board_name, "crc32")
    await m.load(elf_image(path))
    ev.console.clear()
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(ev.console) == b"crc32=0x80f45f04\n"

    path = firmware(board_name, "fault")
    await m.load(elf_image(path))
    ev.console.clear()
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 3)
    trap = b"hardfault\n" if board_name != "sifive_e" else b"trap mcause=5\n"
    assert bytes(ev.console) == b"about to fault\n" + trap
    assert m.state is MachineState.EXITED and not ev.failures


@pytest.mark.parametrize("board_name,program", [
    ("lm3s6965evb", "systick"), ("mps2-an385", "systick"), ("netduinoplus2", "systick"),
    ("sifive_e", "timer"),
])
async def test_timer_interrupts(machines: MachineFactory, board_name: str, program: str) -> None:
    m, ev, _ = await boot(machines, board_name, program)
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(ev.console) == b"ticks=10\n"


# mps2-an385 is left out: with input arriving while the firmware polls the CMSDK UART,
# QEMU 7.2 often loses the first echoed byte and stalls further input until the VM is
# stopped and resumed (reproduced without the driver's debugging features; under study)
@pytest.mark.parametrize("board_name", ["lm3s6965evb", "netduinoplus2", "sifive_e"])
async def test_echo_console_input(machines: MachineFactory, board_name: str) -> None:
    m, ev, _ = await boot(machines, board_name, "echo")
    await m.run.run()
    # netduinoplus2 drops RX bytes until the firmware enables the USART: wait for it
    await ev.until(lambda: b"echo ready\n" in ev.console)
    await m.console.console_input(b"hi there\n")
    await ev.until(lambda: b"hi there\n" in ev.console)
    await m.console.console_input(b"q")
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(ev.console) == b"echo ready\nhi there\nbye\n"


async def test_icount_counts_instructions(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "mps2-an385", "hello", icount=True)
    assert m.counters().instructions == 0
    path = firmware("mps2-an385", "hello")
    await m.bp.set_breakpoint(elf_address(path, "main"))
    await m.run.run()
    await ev.next_stop()
    first = m.counters()
    assert first.instructions > 10 and first.virtual_time_ns > 0
    await m.run.step(10)
    assert m.counters().instructions == first.instructions + 10


# --------------------------------------------------------------------------- debugging


@pytest.mark.parametrize("board_name", ["mps2-an385", "sifive_e"])
async def test_breakpoint_step_registers_memory(machines: MachineFactory, board_name: str) -> None:
    m, ev, path = await boot(machines, board_name, "hello")
    main = elf_address(path, "main")
    await m.bp.set_breakpoint(main)
    await m.bp.set_breakpoint(main)  # twice: no-op
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, main)
    assert m.state is MachineState.HALTED

    one = await m.run.step()
    assert one.reason is StopReason.STEP and one.pc != main
    more = await m.run.step(3)
    assert more.reason is StopReason.STEP
    assert len(ev.stops) == 1, "step stops must not also be events"

    regs = await m.regs.read_registers()
    names = list(m.regs.register_names())
    assert set(regs) == set(names) and regs["pc"] == more.pc
    if board_name == "sifive_e":
        assert names[:33] == [*(f"x{i}" for i in range(32)), "pc"]
        assert {"mstatus", "mtvec", "mcause"} <= set(names)
        scratch, alias = "x6", "t1"
        ram = 0x80000100
    else:
        assert names[:17] == [*(f"r{i}" for i in range(13)), "sp", "lr", "pc", "xpsr"]
        assert regs["xpsr"] & (1 << 24), "Thumb bit"
        scratch, alias = "r7", "r7"
        ram = 0x20000100
    await m.regs.write_register(scratch, 0xDEADBEEF)
    assert (await m.regs.read_registers([alias]))[alias] == 0xDEADBEEF
    with pytest.raises(BadRequest) as err:
        await m.regs.read_registers(["r99"])
    assert err.value.field == "name"
    with pytest.raises(BadRequest):
        await m.regs.write_register("nope", 1)

    await m.mem.write_memory(ram, b"\x01\x02\x03\x04machineserver")
    assert await m.mem.read_memory(ram, 17) == b"\x01\x02\x03\x04machineserver"
    big = bytes(range(256)) * 40  # several packets
    await m.mem.write_memory(ram + 0x100, big)
    assert await m.mem.read_memory(ram + 0x100, len(big)) == big
    unmapped = 0xF0000000 if board_name != "sifive_e" else 0x40000000
    with pytest.raises(BadRequest) as err:
        await m.mem.read_memory(unmapped, 4)
    assert err.value.field == "address" and f"0x{unmapped:08x}" in str(err.value)
    with pytest.raises(BadRequest):
        await m.mem.write_memory(unmapped, b"\0\0\0\0")

    # run to the end from the breakpoint's neighbourhood
    await m.bp.clear_breakpoint(main)
    await m.bp.clear_breakpoint(main)  # twice: no-op
    await m.regs.write_register(scratch, regs[scratch])
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT


async def test_breakpoint_survives_reset_and_continue_from_it(machines: MachineFactory) -> None:
    m, ev, path = await boot(machines, "netduinoplus2", "hello")
    main = elf_address(path, "main")
    await m.bp.set_breakpoint(main)
    await m.run.run()
    assert (await ev.next_stop()).pc == main
    await m.reset()
    await m.run.run()
    assert (await ev.next_stop()).pc == main
    await m.run.run()  # continues past the breakpoint it sits on
    stop = await ev.next_stop()
    assert stop.reason is StopReason.EXIT and ev.console.count(b"Hello") == 1


async def test_watchpoint_on_variable(machines: MachineFactory) -> None:
    m, ev, path = await boot(machines, "mps2-an385", "systick")
    ticks = elf_address(path, "ticks")
    await m.wp.set_watchpoint(ticks, 4, WatchKind.WRITE)
    await m.run.run()
    stop = await ev.next_stop()
    # the first write is the startup code zeroing .bss
    assert stop.reason is StopReason.WATCHPOINT
    assert (stop.watch_address, stop.watch_value, stop.watch_access) == (ticks, 0, "write")
    await m.run.run()
    stop = await ev.next_stop()  # the first SysTick interrupt
    assert (stop.reason, stop.watch_value) == (StopReason.WATCHPOINT, 1)
    handler = elf_address(path, "SysTick_Handler")
    assert handler <= stop.pc < handler + 0x40
    await m.run.run()
    stop = await ev.next_stop()
    assert stop.reason is StopReason.WATCHPOINT and stop.watch_value == 2
    await m.wp.clear_watchpoint(ticks, 4, WatchKind.WRITE)
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)


async def test_pause_while_running_and_states(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "lm3s6965evb", "echo")
    with pytest.raises(WrongState):
        await m.power_on()
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    with pytest.raises(WrongState):
        await m.regs.read_registers()
    with pytest.raises(WrongState):
        await m.run.step()
    stop = await m.run.pause()
    assert stop.reason is StopReason.HALT and m.state is MachineState.HALTED
    assert ev.stops == [], "a pause's stop must not also be an event"
    regs = await m.regs.read_registers(["pc"])
    assert regs["pc"] == stop.pc
    await m.console.console_input(b"ok\n")  # buffered while halted, read once running
    await m.run.run()
    await ev.until(lambda: b"ok\n" in ev.console)
    await m.reset()
    assert m.state is MachineState.HALTED
    await m.power_off()
    await m.power_off()  # idempotent
    assert m.state is MachineState.OFF
    await m.power_on()  # and back on: empty machine, halted
    assert m.state is MachineState.HALTED


# --------------------------------------------------------------------------- snapshots


async def test_snapshot_restore_is_deterministic(machines: MachineFactory) -> None:
    m, ev, _ = await boot(machines, "mps2-an385", "echo", icount=True)
    await m.run.run()
    await ev.until(lambda: b"echo ready\n" in ev.console)
    await m.run.pause()
    regs = await m.regs.read_registers()
    counters = m.counters()
    blob = await m.snap.save_state()
    assert isinstance(blob, bytes) and len(blob) > 1000

    async def finish() -> tuple[bytes, StopInfo]:
        start = len(ev.console)
        await m.run.run()
        await m.console.console_input(b"abc\nq")
        stop = await ev.next_stop()
        return bytes(ev.console[start:]), stop

    first = await finish()
    assert first[0] == b"abc\nbye\n" and first[1].exit_code == 0
    # restore into the exited machine (a fresh QEMU), twice: same state, same output
    for _ in range(2):
        await m.snap.restore_state(blob)
        assert m.state is MachineState.HALTED
        assert await m.regs.read_registers() == regs
        assert m.counters() == counters
        assert await finish() == first

    # and into another machine of the same board
    other, _ = machines("mps2-an385", icount=True)
    await other.power_on()
    await other.snap.restore_state(blob)
    assert await other.regs.read_registers() == regs
    with pytest.raises(BadRequest):
        await other.snap.restore_state(b"not a snapshot")


async def test_snapshots_refused_on_lm3s6965evb(machines: MachineFactory) -> None:
    m, _, _ = await boot(machines, "lm3s6965evb", "hello")
    with pytest.raises(NotSupported, match="lm3s6965evb"):
        await m.snap.save_state()


async def test_many_machines_at_once(machines: MachineFactory) -> None:
    booted = await asyncio.gather(
        *(boot(machines, b, "hello") for b in (*BOARDS, "mps2-an385"))
    )
    for m, _, _ in booted:
        await m.run.run()
    for (_, ev, _), name in zip(booted, (*BOARDS, "mps2-an385"), strict=True):
        stop = await ev.next_stop()
        assert stop.exit_code == 0 and bytes(ev.console) == f"Hello from {name}!\n".encode()

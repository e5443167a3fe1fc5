"""What keeps a Unicorn lock-step quantum cheap without changing its results
(drivers/unicorn/lockstep.py, quantum_thread.py): long quanta run on one thread per
machine, kept from quantum to quantum and ended with the lock-step (or when idle); short
ones run on the caller's loop; the watched ranges come from the board's memory; a
cancelled quantum on the kept thread leaves the machine usable. Real firmware
(tests/firmware cosim_spin, crc32) on mps2-an385."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import pytest
from unicorn.arm_const import UC_ARM_REG_PC, UC_ARM_REG_R0, UC_ARM_REG_R7, UC_ARM_REG_SP, UC_ARM_REG_XPSR

from machineserver.server.drivers.base import (
    BarrierInput,
    LockStep,
    MachineOptions,
    MachineState,
    ProgramImage,
    Segment,
    StopReason,
)
from machineserver.server.drivers.unicorn import lockstep as lockstep_module
from machineserver.server.drivers.unicorn import quantum_thread
from machineserver.server.drivers.unicorn.cortexm import CortexM
from machineserver.server.drivers.unicorn.machine import UnicornMachine
from machineserver.server.drivers.unicorn.regbatch import RegBatch, RegReader
from tests.drivers.unicorn_helpers import start
from tests.helpers.events import Recorder
from tests.helpers.machines import Parts, board

BOARD = "mps2-an385"
OUT, BELL = 0x20200000, 0x20220000
THREAD = f"lockstep-{BOARD}"
LONG = 100_000  # above INLINE_CYCLES: on the quantum thread
SHORT = 10_000


def quantum_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


async def until(cond, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_the_quanta_sizes_of_this_file_are_on_both_sides_of_the_inline_bound() -> None:
    assert SHORT <= lockstep_module.INLINE_CYCLES < LONG


async def test_long_quanta_share_one_kept_thread_and_end_ends_it() -> None:
    before = set(quantum_threads())
    m, _, _ = await start(BOARD, "cosim_spin", icount=True)
    try:
        lock = m.capability(LockStep)
        now = await lock.begin([])
        seen: set[int] = set()
        for _ in range(5):
            result = await lock.advance(now + LONG, BarrierInput())
            assert result.cycles == now + LONG and result.stop is None
            now = result.cycles
            mine = [t for t in quantum_threads() if t not in before]
            assert len(mine) == 1  # one thread, not one per quantum
            seen.add(mine[0].ident or 0)
        assert len(seen) == 1
        assert threading.current_thread() not in quantum_threads()
        await lock.end()
        await until(lambda: not [t for t in quantum_threads() if t not in before], "the thread to end")
    finally:
        await m.power_off()


async def test_short_quanta_start_no_thread() -> None:
    before = set(quantum_threads())
    m, _, _ = await start(BOARD, "cosim_spin", icount=True)
    try:
        lock = m.capability(LockStep)
        now = await lock.begin([])
        for _ in range(20):
            now = (await lock.advance(now + SHORT, BarrierInput())).cycles
        assert now == 20 * SHORT
        assert set(quantum_threads()) <= before
    finally:
        await m.power_off()


async def test_an_idle_quantum_thread_ends_and_the_next_long_quantum_starts_one(monkeypatch) -> None:
    monkeypatch.setattr(quantum_thread, "IDLE_EXIT_S", 0.05)
    before = set(quantum_threads())
    m, _, _ = await start(BOARD, "cosim_spin", icount=True)
    try:
        lock = m.capability(LockStep)
        now = await lock.begin([])
        now = (await lock.advance(now + LONG, BarrierInput())).cycles
        await until(lambda: not [t for t in quantum_threads() if t not in before], "the idle thread to end")
        result = await lock.advance(now + LONG, BarrierInput())
        assert result.cycles == now + LONG and result.stop is None
    finally:
        await m.power_off()


async def test_power_off_in_lockstep_ends_the_thread() -> None:
    before = set(quantum_threads())
    m, _, _ = await start(BOARD, "cosim_spin", icount=True)
    lock = m.capability(LockStep)
    await lock.advance(await lock.begin([]) + LONG, BarrierInput())
    assert [t for t in quantum_threads() if t not in before]
    await m.power_off()
    await until(lambda: not [t for t in quantum_threads() if t not in before], "the thread to end")


async def test_watched_ranges_match_memory_and_inputs_land_before_the_quantum() -> None:
    m, p, _ = await start(BOARD, "cosim_spin", icount=True)
    try:
        lock = m.capability(LockStep)
        now = await lock.begin([(OUT, 4096), (BELL, 4), (OUT + 6, 3)])
        for size in (SHORT, LONG, SHORT, LONG):
            # a write the firmware never makes: it must show in the next result
            inp = BarrierInput(writes=(Segment(OUT + 0x800, b"mark%d" % size),))
            result = await lock.advance(now + size, inp)
            now = result.cycles
            out, bell, middle = result.watched
            assert out == await p.mem.read_memory(OUT, 4096)
            assert bell == await p.mem.read_memory(BELL, 4)
            assert middle == out[6:9]
            assert out[0x800:0x800 + len(b"mark%d" % size)] == b"mark%d" % size
        assert int.from_bytes(out[:4], "little") > 0  # the firmware published its blocks
    finally:
        await m.power_off()


async def test_inline_and_threaded_quanta_give_the_same_results() -> None:
    """The same 600k cycles in 10k quanta (on the loop) and in 100k quanta (on the thread),
    with doorbell interrupts raised at barriers: same watched bytes and registers."""
    outcomes = []
    for quantum in (SHORT, LONG):
        m, p, _ = await start(BOARD, "cosim_spin", icount=True)
        try:
            lock = m.capability(LockStep)
            now = await lock.begin([(OUT, 64)])
            watched: list[tuple[bytes, ...]] = []
            for _ in range(600_000 // quantum):
                irqs = (30,) if now % LONG == 0 else ()  # a doorbell at every 100k barrier
                result = await lock.advance(now + quantum, BarrierInput(irqs=irqs))
                now = result.cycles
                if now % LONG == 0:
                    watched.append(result.watched)
            regs = await p.regs.read_registers(["pc", "sp", "r0", "r4", "xpsr"])
            outcomes.append((now, watched, regs))
        finally:
            await m.power_off()
    assert outcomes[0] == outcomes[1]


async def test_a_cancelled_long_quantum_on_the_kept_thread_leaves_the_machine_usable() -> None:
    m, _, _ = await start(BOARD, "crc32", icount=True)  # ~55 M instructions
    try:
        lock = m.capability(LockStep)
        now = await lock.begin([])
        now = (await lock.advance(now + LONG, BarrierInput())).cycles  # the thread exists
        task = asyncio.ensure_future(lock.advance(60_000_000, BarrierInput()))
        await until(lambda: m.counters().instructions > now + 1_000_000, "the quantum to run")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.state is MachineState.HALTED
        assert now < m.counters().instructions < 60_000_000
        result = await lock.advance(60_000_000, BarrierInput())  # same thread, to the exit
        assert result.stop is not None and result.stop.reason is StopReason.EXIT
        assert b"crc32=0x80f45f04\n" in result.console
    finally:
        await m.power_off()


# --------------------------------------------------------------------------- registers in batches
# Exception entry and return on the process stack (an RTOS thread): thread mode on the PSP,
# IRQ 30 raised at a barrier while it sleeps in WFI; the handler (on the MSP) records sp,
# CONTROL, PSP and LR at 0x20000000 and clobbers r0-r2 and r12. Assembled with
# arm-none-eabi-as from:
#   0x100: mov.w r0, #0x20002000 ; msr psp, r0 ; movs r0, #2 ; msr control, r0 ; isb
#          ldr r0, =0xE000E100 ; mov.w r1, #1<<30 ; str r1, [r0]      (enable IRQ 30)
#          movs r0..r3, #0x11/#0x22/#0x33/#0x44 ; mov.w r4, #0x0C0C0C0C ; mov r12, r4 ; cpsie i
#   0x12a: wfi ; b 0x12a
#   0x180: mov.w r0, #0x20000000 ; mov r1, sp ; str r1, [r0] ; mrs r1, control ; str r1, [r0, #4]
#          mrs r1, psp ; str r1, [r0, #8] ; str.w lr, [r0, #12] ; movs r2, #0x99 ; mov r12, r2 ; bx lr
PSP_RESET = bytes.fromhex("4ff0202080f30988022080f31488bff36f8f07484ff08041016011202221332244234ff00c34a4466"
                          "2b630bffde7000000e100e0")
PSP_HANDLER = bytes.fromhex("4ff0005069460160eff314814160eff309818160c0f80ce099229446704700bf")
MSP_TOP, PSP_TOP, RECORD = 0x20001000, 0x20002000, 0x20000000


def psp_image() -> ProgramImage:
    vectors = [0] * (16 + 32)
    vectors[0], vectors[1], vectors[16 + 30] = MSP_TOP, 0x101, 0x181
    table = struct.pack(f"<{len(vectors)}I", *vectors)
    return ProgramImage((Segment(0, table), Segment(0x100, PSP_RESET), Segment(0x180, PSP_HANDLER)), entry=0x100)


async def test_an_interrupt_on_the_process_stack_enters_on_msp_and_returns_to_psp() -> None:
    m = UnicornMachine(board(BOARD), lockstep_options(), Recorder())
    await m.power_on()
    try:
        await m.load(psp_image())
        p = Parts(m)
        lock = m.capability(LockStep)
        await lock.begin([(RECORD, 16)])
        asleep = await lock.advance(1_000, BarrierInput())
        assert asleep.idle and asleep.watched == (bytes(16),)
        before = await p.regs.read_registers(["pc", "sp", "psp", "msp", "control"])
        assert (before["sp"], before["psp"], before["msp"], before["control"]) == (PSP_TOP, PSP_TOP, MSP_TOP, 2)
        woke = await lock.advance(2_000, BarrierInput(irqs=(30,)))
        assert woke.idle and woke.stop is None
        sp, control, psp, lr = struct_words(woke.watched[0])
        assert (sp, control & 2, psp, lr) == (MSP_TOP, 0, PSP_TOP - 32, 0xFFFFFFFD)  # in the handler
        after = await p.regs.read_registers(["r0", "r1", "r2", "r3", "r12", "sp", "psp", "msp", "control",
                                             "xpsr", "pc"])
        assert (after["r0"], after["r1"], after["r2"], after["r3"], after["r12"]) == \
            (0x11, 0x22, 0x33, 0x44, 0x0C0C0C0C)  # unstacked: the handler's r0-r2/r12 are gone
        assert (after["sp"], after["psp"], after["msp"], after["control"]) == (PSP_TOP, PSP_TOP, MSP_TOP, 2)
        assert after["xpsr"] & 0x1FF == 0 and after["pc"] == before["pc"]
        frame = struct_words(await p.mem.read_memory(PSP_TOP - 32, 32))
        assert frame[:5] == (0x11, 0x22, 0x33, 0x44, 0x0C0C0C0C) and frame[7] & (1 << 24)
    finally:
        await m.power_off()


def struct_words(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 4}I", data)


def lockstep_options() -> MachineOptions:
    return MachineOptions(icount=True)


@pytest.mark.parametrize("native", [True, False], ids=["native-batch", "binding-calls"])
def test_register_batches_read_and_write_what_the_binding_does(native: bool) -> None:
    uc = CortexM(board(BOARD)).create_uc()
    engine = uc if native else _BindingOnly(uc)
    regs = (UC_ARM_REG_R0, UC_ARM_REG_R7, UC_ARM_REG_SP, UC_ARM_REG_XPSR, UC_ARM_REG_PC)
    for reg, value in zip(regs, (0xDEADBEEF, 7, 0x20000FF8, 0x01000000, 0x201), strict=True):
        uc.reg_write(reg, value)
    batch = RegBatch(engine, regs)
    assert batch.read() == [int(uc.reg_read(r)) & 0xFFFFFFFF for r in regs] == \
        [0xDEADBEEF, 7, 0x20000FF8, 0x01000000, 0x200]  # pc: no Thumb bit
    batch.write((0x12345678, 0xFFFFFFFF + 1 + 9, 0x20000F00, 0x01000000, 0x301))  # masked to 32 bits
    assert [int(uc.reg_read(r)) & 0xFFFFFFFF for r in regs] == [0x12345678, 9, 0x20000F00, 0x01000000, 0x300]
    read_one = RegReader(engine)
    assert read_one(UC_ARM_REG_R0) == 0x12345678 and read_one(UC_ARM_REG_PC) == 0x300
    assert batch.read()[0] == 0x12345678  # the arrays are reused: the next read is fresh
    uc.reg_write(UC_ARM_REG_R0, 5)
    assert batch.read()[0] == 5


class _BindingOnly:
    """An engine with the public register calls only (another binding's shape)."""

    def __init__(self, uc) -> None:
        self._uc = uc

    def reg_read(self, reg: int) -> int:
        return int(self._uc.reg_read(reg))

    def reg_write(self, reg: int, value: int) -> None:
        self._uc.reg_write(reg, value)

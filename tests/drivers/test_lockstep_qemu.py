"""QEMU specifics of LockStep (drivers/qemu/lockstep.py): icount required, boards that
cannot keep lock-step refused (and reported as board limits), quanta that end exactly on
the target cycle whatever their size, console output captured per quantum, and rollback
through QEMU snapshots. The backend-independent contract is tests/drivers/test_lockstep.py."""

from __future__ import annotations

import time

import pytest

from machineserver.server.drivers.base import (
    BarrierInput,
    Feature,
    LockStep,
    MemoryAccess,
    QuantumResult,
    Segment,
    StopReason,
    WrongState,
)
from machineserver.server.drivers.qemu import QemuBackend
from tests.drivers.qemu_helpers import MachineFactory, Qm, boot, usable_gate

BOARD = "mps2-an385"


async def _quanta(lock: LockStep, start: int, quantum: int, limit: int = 400_000) -> list[QuantumResult]:
    out: list[QuantumResult] = []
    cycles = start
    while cycles < limit:
        result = await lock.advance(cycles + quantum, BarrierInput())
        out.append(result)
        if result.stop is not None:
            return out
        assert result.cycles == cycles + quantum
        cycles = result.cycles
    return out


async def test_lockstep_needs_icount(machines: MachineFactory) -> None:
    m, _, _ = await boot(machines, BOARD, "hello")
    with pytest.raises(WrongState, match="icount"):
        await m.machine.capability(LockStep).begin(())


async def test_a_board_without_snapshots_is_refused_and_reported(machines: MachineFactory) -> None:
    info = QemuBackend(spares=0).probe()
    if not info.available:
        pytest.skip(info.unavailable_reason)
    assert Feature.LOCKSTEP in info.features
    reason = info.board_limits["lm3s6965evb"][Feature.LOCKSTEP]
    assert "snapshot" in reason
    assert Feature.LOCKSTEP not in info.board_limits.get(BOARD, {})
    m, _, _ = await boot(machines, "lm3s6965evb", "hello", icount=True)
    with pytest.raises(WrongState, match="lm3s6965evb"):
        await m.machine.capability(LockStep).begin(())


@pytest.mark.parametrize("quantum", [1, 7, 50, 1_000, 100_000])
async def test_quanta_of_any_size_end_exactly_and_agree(machines: MachineFactory, quantum: int) -> None:
    """The exit comes at the same cycle, with the same output, whatever the quantum; each
    quantum ends on its target; nothing goes out as an event."""
    m, ev, _ = await boot(machines, BOARD, "hello", icount=True)
    lock = m.machine.capability(LockStep)
    assert await lock.begin(()) == 0
    results = await _quanta(lock, 0, quantum)
    last = results[-1]
    assert last.stop is not None and last.stop.reason is StopReason.EXIT
    assert (last.cycles, last.stop.pc) == (273, 0x130)
    assert b"".join(r.console for r in results) == b"Hello from mps2-an385!\n"
    assert ev.stops == [] and bytes(ev.console) == b""
    # QEMU's own instruction count agrees: no idle time in this program
    assert m.machine.counters().instructions == 273


async def test_sleeping_quanta_jump_to_the_target_deterministically_beside_a_hog(
        machines: MachineFactory) -> None:
    """systick sleeps in WFI between SysTick interrupts: asleep, a quantum's clock jumps to
    its end (idle); the SysTick wakes it at its own cycle. The same quanta give the same
    results with the host busy (a CPU hog on every core)."""
    import multiprocessing
    import os

    runs = []
    for hog in (False, True):
        hogs = []
        if hog:
            ctx = multiprocessing.get_context("spawn")
            hogs = [ctx.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 2)]
            for p in hogs:
                p.start()
        try:
            m, _, _ = await boot(machines, BOARD, "systick", icount=True)
            lock = m.machine.capability(LockStep)
            start = await lock.begin(())
            results = await _quanta(lock, start, 5_000)
            await m.power_off()
        finally:
            for p in hogs:
                p.kill()
                p.join()
        # idle is a hint, not part of the deterministic result (see QuantumResult.idle)
        runs.append([(r.cycles, r.console, r.stop) for r in results])
        assert any(r.idle for r in results)
        last = results[-1]
        assert last.stop is not None and last.stop.reason is StopReason.EXIT
    assert runs[0] == runs[1]


def _spin() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass


async def test_rollback_replays_the_same_quanta(machines: MachineFactory) -> None:
    m, _, _ = await boot(machines, BOARD, "hello", icount=True)
    lock = m.machine.capability(LockStep)
    await lock.begin(())
    first = await lock.advance(60, BarrierInput())
    t0 = time.perf_counter()
    await lock.checkpoint()
    saved_ms = (time.perf_counter() - t0) * 1e3
    straight = await _quanta(lock, first.cycles, 25)
    t0 = time.perf_counter()
    await lock.rollback()
    restored_ms = (time.perf_counter() - t0) * 1e3
    replay = await _quanta(lock, first.cycles, 25)
    assert replay == straight
    assert straight[-1].stop is not None and straight[-1].cycles == 273
    print(f"checkpoint {saved_ms:.1f} ms, rollback {restored_ms:.1f} ms")


async def test_an_irq_raised_at_a_barrier_is_pending_in_the_nvic_before_anything_runs(
        machines: MachineFactory) -> None:
    """QEMU 7.2's gdbstub writes skip MMIO (an ISPR write through it is lost): the plugin
    sets the line pending from QEMU's main loop, at the barrier itself."""
    from tests.drivers.test_lockstep import DOORBELL_IRQ, sleeper_image

    m, _, _ = await boot(machines, BOARD, "hello", icount=True)
    await m.machine.load(sleeper_image())
    lock = m.machine.capability(LockStep)
    mem = m.machine.capability(MemoryAccess)
    await lock.begin(())
    ispr = 0xE000E200
    assert await mem.read_memory(ispr, 4) == bytes(4)
    result = await lock.advance(0, BarrierInput(irqs=(DOORBELL_IRQ, 5)))
    assert result.cycles == 0  # nothing ran: the bits are pending, not yet taken
    assert int.from_bytes(await mem.read_memory(ispr, 4), "little") == (1 << DOORBELL_IRQ) | (1 << 5)


@pytest.mark.parametrize("quantum", [3_001, 1_000_000])
async def test_a_systick_sleeper_exits_at_one_cycle_whatever_the_quantum(
        machines: MachineFactory, quantum: int) -> None:
    """QEMU 7.2 warped a sleeping CPU's clock when SysTick's timer re-armed itself before
    raising its interrupt (a tick cost two periods in one long quantum, one when the
    quantum's deadline came first). SysTick counts QEMU's 25 MHz clock here and an
    instruction is 32 ns (shift 5): 10 ticks of 10000 are 125000 cycles, plus the code."""
    m, _, _ = await boot(machines, BOARD, "systick", icount=True)
    lock = m.machine.capability(LockStep)
    await lock.begin(())
    results = await _quanta(lock, 0, quantum, limit=2_000_000)
    last = results[-1]
    assert last.stop is not None and last.stop.reason is StopReason.EXIT
    assert last.cycles == 125_198
    assert b"".join(r.console for r in results) == b"ticks=10\n"


def _count_round_trips(m: Qm) -> list[bytes]:
    """Record every packet this machine's gdbstub client sends (its first bytes) and
    every QMP command (as b"qmp:<name>") from now on."""
    sent: list[bytes] = []
    stub = m.process.stub()
    send = stub._send

    async def counted_send(payload: bytes) -> None:
        sent.append(payload[:1])
        await send(payload)

    stub._send = counted_send  # type: ignore[method-assign]
    qmp = m.process.qmp

    async def counted_qmp(command: str, *args: object, **kwargs: object) -> object:
        sent.append(b"qmp:" + command.encode())
        return await qmp(command, *args, **kwargs)

    m.process.qmp = counted_qmp  # type: ignore[method-assign]
    return sent


async def test_a_quantum_is_one_continue_and_its_records_agree_with_the_gdbstub(
        machines: MachineFactory) -> None:
    """A quantum's cost, in round trips (never timed): with no inputs and no breakpoints
    it is one gdbstub continue: the plugin stops the VM at the deadline itself (no ^C),
    records the pc and QEMU's instruction count at the stop (no p, no QMP query-replay)
    and copies the watched ranges (no m). What the records and copies say is what the
    gdbstub and QMP say; a barrier write into a watched range shows in the copies."""
    m, _, _ = await boot(machines, BOARD, "cosim_spin", icount=True)
    usable_gate(m)
    lock = m.machine.capability(LockStep)
    mem = m.machine.capability(MemoryAccess)
    watch = ((0x20200000, 4096), (0x20220000, 4))
    cycles = await lock.begin(watch)
    sent = _count_round_trips(m)
    results = []
    for _ in range(20):
        result = await lock.advance(cycles + 10_000, BarrierInput())
        assert result.stop is None and result.cycles == cycles + 10_000
        cycles = result.cycles
        results.append(result)
    assert sent == [b"c"] * 20
    # the program publishes its progress every ~3,000 instructions: each quantum's copy differs
    assert len({r.watched[0][:8] for r in results}) == 20
    sent.clear()
    assert result.watched == (await mem.read_memory(*watch[0]), await mem.read_memory(*watch[1]))
    replay = await m.process.qmp("query-replay")
    assert isinstance(replay, dict) and replay["icount"] == m.counters().instructions == cycles
    assert m.machine.target.last_pc == int.from_bytes(await m.process.stub().read_register(15), "little")

    sent.clear()
    marker = b"\x5a\xa5\x01\x02"
    result = await lock.advance(cycles + 10_000, BarrierInput(writes=(Segment(0x20200F00, marker),)))
    assert result.stop is None and result.watched[0][0xF00:0xF04] == marker
    assert sent == [b"M", b"c"]
    # a quantum that runs nothing (until = now) stops nowhere: its watched ranges are read
    sent.clear()
    await mem.write_memory(0x20200F00, b"\x11\x22\x33\x44")
    result = await lock.advance(result.cycles, BarrierInput())
    assert result.watched[0][0xF00:0xF04] == b"\x11\x22\x33\x44"
    assert b"m" in sent and b"c" not in sent

"""What keeps a Unicorn lock-step quantum cheap without changing its results
(drivers/unicorn/lockstep.py, quantum_thread.py): long quanta run on one thread per
machine, kept from quantum to quantum and ended with the lock-step (or when idle); short
ones run on the caller's loop; the watched ranges come from the board's memory; a
cancelled quantum on the kept thread leaves the machine usable. Real firmware
(tests/firmware cosim_spin, crc32) on mps2-an385."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from machineserver.server.drivers.base import BarrierInput, LockStep, MachineState, Segment, StopReason
from machineserver.server.drivers.unicorn import lockstep as lockstep_module
from machineserver.server.drivers.unicorn import quantum_thread
from tests.drivers.unicorn_helpers import start

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

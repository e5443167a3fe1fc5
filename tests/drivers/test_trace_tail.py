"""The trace tail (Coverage.coverage_trace): the starts of the last blocks entered, kept by
the coverage hooks in a ring of TRACE_TAIL_MAX. Against real firmware on both backends
(Unicorn's native block callback and its Python fallback; QEMU's TCG plugin), and through
a worker process: the last blocks before a fault or an exit are in the functions that ran
last, in order; a breakpoint at a block's start does not record that block twice; the ring
wraps, freezes at stop, empties at reset, and on QEMU spans a restart."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from machineserver.server.core.symbols import SymbolTable
from machineserver.server.drivers.base import (
    TRACE_TAIL_MAX,
    Backend,
    MachineOptions,
    MachineState,
    StopInfo,
    StopReason,
)
from machineserver.server.drivers.qemu import QemuBackend, tracering
from machineserver.server.drivers.unicorn import UnicornBackend
from machineserver.server.worker.backend import IsolatedBackend
from machineserver.server.worker.pool import WorkerPool
from tests.helpers.backends import no_qemu_left_behind, require_backend, require_qemu_plugin
from tests.helpers.events import Recorder
from tests.helpers.firmware import elf_function, firmware
from tests.helpers.machines import Parts, board, elf_image

BOARD = "mps2-an385"
BACKENDS = ("unicorn", "qemu")

# (backend name, MachineOptions.extra) -> a powered-on machine's parts and events
Make = Callable[..., Awaitable[tuple[Parts, Recorder]]]


def functions(path: Path, trace: list[int]) -> list[str]:
    """The function each traced block starts in ("?" outside every function)."""
    table = SymbolTable(path.read_bytes())
    out = []
    for address in trace:
        fn = table.function_at(address)
        out.append(fn.name if fn is not None else "?")
    return out


def runs(names: list[str]) -> list[str]:
    """``names`` with each run of equal neighbours as one."""
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Machines on the named backend, in this process, with coverage collected from
    power-on; every one powered off at the end, and no QEMU left behind."""
    made: list[Parts] = []
    backends: dict[str, Backend] = {}

    async def start(backend: str, program: str, **extra: str) -> tuple[Parts, Recorder]:
        require_backend(backend, BOARD)
        if backend == "qemu":
            require_qemu_plugin()
        be = backends.get(backend)
        if be is None:
            be = backends[backend] = QemuBackend() if backend == "qemu" else UnicornBackend()
        rec = Recorder()
        m = be.create_machine(board(BOARD), MachineOptions(extra={"coverage": "1", **extra}), rec)
        parts = Parts(m)
        made.append(parts)
        await m.power_on()
        await m.load(elf_image(firmware(BOARD, program)))
        return parts, rec

    with no_qemu_left_behind():
        yield start
        for p in made:
            await p.machine.power_off()
        for be in backends.values():
            await be.aclose()


async def run_to_stop(p: Parts, rec: Recorder) -> StopInfo:
    n = len(rec.stops) + 1
    await p.run.run()
    return await rec.wait_stop(n)


async def traced_run(p: Parts, rec: Recorder) -> tuple[StopInfo, list[int]]:
    """Coverage (re)started, a run to the next stop, and the whole trace tail."""
    await p.cov.coverage_start()
    stop = await run_to_stop(p, rec)
    trace = await p.cov.coverage_trace(TRACE_TAIL_MAX)
    assert trace is not None
    return stop, trace


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_tail_of_a_fault_leads_from_the_faulting_block_into_the_handler(make: Make, backend: str) -> None:
    """fault.c: main loads from an unmapped address; the BusFault escalates to HardFault,
    whose handler prints and exits 3. The trace: main's faulting block, then straight into
    HardFault_Handler, then only what the handler calls, ending in the exit."""
    path = firmware(BOARD, "fault")
    p, rec = await make(backend, "fault")
    stop, trace = await traced_run(p, rec)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 3), stop
    names = functions(path, trace)
    handler = elf_function(path, "HardFault_Handler")
    assert trace.count(handler.start) == 1, names
    entry = trace.index(handler.start)
    assert names[entry - 1] == "main", names[entry - 5:entry + 1]  # the block that faulted
    after = set(names[entry:])
    assert after <= {"HardFault_Handler", "fw_puts", "uart_putc", "fw_exit", "semihost_call"}, after
    assert names[-1] in ("fw_exit", "semihost_call"), names[-5:]
    # the block before the handler holds the faulting load: the instruction before it ran
    assert "main" not in after


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_tail_of_an_exit_holds_the_calls_in_order(make: Make, backend: str) -> None:
    """coverage.c: main calls called_three_times three times, never never_called, then
    prints and exits 0 (fewer than TRACE_TAIL_MAX blocks: the whole run is in the ring)."""
    path = firmware(BOARD, "coverage")
    p, rec = await make(backend, "coverage")
    stop, trace = await traced_run(p, rec)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0), stop
    main, three, never = (elf_function(path, n) for n in ("main", "called_three_times", "never_called"))
    assert 0 < len(trace) < TRACE_TAIL_MAX
    names = functions(path, trace)
    assert names[0] == "Reset_Handler"  # the loaded image halts at its entry
    assert trace.count(main.start) == 1 and trace.count(three.start) == 3
    assert not any(a in never for a in trace)
    calls = [i for i, a in enumerate(trace) if a == three.start]
    assert all(names[i - 1] == "main" for i in calls)  # each call comes from main
    assert names[calls[-1]:].count("fw_puts") > 0 and names[-1] in ("fw_exit", "semihost_call")
    # asking for fewer gives the newest ones, oldest first
    assert await p.cov.coverage_trace(7) == trace[-7:]
    assert await p.cov.coverage_trace(0) == []
    assert await p.cov.coverage_trace(TRACE_TAIL_MAX + 100) == trace


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_breakpoint_at_a_block_start_does_not_record_it_twice(make: Make, backend: str) -> None:
    """Stopped at called_three_times' first instruction three times and resumed: the trace
    is the uninterrupted run's, entry for entry (no block recorded at the stop and again
    when it runs)."""
    path = firmware(BOARD, "coverage")
    three = elf_function(path, "called_three_times")
    p, rec = await make(backend, "coverage")
    _, expected = await traced_run(p, rec)

    q, rec2 = await make(backend, "coverage")
    await q.cov.coverage_start()
    await q.bp.set_breakpoint(three.start)
    for _ in range(3):
        stop = await run_to_stop(q, rec2)
        assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, three.start), stop
    await q.bp.clear_breakpoint(three.start)
    stop = await run_to_stop(q, rec2)
    assert stop.reason == StopReason.EXIT, stop
    trace = await q.cov.coverage_trace(TRACE_TAIL_MAX)
    assert trace is not None and trace.count(three.start) == 3
    if backend == "unicorn":
        assert trace == expected
    else:  # QEMU runs a breakpoint's page in one-instruction blocks: other block starts,
        # the same path through the functions
        assert runs(functions(path, trace)) == runs(functions(path, expected))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_ring_wraps_freezes_at_stop_and_empties_at_reset(make: Make, backend: str) -> None:
    path = firmware(BOARD, "crc32")
    p, rec = await make(backend, "crc32")
    stop, trace = await traced_run(p, rec)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0), stop
    assert len(trace) == TRACE_TAIL_MAX  # crc32 enters far more blocks than the ring holds
    assert functions(path, trace)[-1] in ("fw_exit", "semihost_call")
    assert await p.cov.coverage_trace(5) == trace[-5:]
    await p.cov.coverage_stop()
    assert await p.cov.coverage_trace(TRACE_TAIL_MAX) == trace
    await p.cov.coverage_reset()
    assert await p.cov.coverage_trace(TRACE_TAIL_MAX) == []


async def test_qemu_trace_spans_a_restart(make: Make) -> None:
    """A reset after the exit starts a new QEMU with a new ring: the trace goes on from the
    last one's (coverage.c twice: called_three_times entered six times)."""
    path = firmware(BOARD, "coverage")
    three = elf_function(path, "called_three_times")
    p, rec = await make("qemu", "coverage")
    _, first = await traced_run(p, rec)
    await p.machine.reset()
    await p.machine.load(elf_image(path))
    stop = await run_to_stop(p, rec)
    assert stop.reason == StopReason.EXIT, stop
    both = await p.cov.coverage_trace(TRACE_TAIL_MAX)
    assert both is not None and both[: len(first)] == first
    assert both.count(three.start) == 6


@pytest.mark.parametrize("backend", BACKENDS)
async def test_coverage_trace_off_keeps_counts_and_no_trace(make: Make, backend: str) -> None:
    path = firmware(BOARD, "coverage")
    three = elf_function(path, "called_three_times")
    p, rec = await make(backend, "coverage", coverage_trace="off")
    await p.cov.coverage_start()
    assert (await run_to_stop(p, rec)).reason == StopReason.EXIT
    assert await p.cov.coverage_trace(10) is None
    assert (await p.cov.coverage_blocks())[three.start][1] == 3


async def test_unicorn_first_hit_and_qemu_without_coverage_keep_no_trace(make: Make) -> None:
    p, rec = await make("unicorn", "coverage", coverage_mode="first-hit")
    await p.cov.coverage_start()
    await run_to_stop(p, rec)
    assert await p.cov.coverage_trace(10) is None
    require_backend("qemu", BOARD)
    be = QemuBackend()
    m = be.create_machine(board(BOARD), MachineOptions(), Recorder())
    try:
        assert await Parts(m).cov.coverage_trace(10) is None
    finally:
        await be.aclose()


async def test_unicorn_python_fallback_traces_what_the_native_callback_does(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a C compiler, extra coverage_trace=python keeps the same ring with a Python
    block hook: the same trace as the native callback's, breakpoint stops included."""
    path = firmware(BOARD, "coverage")
    three = elf_function(path, "called_three_times")

    async def run_with_breakpoint(p: Parts, rec: Recorder) -> list[int] | None:
        await p.cov.coverage_start()
        await p.bp.set_breakpoint(three.start)
        stop = await run_to_stop(p, rec)
        assert stop.reason == StopReason.BREAKPOINT
        await p.bp.clear_breakpoint(three.start)
        assert (await run_to_stop(p, rec)).reason == StopReason.EXIT
        return await p.cov.coverage_trace(TRACE_TAIL_MAX)

    native = await run_with_breakpoint(*await make("unicorn", "coverage"))
    from machineserver.server.drivers.unicorn import collector

    monkeypatch.setattr(collector, "native_status", lambda: collector.NativeStatus(None, reason="no gcc"))
    p, rec = await make("unicorn", "coverage", coverage_trace="python")
    assert await p.cov.coverage_trace(10) == []  # collecting from power-on, nothing ran yet
    fallback = await run_with_breakpoint(p, rec)
    assert "Python block hook" in p.cov.method
    assert native is not None and fallback == native and fallback.count(three.start) == 3
    # without asking for it, the fallback keeps no trace (a Python block hook is ~150x)
    q, rec2 = await make("unicorn", "coverage")
    await run_to_stop(q, rec2)
    assert await q.cov.coverage_trace(10) is None


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_trace_through_a_worker_process_is_the_drivers(make: Make, backend: str) -> None:
    path = firmware(BOARD, "coverage")
    p, rec = await make(backend, "coverage")
    _, here = await traced_run(p, rec)
    pool = WorkerPool(1, backends=[backend])
    inner: Backend = QemuBackend() if backend == "qemu" else UnicornBackend()
    isolated = IsolatedBackend(inner, pool)
    rec2 = Recorder()
    m = isolated.create_machine(board(BOARD), MachineOptions(extra={"coverage": "1"}), rec2)
    try:
        await m.power_on()
        assert m.state is MachineState.HALTED
        await m.load(elf_image(path))
        there = Parts(m)
        _, remote = await traced_run(there, rec2)
        assert pool.pids() and remote == here  # deterministic: the same blocks in the same order
        assert await there.cov.coverage_trace(3) == here[-3:]
    finally:
        await m.power_off()
        await pool.close()
        await inner.aclose()


def _ring_file(tmp: Path, capacity: int, written: int, slots: list[int]) -> Path:
    path = tmp / "ring.bin"
    head = tracering.HEADER.pack(tracering.MAGIC, tracering.VERSION, capacity, written)
    path.write_bytes(head + struct.pack(f"<{capacity}Q", *slots))
    return path


def test_ring_reader(tmp_path: Path) -> None:
    """The reader's arithmetic on files laid out as the plugin writes them."""
    assert tracering.read_ring(tmp_path / "missing.bin") == tracering.EMPTY
    # 3 of 8 written: entries 0..2
    ring = tracering.read_ring(_ring_file(tmp_path, 8, 3, [10, 11, 12, 0, 0, 0, 0, 0]))
    assert (ring.written, ring.first, ring.entries) == (3, 0, (10, 11, 12))
    assert ring.since(1) == [11, 12] and ring.since(5) == []
    # 11 of 8 written: entries 3..10, entry n in slot n % 8, oldest first
    slots = [18, 19, 20, 13, 14, 15, 16, 17]
    ring = tracering.read_ring(_ring_file(tmp_path, 8, 11, slots))
    assert (ring.first, list(ring.entries)) == (3, [13, 14, 15, 16, 17, 18, 19, 20])
    assert ring.since(9) == [19, 20] and ring.since(0) == list(ring.entries)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(tracering.HEADER.pack(tracering.MAGIC, 2, 8, 0) + bytes(64))
    with pytest.raises(ValueError, match="version 2"):
        tracering.read_ring(bad)

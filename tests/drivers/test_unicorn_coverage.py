"""Unicorn driver: basic-block coverage (native block counter and first-hit mode): exact
execution counts whatever the slices do (steps, breakpoints in the middle of a block, the
exit trap), counted edges, and the split of blocks at the points slices stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from machineserver.server.core.coverage_mapping import address_counts
from machineserver.server.core.symbols import SymbolTable
from machineserver.server.drivers.base import (
    Blocks,
    Coverage,
    Feature,
    MachineState,
    StopReason,
    WatchKind,
)
from machineserver.server.drivers.unicorn import UnicornBackend
from machineserver.server.drivers.unicorn.collector import split_at_cuts
from tests.drivers import unicorn_helpers
from tests.helpers.firmware import code_addresses, elf_address, elf_function, firmware
from tests.helpers.machines import elf_image, program_analysis

BOARDS = ("mps2-an385", "sifive_e")
MODES = ("counting", "first-hit")


async def start(board_name: str, program: str = "coverage", mode: str = "counting", **extra):
    """A machine that collects coverage (``mode``; ``extra``: more MachineOptions.extra)."""
    return await unicorn_helpers.start(board_name, program, extra={"coverage_mode": mode, **extra})


def inside(blocks, function: range) -> list[int]:
    """The blocks that overlap ``function``."""
    return [a for a, (s, _) in blocks.items() if a < function.stop and a + s > function.start]


def test_backend_reports_coverage_feature():
    assert Coverage in UnicornBackend.machine_class.capabilities
    assert Feature.COVERAGE in UnicornBackend().probe().features


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("board_name", BOARDS)
async def test_coverage_program(board_name, mode):
    m, p, rec = await start(board_name, mode=mode)
    path = firmware(board_name, "coverage")
    main, three, never = (elf_function(path, n) for n in ("main", "called_three_times", "never_called"))
    await p.cov.coverage_start()
    await p.run.run()
    stop = await rec.wait_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(rec.console) == b"coverage done\n"
    blocks = await p.cov.coverage_blocks()
    assert main.start in blocks and three.start in blocks
    assert not inside(blocks, never)
    assert all(size > 0 for size, _ in blocks.values())
    edges = await p.cov.coverage_edges()
    calls = [src for src, dst in edges if dst == three.start]
    assert calls and all(s in main for s in calls)
    if mode == "counting":
        assert blocks[three.start][1] == 3
        assert blocks[main.start][1] == 1
        assert len(calls) == 3  # three call sites, one call each
        assert all(edges[(src, three.start)] == 1 for src in calls)
        # the two conditional branches of main, by their edges' counts (see coverage.c)
        by_branch = branch_edges(path, board_name, edges, "src/coverage.c")
        assert by_branch == {36: (0, 1), 42: (10, 1)}
    else:
        assert all(count == 0 for _, count in blocks.values())
        assert all(count == 0 for count in edges.values())  # taken, count unknown
    await m.power_off()


def branch_edges(path: Path, board_name: str, edges: dict[tuple[int, int], int],
                 file: str) -> dict[int, tuple[int, int]]:
    """line -> (taken, not taken) edge counts of each conditional branch of ``file``."""
    return {site.line: (edges.get((site.address, site.target), 0), edges.get((site.address, site.fallthrough), 0))
            for site in program_analysis(board_name, path).branches if site.file == file}


def per_address(path: Path, blocks: Blocks) -> dict[int, int]:
    """How often the instruction at each address ran (the sum over the blocks holding it)."""
    return address_counts(code_addresses(path), blocks)


async def reference(board_name: str, program: str) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
    """Per-address counts and edges of one uninterrupted run to the exit."""
    m, p, rec = await start(board_name, program)
    await p.cov.coverage_start()
    await p.run.run()
    assert (await rec.wait_stop(1, 60)).reason == StopReason.EXIT
    counts = per_address(firmware(board_name, program), await p.cov.coverage_blocks())
    edges = await p.cov.coverage_edges()
    await m.power_off()
    return counts, edges


@pytest.mark.parametrize(("board_name", "program", "step"), [
    ("mps2-an385", "coverage", 7), ("sifive_e", "coverage", 5), ("mps2-an385", "crc32", 999_983),
])
async def test_counts_are_exact_across_steps(board_name, program, step):
    """A run in counted steps (each ends a slice, mostly in the middle of a block, where
    Unicorn translates a new block for the rest) counts every instruction and every
    transfer as often as one uninterrupted run does."""
    expected, expected_edges = await reference(board_name, program)
    m, p, _ = await start(board_name, program)
    await p.cov.coverage_start()
    for _ in range(100_000):
        stop = await p.run.step(step)
        if stop.reason == StopReason.EXIT:
            break
        assert stop.reason == StopReason.STEP, stop
    assert m.state is MachineState.EXITED
    blocks = await p.cov.coverage_blocks()
    assert per_address(firmware(board_name, program), blocks) == expected
    assert await p.cov.coverage_edges() == expected_edges
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_counts_are_exact_across_breakpoints_inside_a_block(board_name):
    """Breakpoints stop in the middle of a translated block (the loop's increment, 10
    times) and at a block's start (called_three_times, 3 times); while halted there, the
    instruction at the pc has not run; run to the end, the counts are one run's."""
    path = firmware(board_name, "coverage")
    expected, expected_edges = await reference(board_name, "coverage")
    site = next(b for b in program_analysis(board_name, path).branches if b.line == 42)  # the loop branch
    body = site.target  # the loop body's block runs on into the increment and the condition
    increment = min(e.address for e in SymbolTable(path.read_bytes()).lines()
                    if e.line == 42 and body < e.address < site.address)
    three = elf_function(path, "called_three_times").start
    m, p, rec = await start(board_name)
    await p.cov.coverage_start()
    await p.bp.set_breakpoint(increment)
    await p.bp.set_breakpoint(three)
    hits: list[int] = []
    for n in range(1, 14):
        await p.run.run()
        stop = await rec.wait_stop(n)
        assert stop.reason == StopReason.BREAKPOINT, stop
        hits.append(stop.pc)
        now = per_address(path, await p.cov.coverage_blocks())
        assert now[stop.pc] == hits.count(stop.pc) - 1  # halted there: this time has not run
    assert hits == [increment] * 10 + [three] * 3
    await p.bp.clear_breakpoint(increment)
    await p.bp.clear_breakpoint(three)
    await p.run.run()
    assert (await rec.wait_stop(14)).reason == StopReason.EXIT
    assert per_address(path, await p.cov.coverage_blocks()) == expected
    assert await p.cov.coverage_edges() == expected_edges
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_counts_are_exact_across_watchpoint_hits(board_name):
    """A watchpoint stops at the accessing instruction, in the middle of a block, and
    the driver completes the access in a one-instruction slice: every write to ``sink``
    (startup's zeroing, then main's) stops, and the counts are one run's."""
    path = firmware(board_name, "coverage")
    expected, expected_edges = await reference(board_name, "coverage")
    sink = elf_address(path, "sink")
    m, p, rec = await start(board_name)
    await p.cov.coverage_start()
    await p.wp.set_watchpoint(sink, 4, WatchKind.WRITE)
    for n in range(1, 20):
        await p.run.run()
        if (await rec.wait_stop(n)).reason == StopReason.EXIT:
            break
        assert rec.stops[-1].reason == StopReason.WATCHPOINT
    assert n == 7  # six writes to sink (the zeroing of .bss, five in main), then the exit
    assert per_address(path, await p.cov.coverage_blocks()) == expected
    assert await p.cov.coverage_edges() == expected_edges
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_exit_trap_is_not_counted(board_name):
    """The program exits at its semihosting trap; the machine is halted there, so the trap
    has not run (as on QEMU, which stops before it), while the instructions before it
    in the same block have."""
    path = firmware(board_name, "coverage")
    counts, _ = await reference(board_name, "coverage")
    m, p, rec = await start(board_name)
    await p.run.run()
    exit_pc = (await rec.wait_stop()).pc
    await m.power_off()
    start_of_call = elf_function(path, "semihost_call").start
    assert start_of_call < exit_pc  # semihost_call sets up its registers first
    assert counts[exit_pc] == 0
    assert counts[start_of_call] == 1 and counts[exit_pc - 2] == 1


def test_split_at_cuts_keeps_per_address_counts():
    blocks = {0x100: (16, 5), 0x200: (8, 2), 0x108: (8, 1)}
    # 0x100 entered 5 times: once nothing ran (cut at its start), twice it stopped at 0x108
    # and once at 0x10c; 0x108 is also a block of its own (the rest, run after a stop)
    cuts = [(0x100, 0x100, 1), (0x100, 0x108, 2), (0x100, 0x10C, 1), (0x200, 0x200, 2)]
    out = split_at_cuts(blocks, cuts)
    counts = address_counts([*range(0x100, 0x110, 2), 0x200], out)
    assert [counts[a] for a in range(0x100, 0x110, 2)] == [4, 4, 4, 4, 2 + 1, 2 + 1, 1 + 1, 1 + 1]
    assert counts[0x200] == 0 and 0x200 not in out  # never ran past its first instruction
    assert out[0x100] == (8, 4)  # its first piece: entries that ran at least one instruction
    assert split_at_cuts(blocks, []) == blocks


@pytest.mark.parametrize("board_name", BOARDS)
async def test_reset_stop_and_restart(board_name):
    m, p, rec = await start(board_name)
    path = firmware(board_name, "coverage")
    three = elf_function(path, "called_three_times")
    assert await p.cov.coverage_blocks() == {}  # nothing collected before coverage_start
    await p.cov.coverage_start()
    await p.run.run()
    await rec.wait_stop()
    assert await p.cov.coverage_blocks()
    await p.cov.coverage_reset()
    assert await p.cov.coverage_blocks() == {}
    assert not await p.cov.coverage_edges()
    # run again, stop: frozen
    await m.reset()
    await p.run.run()
    await rec.wait_stop(2)
    await p.cov.coverage_stop()
    frozen = await p.cov.coverage_blocks()
    assert frozen[three.start][1] == 3
    await m.reset()
    await p.run.run()
    await rec.wait_stop(3)
    assert await p.cov.coverage_blocks() == frozen
    await p.cov.coverage_reset()
    assert await p.cov.coverage_blocks() == {}
    # start again: a new baseline, counts from here
    await p.cov.coverage_start()
    await m.reset()
    await p.run.run()
    await rec.wait_stop(4)
    assert (await p.cov.coverage_blocks())[three.start][1] == 3
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_start_after_some_execution(board_name):
    m, p, rec = await start(board_name)
    path = firmware(board_name, "coverage")
    main, three = elf_function(path, "main"), elf_function(path, "called_three_times")
    await p.bp.set_breakpoint(three.start)
    await p.run.run()
    stop = await rec.wait_stop()
    assert stop.reason == StopReason.BREAKPOINT
    await p.bp.clear_breakpoint(three.start)
    await p.cov.coverage_start()
    await p.run.run()
    await rec.wait_stop(2)
    blocks = await p.cov.coverage_blocks()
    assert main.start not in blocks  # main's entry ran before coverage_start
    assert blocks[three.start][1] == 3  # the interrupted first call runs again, then two more
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_pause_resume_and_snapshot_restore(board_name):
    m, p, rec = await start(board_name, "crc32")
    await p.cov.coverage_start()
    snap = await p.snap.save_state()
    await p.run.run()
    await asyncio.sleep(0.005)
    await p.run.pause()
    during = await p.cov.coverage_blocks()
    if m.state == MachineState.HALTED:  # paused before the end (a slow host may finish first)
        assert during
        assert rec.stops == []  # the pause's stop is returned, not an event
        await p.run.run()
    stop = await rec.wait_stop()
    assert stop.reason == StopReason.EXIT
    after = await p.cov.coverage_blocks()
    assert after
    for addr, (_, n) in during.items():
        assert after[addr][1] >= n
    # restoring a snapshot keeps collected coverage and collection goes on
    await p.snap.restore_state(snap)
    assert await p.cov.coverage_blocks() == after
    await p.run.run()
    await rec.wait_stop(len(rec.stops) + 1)
    again = await p.cov.coverage_blocks()
    assert set(again) >= set(after)
    assert sum(n for _, n in again.values()) > sum(n for _, n in after.values())
    await m.power_off()


async def test_coverage_from_power_on_and_across_power_cycle():
    m, p, rec = await start("mps2-an385", coverage="1")
    path = firmware("mps2-an385", "coverage")
    three = elf_function(path, "called_three_times")
    await p.run.run()
    await rec.wait_stop()
    assert (await p.cov.coverage_blocks())[three.start][1] == 3
    await m.power_off()
    assert (await p.cov.coverage_blocks())[three.start][1] == 3
    await m.power_on()
    await m.load(elf_image(path))
    await p.run.run()
    await rec.wait_stop(2)
    assert (await p.cov.coverage_blocks())[three.start][1] == 6
    await m.power_off()


async def test_python_fallback_without_compiler(monkeypatch):
    from machineserver.server.drivers.unicorn import collector as cov

    monkeypatch.setattr(cov, "native_status", lambda: cov.NativeStatus(None, reason="no gcc"))
    m, p, rec = await start("mps2-an385")
    path = firmware("mps2-an385", "coverage")
    main, three, never = (elf_function(path, n) for n in ("main", "called_three_times", "never_called"))
    await p.cov.coverage_start()
    assert p.cov.method.startswith("python-edge-generated")
    await p.run.run()
    await rec.wait_stop()
    blocks = await p.cov.coverage_blocks()
    assert main.start in blocks and three.start in blocks and not inside(blocks, never)
    assert any(dst == three.start for _, dst in await p.cov.coverage_edges())
    await m.power_off()

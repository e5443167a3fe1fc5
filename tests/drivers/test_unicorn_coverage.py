"""Unicorn driver: basic-block coverage (native block counter and first-hit mode)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from elftools.elf.elffile import ELFFile
from unicorn_helpers import Recorder, board, elf_image, ensure_firmware, parts

from machineserver.server.drivers.base import (
    Coverage,
    Feature,
    MachineOptions,
    MachineState,
    StopReason,
)
from machineserver.server.drivers.unicorn import UnicornBackend

pytest.importorskip("unicorn")

BOARDS = ("mps2-an385", "sifive_e")
MODES = ("counting", "first-hit")


def fw(board_name: str, program: str) -> Path:
    out = ensure_firmware(board_name)
    if out is None:
        pytest.skip(f"test firmware for {board_name} is not built")
    return out / f"{program}.elf"


def func(path: Path, name: str) -> tuple[int, int]:
    """(start, size) of a function symbol."""
    with path.open("rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        assert sym, name
        return int(sym[0]["st_value"]) & ~1, int(sym[0]["st_size"])


async def start(board_name: str, program: str = "coverage", mode: str = "counting", **extra):
    rec = Recorder()
    opts = MachineOptions(extra={"coverage_mode": mode, **extra})
    m = UnicornBackend().create_machine(board(board_name), opts, rec)
    await m.power_on()
    await m.load(elf_image(fw(board_name, program)))
    return m, parts(m), rec


def inside(blocks, lo: int, size: int) -> list[int]:
    return [a for a, (s, _) in blocks.items() if a < lo + size and a + s > lo]


def test_backend_reports_coverage_feature():
    assert Coverage in UnicornBackend.machine_class.capabilities
    assert Feature.COVERAGE in UnicornBackend().probe().features


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("board_name", BOARDS)
async def test_coverage_program(board_name, mode):
    m, p, rec = await start(board_name, mode=mode)
    path = fw(board_name, "coverage")
    main, three, never = (func(path, n) for n in ("main", "called_three_times", "never_called"))
    await p.cov.coverage_start()
    await p.run.run()
    stop = await rec.wait_stop()
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0)
    assert bytes(rec.console) == b"coverage done\n"
    blocks = await p.cov.coverage_blocks()
    assert main[0] in blocks and three[0] in blocks
    assert not inside(blocks, *never)
    assert all(size > 0 for size, _ in blocks.values())
    edges = await p.cov.coverage_edges()
    calls = [src for src, dst in edges if dst == three[0]]
    assert calls and all(main[0] <= s < main[0] + main[1] for s in calls)
    if mode == "counting":
        assert blocks[three[0]][1] == 3
        assert blocks[main[0]][1] == 1
        in_main = [blocks[a][1] for a in inside(blocks, *main)]
        assert max(in_main) in (10, 11)  # the loop: body 10x, header 11x
        assert len(calls) == 3  # three call sites
        # the if: exactly one of its two successors is reached from the branch
        branches: dict[int, set[int]] = {}
        for src, dst in edges:
            branches.setdefault(src, set()).add(dst)
        assert any(len(d) == 2 for s, d in branches.items() if main[0] <= s < main[0] + main[1])
    else:
        assert all(count == 0 for _, count in blocks.values())
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_reset_stop_and_restart(board_name):
    m, p, rec = await start(board_name)
    path = fw(board_name, "coverage")
    three = func(path, "called_three_times")
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
    assert frozen[three[0]][1] == 3
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
    assert (await p.cov.coverage_blocks())[three[0]][1] == 3
    await m.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_start_after_some_execution(board_name):
    m, p, rec = await start(board_name)
    path = fw(board_name, "coverage")
    main, three = func(path, "main"), func(path, "called_three_times")
    await p.bp.set_breakpoint(three[0])
    await p.run.run()
    stop = await rec.wait_stop()
    assert stop.reason == StopReason.BREAKPOINT
    await p.bp.clear_breakpoint(three[0])
    await p.cov.coverage_start()
    await p.run.run()
    await rec.wait_stop(2)
    blocks = await p.cov.coverage_blocks()
    assert main[0] not in blocks  # main's entry ran before coverage_start
    assert blocks[three[0]][1] == 3  # the interrupted first call runs again, then two more
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
    path = fw("mps2-an385", "coverage")
    three = func(path, "called_three_times")
    await p.run.run()
    await rec.wait_stop()
    assert (await p.cov.coverage_blocks())[three[0]][1] == 3
    await m.power_off()
    assert (await p.cov.coverage_blocks())[three[0]][1] == 3
    await m.power_on()
    await m.load(elf_image(path))
    await p.run.run()
    await rec.wait_stop(2)
    assert (await p.cov.coverage_blocks())[three[0]][1] == 6
    await m.power_off()


async def test_python_fallback_without_compiler(monkeypatch):
    from machineserver.server.drivers.unicorn import collector as cov

    monkeypatch.setattr(cov, "native_status", lambda: cov.NativeStatus(None, reason="no gcc"))
    m, p, rec = await start("mps2-an385")
    path = fw("mps2-an385", "coverage")
    main, three, never = (func(path, n) for n in ("main", "called_three_times", "never_called"))
    await p.cov.coverage_start()
    assert p.cov.method.startswith("python-edge-generated")
    await p.run.run()
    await rec.wait_stop()
    blocks = await p.cov.coverage_blocks()
    assert main[0] in blocks and three[0] in blocks and not inside(blocks, *never)
    assert any(dst == three[0] for _, dst in await p.cov.coverage_edges())
    await m.power_off()

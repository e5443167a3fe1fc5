"""QEMU coverage through the msblocks TCG plugin, against real QEMU running the
coverage test program (tests/firmware/src/coverage.c: known control flow): counts per
translation shape, exact per-address counts when QEMU translates the same code in
different blocks (single instructions on a page with a breakpoint), restarts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machineserver.server.core.coverage_mapping import address_counts
from machineserver.server.drivers import native
from machineserver.server.drivers.base import Feature, MachineState, NotSupported, StopReason
from machineserver.server.drivers.qemu import QemuBackend, blocktable
from machineserver.server.drivers.qemu.coverage import QemuCoverage
from machineserver.server.drivers.qemu.plugin import PluginStatus, plugin_status
from tests.drivers.qemu_helpers import MachineFactory, Qm
from tests.helpers.backends import require_backend, require_qemu_plugin
from tests.helpers.events import Recorder
from tests.helpers.firmware import code_addresses, elf_function, firmware
from tests.helpers.machines import elf_image
from tests.helpers.tools import tool_missing

BOARD = "mps2-an385"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def plugin() -> str:
    return require_qemu_plugin()


def cov(m: Qm) -> QemuCoverage:
    part = m.cov
    assert isinstance(part, QemuCoverage)
    return part


async def loaded(machines: MachineFactory, program: str = "coverage") -> tuple[Qm, Recorder, Path]:
    """A machine that collects coverage, powered on, with ``program`` loaded."""
    m, ev = machines(BOARD, coverage="1")
    await m.power_on()
    path = firmware(BOARD, program)
    await m.load(elf_image(path))
    return m, ev, path


async def run_to_exit(m: Qm, ev: Recorder) -> None:
    n = len(ev.stops) + 1
    await m.run.run()
    stop = await ev.wait_stop(n)
    assert (stop.reason, stop.exit_code) == (StopReason.EXIT, 0), stop
    assert m.state is MachineState.EXITED


def check_coverage_program(blocks: dict[int, tuple[int, int]], path: Path, times: int) -> None:
    main = elf_function(path, "main")
    three = elf_function(path, "called_three_times")
    never = elf_function(path, "never_called")
    assert three.start in blocks, "the entry block of called_three_times was not counted"
    assert blocks[three.start][1] == 3 * times
    assert blocks[main.start][1] == 1 * times
    # every block of main and called_three_times lies inside a function that ran
    in_main = {a: v for a, v in blocks.items() if a in main}
    assert len(in_main) >= 4, in_main  # entry, if/then, loop header/body, calls...
    assert max(c for _, c in in_main.values()) >= 10 * times  # the 10-iteration loop
    assert not [a for a in blocks if a in never], "a block inside never_called was counted"
    for addr, (size, count) in blocks.items():
        assert size > 0 and count > 0, (hex(addr), size, count)


# --------------------------------------------------------------------------- tests


def test_probe_reports_the_plugin(plugin: str) -> None:
    require_backend("qemu", BOARD)
    info = QemuBackend().probe()
    assert info.available, info.unavailable_reason
    assert info.details["coverage_method"] == "tcg-plugin"
    assert Feature.COVERAGE in info.features
    assert os.path.exists(plugin)
    # cached: the same .so, not rebuilt
    assert plugin_status().path == plugin


def test_plugin_build_failure_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    cc = native.compiler() or tool_missing("gcc", "to build the QEMU plugin")
    with pytest.raises(RuntimeError, match="failed to build"):
        native.build(bad, cc, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so"))
    assert PluginStatus(None, "no gcc").method == "none: no gcc"


def test_table_reader_keeps_translation_shapes(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    entries = [(0x100, 8, 0, 5), (0x200, 4, 0, 0), (0x100, 12, 0, 2), (0x100, 8, 0, 1)]
    data = blocktable.HEADER.pack(blocktable.MAGIC, 1, 24, 5, blocktable.FLAG_FULL, len(entries))
    data += b"".join(blocktable.ENTRY.pack(*e) for e in entries) + bytes(24)
    path.write_bytes(data)
    table = blocktable.read_table(path)
    # one shape translated twice: summed; 0x200 was translated but never executed
    assert table.runs == {(0x100, 8): 6, (0x100, 12): 2} and table.full
    # as blocks: [0x100, 0x108) ran 6 + 2 times, [0x108, 0x10c) only in the 12-byte shape
    assert table.blocks == {0x100: (8, 8), 0x108: (4, 2)}
    assert blocktable.runs_since(table.runs, {(0x100, 8): 4}) == {(0x100, 8): 2, (0x100, 12): 2}
    assert blocktable.runs_since(table.runs, table.runs) == {}
    assert blocktable.add_runs({(0x100, 8): 1}, table.runs) == {(0x100, 8): 7, (0x100, 12): 2}
    assert blocktable.read_table(tmp_path / "missing.bin").runs == {}
    (tmp_path / "empty.bin").write_bytes(bytes(64))  # created, header not written yet
    assert blocktable.read_table(tmp_path / "empty.bin").runs == {}
    assert blocktable.HEADER.size == 64 and blocktable.ENTRY.size == 24  # the C structs' sizes


async def test_counts_are_exact_when_qemu_translates_single_instructions(
        plugin: str, machines: MachineFactory) -> None:
    """A breakpoint makes QEMU 7.2 translate every block of its page one instruction at a
    time: the same code then runs in blocks of other shapes at the same addresses. The
    per-address counts of a run that way equal those of a run without breakpoints; and
    while halted at the breakpoint, its instruction has not run."""
    plain, ev, path = await loaded(machines)
    points = code_addresses(path)
    await cov(plain).coverage_start()
    await run_to_exit(plain, ev)
    expected = address_counts(points, await cov(plain).coverage_blocks())

    three = elf_function(path, "called_three_times").start  # on main's page
    m, ev, _ = await loaded(machines)
    await cov(m).coverage_start()
    await m.bp.set_breakpoint(three)
    for n in (1, 2):
        await m.run.run()
        assert (await ev.wait_stop(n)).pc == three
        now = address_counts(points, await cov(m).coverage_blocks())
        assert now[three] == n - 1  # halted there: this call has not run yet
    await m.bp.clear_breakpoint(three)
    await run_to_exit(m, ev)
    blocks = await cov(m).coverage_blocks()
    sizes = {size for start, (size, _) in blocks.items() if start in elf_function(path, "main")}
    assert 2 in sizes and max(sizes) > 4  # single instructions and whole blocks both ran
    assert address_counts(points, blocks) == expected


async def test_coverage_program_blocks_and_counts(plugin: str, machines: MachineFactory) -> None:
    m, ev, path = await loaded(machines)
    await cov(m).coverage_start()
    assert await cov(m).coverage_blocks() == {}  # nothing ran since the baseline
    await run_to_exit(m, ev)
    assert bytes(ev.console) == b"coverage done\n"
    blocks = await cov(m).coverage_blocks()
    check_coverage_program(blocks, path, 1)

    # stop freezes the result; reset empties it
    await cov(m).coverage_stop()
    assert await cov(m).coverage_blocks() == blocks
    await cov(m).coverage_reset()
    assert await cov(m).coverage_blocks() == {}

    # a reset after the exit starts a fresh QEMU with a fresh table; counting goes on
    await cov(m).coverage_start()
    assert await cov(m).coverage_blocks() == {}
    await m.reset()
    await run_to_exit(m, ev)
    check_coverage_program(await cov(m).coverage_blocks(), path, 1)
    await m.load(elf_image(path))
    await run_to_exit(m, ev)
    check_coverage_program(await cov(m).coverage_blocks(), path, 2)  # spans both QEMUs
    await cov(m).coverage_reset()
    assert await cov(m).coverage_blocks() == {}
    assert not cov(m).coverage_overflowed


async def test_counts_are_live_and_survive_a_snapshot_restore(plugin: str, machines: MachineFactory) -> None:
    m, ev, path = await loaded(machines)
    three = elf_function(path, "called_three_times")
    await cov(m).coverage_start()
    await m.bp.set_breakpoint(three.start)
    await m.run.run()
    stop = await ev.wait_stop(1)
    assert stop.reason is StopReason.BREAKPOINT and stop.pc == three.start
    blocks = await cov(m).coverage_blocks()  # read while QEMU is alive, mid-program
    assert blocks and three.start not in blocks
    snap = await m.snap.save_state()
    await m.bp.clear_breakpoint(three.start)
    await m.snap.restore_state(snap)  # a new QEMU: the old table is folded in
    await run_to_exit(m, ev)
    blocks = await cov(m).coverage_blocks()
    assert blocks[three.start][1] == 3
    assert blocks[elf_function(path, "main").start][1] == 1  # the start of main ran once


async def test_machine_without_the_option_has_no_coverage(plugin: str, machines: MachineFactory) -> None:
    m, _ = machines(BOARD)
    await m.power_on()
    with pytest.raises(NotSupported, match="coverage"):
        await cov(m).coverage_start()
    with pytest.raises(NotSupported, match="coverage"):
        await cov(m).coverage_blocks()
    # the plugin is loaded (its instruction gate), without a coverage table
    inst = m.process.instance
    assert inst is not None
    command = inst.command_line({"con": 1, "semi": 2, "gdb": 3, "qmp": 4})
    assert "-plugin" in command and not any("out=" in arg for arg in command)

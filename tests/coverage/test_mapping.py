"""The coverage mapping's parts, without a server: how instructions are classified
(capstone on real encodings), per-address counts across block shapes (``merge_blocks``),
branch outcomes derived from execution counts checked against the counted edges of real
runs (the in-process Unicorn driver), the fallback when no rule applies, and 0 of 0."""

from __future__ import annotations

import dataclasses
import random

import capstone
import pytest

from machineserver.server.core.coverage_analysis import Flow, classify
from machineserver.server.core.coverage_export import _simple_html
from machineserver.server.core.coverage_mapping import (
    Counts,
    CoverageResult,
    FileResult,
    address_counts,
    compute,
    percent_text,
)
from machineserver.server.core.images import ImageFormat, parse_image
from machineserver.server.drivers.base import (
    Arch,
    Blocks,
    Coverage,
    MachineOptions,
    RunControl,
    StopReason,
    merge_blocks,
)
from tests.helpers.events import Recorder
from tests.helpers.firmware import firmware
from tests.helpers.machines import board, program_analysis

THUMB = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)
RISCV = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV32 | capstone.CS_MODE_RISCVC)


def thumb(address: int, halfwords: str) -> tuple[Flow, int | None]:
    """Classify one Thumb instruction given as objdump prints it (halfwords, hex)."""
    code = b"".join(bytes.fromhex(halfwords[i:i + 4])[::-1] for i in range(0, len(halfwords), 4))
    insn = next(THUMB.disasm(code, address))
    got = classify(Arch.ARM_CORTEX_M, address, insn.size, insn.mnemonic, insn.op_str)
    return got.flow, got.target


def riscv(address: int, word: str) -> tuple[Flow, int | None]:
    insn = next(RISCV.disasm(bytes.fromhex(word)[::-1], address))
    got = classify(Arch.RISCV32, address, insn.size, insn.mnemonic, insn.op_str)
    return got.flow, got.target


# encodings from arm-none-eabi-as / the test firmware (objdump's halfword order)
@pytest.mark.parametrize(("address", "code", "expected"), [
    (0x0, "4770", (Flow.RETURN, None)),  # bx lr
    (0x2, "bd10", (Flow.RETURN, None)),  # pop {r4, pc}
    (0x24, "e8bd8010", (Flow.RETURN, None)),  # ldmia.w sp!, {r4, pc}
    (0x16, "f85dfb04", (Flow.RETURN, None)),  # ldr.w pc, [sp], #4
    (0x4, "e7fe", (Flow.JUMP, 0x4)),  # b.n .
    (0x234, "d1f8", (Flow.CONDITIONAL, 0x228)),  # bne.n 0x228
    (0x13C, "b900", (Flow.CONDITIONAL, 0x140)),  # cbnz r0, 0x140
    (0x330, "f7ffffd0", (Flow.CALL, 0x2D4)),  # bl 0x2d4
    (0xE, "4798", (Flow.CALL, None)),  # blx r3
    (0x10, "4718", (Flow.INDIRECT, None)),  # bx r3
    (0x12, "e8dff003", (Flow.INDIRECT, None)),  # tbb [pc, r3]
    (0x1A, "469f", (Flow.INDIRECT, None)),  # mov pc, r3
    (0x1C, "f8d0f000", (Flow.INDIRECT, None)),  # ldr.w pc, [r0]
    (0x20, "2301", (Flow.NEXT, None)),  # movs r3, #1
    (0x22, "beab", (Flow.NEXT, None)),  # bkpt 0xab: a semihosting call returns
])
def test_thumb_instructions(address: int, code: str, expected: tuple[Flow, int | None]) -> None:
    assert thumb(address, code) == expected


@pytest.mark.parametrize(("address", "code", "expected"), [
    (0x0, "00008067", (Flow.RETURN, None)),  # ret
    (0x28, "8082", (Flow.RETURN, None)),  # c.jr ra
    (0x14, "30200073", (Flow.RETURN, None)),  # mret
    (0x10, "0000006f", (Flow.JUMP, 0x10)),  # jal zero, . (j)
    (0x2040001E, "a001", (Flow.JUMP, 0x2040001E)),  # c.j .
    (0x4, "000000ef", (Flow.CALL, 0x4)),  # jal ra, .
    (0x2040001C, "2011", (Flow.CALL, 0x20400020)),  # c.jal
    (0x8, "000780e7", (Flow.CALL, None)),  # jalr ra, 0(a5)
    (0x2A, "9782", (Flow.CALL, None)),  # c.jalr a5
    (0xC, "00078067", (Flow.INDIRECT, None)),  # jalr zero, 0(a5) (jr a5)
    (0x2C, "8782", (Flow.INDIRECT, None)),  # c.jr a5
    (0x2040003C, "00d7ef63", (Flow.CONDITIONAL, 0x2040005A)),  # bltu a5, a3
    (0x2040010E, "e509", (Flow.CONDITIONAL, 0x20400118)),  # c.bnez a0
    (0x20, "00100073", (Flow.NEXT, None)),  # ebreak
    (0x24, "00150513", (Flow.NEXT, None)),  # addi a0, a0, 1
])
def test_riscv_instructions(address: int, code: str, expected: tuple[Flow, int | None]) -> None:
    assert riscv(address, code) == expected


def per_address_sum(*sources: Blocks) -> dict[int, int]:
    out: dict[int, int] = {}
    for blocks in sources:
        for start, (size, count) in blocks.items():
            for a in range(start, start + size, 2):
                out[a] = out.get(a, 0) + count
    return out


def test_merge_blocks_keeps_per_address_counts() -> None:
    """Blocks of the same start and different sizes (QEMU's single-instruction
    translations next to whole blocks, unicorn's blocks split at a stop) merge so that
    every address counts what both sides ran."""
    rng = random.Random(7)
    for _ in range(200):
        sources = [{rng.randrange(0, 64, 2): (rng.randrange(2, 24, 2), rng.randrange(1, 9)) for _ in range(6)}
                   for _ in range(3)]
        merged: Blocks = {}
        for blocks in sources:
            merge_blocks(merged, blocks)
        points = list(range(0, 96, 2))
        assert address_counts(points, merged) == {a: per_address_sum(*sources).get(a, 0) for a in points}
    assert merge_blocks({0x10: (8, 0)}, {0x10: (8, 0)}) == {0x10: (8, 0)}  # unknown stays unknown
    assert merge_blocks({0x10: (8, 2)}, {0x10: (4, 1)}) == {0x10: (4, 3), 0x14: (4, 2)}


async def unicorn_run(board_name: str, elf: bytes) -> tuple[Blocks, dict[tuple[int, int], int]]:
    """Blocks and counted edges of one run to the exit on the in-process Unicorn driver."""
    from machineserver.server.drivers.unicorn import UnicornBackend

    rec = Recorder()
    m = UnicornBackend().create_machine(board(board_name), MachineOptions(extra={"coverage": "1"}), rec)
    try:
        await m.power_on()
        await m.load(parse_image(elf, ImageFormat.ELF).image)
        await m.capability(RunControl).run()
        assert (await rec.wait_stop(1, 120)).reason == StopReason.EXIT
        part = m.capability(Coverage)
        edges = await part.coverage_edges()
        assert edges is not None
        return await part.coverage_blocks(), edges
    finally:
        await m.power_off()


def outcomes(files: list[FileResult]) -> dict[tuple[str, int], tuple[int | None, int | None]]:
    return {(f.path, b.address): (b.taken, b.not_taken) for f in files for b in f.branches}


@pytest.mark.parametrize(("board_name", "name"), [
    ("mps2-an385", "coverage"), ("mps2-an385", "crc32"), ("mps2-an385", "systick"), ("mps2-an385", "hello"),
    ("sifive_e", "coverage"), ("sifive_e", "crc32"), ("sifive_e", "timer"),
])
async def test_outcomes_from_counts_equal_counted_edges(board_name: str, name: str) -> None:
    """Without edges (QEMU), branch outcomes come from execution counts and the control
    flow. On real runs (interrupts included: systick, timer) they equal the counted
    edges, from unicorn's blocks and from the same counts as single-instruction blocks
    (QEMU's shape on a page with a breakpoint). Every branch of these programs has a
    rule: none falls back to block entries."""
    path = firmware(board_name, name)
    prog = program_analysis(board_name, path)
    assert all(b.fallthrough_only or b.target_inflow is not None for b in prog.branches)
    blocks, edges = await unicorn_run(board_name, path.read_bytes())
    exact = outcomes(compute(prog, blocks, edges))
    assert any(t for t, _ in exact.values()) and any(n for _, n in exact.values())
    assert outcomes(compute(prog, blocks)) == exact
    counts = address_counts(sorted({a for s, (z, _) in blocks.items() for a in range(s, s + z, 2)}), blocks)
    singles = {a: (2, c) for a, c in counts.items() if c}
    derived = compute(prog, singles)
    assert outcomes(derived) == exact
    assert [f.lines for f in derived] == [f.lines for f in compute(prog, blocks, edges)]


def test_fallback_counts_block_entries() -> None:
    """A branch with no rule (both successors reachable some other way) gets the entries
    of the blocks starting at its successors, each capped at its own count."""
    path = firmware("mps2-an385", "coverage")
    prog = program_analysis("mps2-an385", path)
    prog.branches = [dataclasses.replace(b, fallthrough_only=False, target_inflow=None) for b in prog.branches]
    loop = next(b for b in prog.branches if b.line == 42)
    # the loop branch ran 11 times; 12 entries start at its target (inflated: say a
    # jump from elsewhere went there too), none at its fall-through
    blocks = {loop.address & ~0xF: (loop.address + 2 - (loop.address & ~0xF), 11), loop.target: (2, 12)}
    result = {b.line: (b.taken, b.not_taken) for f in compute(prog, blocks) for b in f.branches}
    assert result[42] == (11, 0)


def test_nothing_to_cover_is_100_percent_and_reads_as_a_dash() -> None:
    empty = Counts(lines_hit=1, lines_total=2)
    assert (empty.line_percent, empty.function_percent, empty.branch_percent) == (50.0, 100.0, 100.0)
    assert percent_text(0, 0) == "-" and percent_text(1, 3) == "33.3%"
    page = _simple_html(CoverageResult("p", [], [FileResult("a.c", {1: 1, 2: 0})]), {"a.c": "files/0.html"}, {})
    assert "1/2 (50.0%)" in page and "0/0 (-)" in page and "(0.0%)" not in page

"""The plugin's coverage table (``out=FILE``, see plugin/msplugin.c for the layout):
one 24-byte entry per translated block, with an inline TCG add of 1 on that entry's
count at each execution (no callback, no lock; ~+24 % on a CPU-bound loop), in a file
the plugin maps shared. :func:`read_table` reads it at any time, while QEMU runs: the
counts are live.

A block may be translated more than once (after a flush, as single instructions on a
page with a breakpoint or while the gdbstub steps), at the same address with the same
size or not. Counts are kept per *translation shape* (:data:`Runs`: start and size), so
that totals and baselines add and subtract exactly; :func:`runs_to_blocks` turns them
into ``Blocks`` whose per-address counts are the exact sums (``merge_blocks``).

The inline add sits after the block's exit-request check, so a block that QEMU leaves
before it runs (a pause, a hold of the plugin's gate) is not counted; a block left in its
middle (a watchpoint hit, a guest fault, an MMIO access under icount) is counted whole,
and QEMU runs its rest again as a new block: those instructions count once more."""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from machineserver.server.drivers.base import Blocks, merge_blocks

MAGIC = b"MSBLKS\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # magic, version, entry_size, capacity, flags, used
ENTRY = struct.Struct("<QIIQ")  # vaddr, size, pad, count
FLAG_FULL = 1
FLAG_EXITED = 2

# (block start, size in bytes) -> executions, summed over the translations of that shape
Runs = dict[tuple[int, int], int]


@dataclass(frozen=True)
class Table:
    # translations never executed (count 0: e.g. one a flush threw away, or the block
    # the gate held before a semihosting trap) left out
    runs: Runs
    full: bool  # the table overflowed: blocks translated later are not counted
    exited: bool

    @property
    def blocks(self) -> Blocks:
        return runs_to_blocks(self.runs)


EMPTY = Table({}, False, False)


def add_runs(into: Runs, other: Mapping[tuple[int, int], int]) -> Runs:
    for shape, count in other.items():
        into[shape] = into.get(shape, 0) + count
    return into


def runs_since(current: Mapping[tuple[int, int], int], baseline: Mapping[tuple[int, int], int]) -> Runs:
    """What ran since ``baseline`` (a snapshot of the same, growing totals)."""
    out: Runs = {}
    for shape, count in current.items():
        grown = count - baseline.get(shape, 0)
        if grown > 0:
            out[shape] = grown
    return out


def runs_to_blocks(runs: Mapping[tuple[int, int], int]) -> Blocks:
    """Blocks with the same per-address counts (same start, different sizes: split)."""
    out: Blocks = {}
    for (start, size), count in sorted(runs.items()):
        if count > 0:
            merge_blocks(out, {start: (size, count)})
    return out


def read_table(path: str | os.PathLike[str]) -> Table:
    """Read a plugin table (while QEMU runs or after). A missing or not yet initialised
    file reads as empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                return EMPTY
            magic, version, esize, capacity, flags, used = HEADER.unpack(head)
            if magic != MAGIC:
                return EMPTY
            if version != VERSION or esize != ENTRY.size:
                raise ValueError(f"unsupported coverage table version {version}/{esize}")
            used = min(used, capacity)
            data = f.read(used * ENTRY.size)
    except FileNotFoundError:
        return EMPTY
    runs: Runs = {}
    usable = data[: len(data) - len(data) % ENTRY.size]
    for vaddr, size, _pad, count in ENTRY.iter_unpack(usable):
        if count:
            runs[(vaddr, size)] = runs.get((vaddr, size), 0) + count
    return Table(runs, bool(flags & FLAG_FULL), bool(flags & FLAG_EXITED))

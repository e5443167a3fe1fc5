"""The mapping of what a backend executed (``drivers.base.Blocks`` and, where the backend
has them, ``Edges``) onto a program's source: per-file line, function and branch results.

Execution counts. A block ``start -> (size, count)`` says the instructions in
[start, start + size) ran ``count`` times per entry of that block; blocks may overlap
(a loop header entered in the middle of a longer block), so **the count of an address is
the sum of the counts of the blocks that hold it**: the number of times the instruction
there ran. Both backends report blocks for which that is exact (see "When counts are
not exact"), whatever their block boundaries are (QEMU and Unicorn translate different
blocks for the same code), so the same execution gives the same counts on both (a
program whose path depends on when interrupts arrive, e.g. a busy wait for a timer
tick, may itself run differently on each). A count of 0 means "executed, count
unknown" (a first-hit collector) and counts as 1.

A machine halted at an address has *not* executed the instruction there: a breakpoint's
instruction, or the semihosting trap of a program's exit (both backends stop before it).
The transfer that brought it there *has* happened, though: a branch right before the
halt has run and gone one way. The core reads where each machine stands when it reads
its blocks (``halted_at``), and counts that arrival when it derives branch outcomes.

* **Lines**: every ``is_stmt`` row of the line table is one address of a line (see
  :mod:`.coverage_analysis`); a row's count is its address's count: the executions of
  the row's first instruction. A line's count is the largest count of its rows (a
  ``for`` line counts its condition, 11 for a 10-iteration loop, not its increment) and
  it is hit when any row ran. The lines of a file are all lines the line table names.
* **Functions**: hit when the entry address ran; the call count is that address's count
  (entries by a tail call or a jump back to the entry count too).
* **Branches**: two outcomes per conditional branch site, "-" (None) both when the
  branch never ran. With edges (Unicorn), *taken* and *not taken* are the counts of the
  edges (branch, target) and (branch, fall-through): exact. Without edges (QEMU), they
  are derived from execution counts and the program's control flow:

  - *not taken* = the fall-through address's count, when nothing else goes there
    (``BranchSite.fallthrough_only``);
  - *taken* = the target's count minus what falls into it from the instruction before
    (that instruction's count, or the not-taken count of a branch there), when this
    branch is the only transfer to it (``BranchSite.target_inflow``);
  - the other outcome = the branch's count minus the one found (repeated until nothing
    more is found: a branch's not-taken count may give another's taken count).

  Exact whenever one outcome is found that way, which covers the branches compilers
  emit for ``if``/``else``, loops and ``&&``/``||`` chains (every branch of the test
  firmware). Not found (both successors reachable in other ways: a target that other
  jumps share and a fall-through that is also a jump target, a target right after a
  call, any branch in a function with an indirect jump such as a ``switch`` table): the
  counts fall back to the entries of the blocks that start at each successor, each
  capped at the branch's count, which count entries from elsewhere as well.

When counts are not exact (documented in the exports' README too):

* QEMU: a block left in its middle counts as run whole, and QEMU runs the rest again as
  a block of its own, so the instructions from that point to the block's end count once
  more each time: a watchpoint hit (measured: the accessing instruction and the rest of
  its block, per hit; Unicorn is exact there), a guest fault in the middle of a block
  that a fault handler deals with, and an MMIO access in the middle of a block under
  ``icount``.
* Read while the machine runs, counts are a moment's (the blocks are read one after
  the other, the halt address is unknown: a derived outcome may be one off).
* Unicorn: see ``drivers/unicorn/collector.py`` (an asynchronous slice end at the first,
  not yet chained, jump of a block into its own range).
* First-hit collection (count 0): counts are 1, "executed at least once"; its edges are
  only the first way into each block.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from machineserver.server.core.coverage_analysis import BranchSite, InflowKind, ProgramAnalysis
from machineserver.server.drivers.base import Blocks, Edges


@dataclass(frozen=True)
class Counts:
    """Hit and total counts. A percentage of nothing (0 of 0: a file without functions
    or branches) is 100: genhtml prints "-" for it and rates it as high as full coverage,
    ``lcov --summary`` says "no data found", and a Cobertura rate of 0/0 is 1. Text we
    render ourselves shows "-" (:func:`percent_text`)."""

    lines_hit: int = 0
    lines_total: int = 0
    functions_hit: int = 0
    functions_total: int = 0
    branches_hit: int = 0
    branches_total: int = 0

    @staticmethod
    def _pct(hit: int, total: int) -> float:
        return round(100.0 * hit / total, 2) if total else 100.0

    @property
    def line_percent(self) -> float:
        return self._pct(self.lines_hit, self.lines_total)

    @property
    def function_percent(self) -> float:
        return self._pct(self.functions_hit, self.functions_total)

    @property
    def branch_percent(self) -> float:
        return self._pct(self.branches_hit, self.branches_total)

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "line_percent": self.line_percent,
            "function_percent": self.function_percent,
            "branch_percent": self.branch_percent,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        return cls(**{k: int(data.get(k, 0)) for k in asdict(cls())})


def percent_text(hit: int, total: int) -> str:
    """A percentage as genhtml prints it: "-" for 0 of 0."""
    return f"{100.0 * hit / total:.1f}%" if total else "-"


@dataclass(frozen=True)
class FunctionResult:
    name: str
    line: int
    address: int
    count: int  # 0: not executed

    @property
    def hit(self) -> bool:
        return self.count > 0


@dataclass(frozen=True)
class BranchResult:
    line: int
    address: int
    target: int
    fallthrough: int
    # None: the branch never ran ("-" in LCOV); else how often each way was taken
    taken: int | None
    not_taken: int | None

    @property
    def outcomes_hit(self) -> int:
        return int(bool(self.taken)) + int(bool(self.not_taken))


@dataclass
class FileResult:
    path: str  # as the line table names it (relative to the compilation dir when it is ".")
    lines: dict[int, int] = field(default_factory=dict)  # line -> count (0: not hit)
    functions: list[FunctionResult] = field(default_factory=list)
    branches: list[BranchResult] = field(default_factory=list)

    @property
    def counts(self) -> Counts:
        return Counts(
            lines_hit=sum(1 for c in self.lines.values() if c),
            lines_total=len(self.lines),
            functions_hit=sum(1 for f in self.functions if f.hit),
            functions_total=len(self.functions),
            branches_hit=sum(b.outcomes_hit for b in self.branches),
            branches_total=2 * len(self.branches),
        )


@dataclass
class CoverageResult:
    program: str  # program id
    sessions: list[str]
    files: list[FileResult]  # sorted by path
    name: str = ""  # the report or session it came from

    @property
    def totals(self) -> Counts:
        total = Counts()
        for f in self.files:
            total = total + f.counts
        return total


def address_counts(points: list[int], blocks: Blocks) -> dict[int, int]:
    """The execution count of each of ``points`` (sorted): the sum of the counts of the
    blocks holding it (count 0, unknown, as 1)."""
    counts = [0] * len(points)
    for start, (size, count) in blocks.items():
        lo = bisect.bisect_left(points, start)
        hi = bisect.bisect_left(points, start + max(size, 1))
        for i in range(lo, hi):
            counts[i] += count or 1
    return dict(zip(points, counts, strict=True))


def compute(analysis: ProgramAnalysis, blocks: Blocks, edges: Edges | None = None,
            halted_at: Sequence[int] = ()) -> list[FileResult]:
    """Map executed blocks (and edges, when the backend has them) onto the program's
    lines, functions and branches (see the module docstring). ``halted_at``: the
    addresses the machines that ran them stood halted at (one per machine)."""
    count_of = address_counts(analysis.points, blocks)
    files: dict[str, FileResult] = {p: FileResult(p, dict.fromkeys(sorted(lines), 0)) for p, lines in analysis.lines.items()}
    for entry in analysis.entries:
        lines = files[entry.file].lines
        lines[entry.line] = max(lines[entry.line], count_of[entry.address])
    for fn in analysis.functions:
        files[fn.file].functions.append(FunctionResult(fn.name, fn.line, fn.address, count_of[fn.address]))
    if edges is not None:
        outcomes = _outcomes_from_edges(analysis.branches, count_of, edges)
    else:
        exact = all(count > 0 for _, count in blocks.values())
        arrived = dict(count_of)  # transfers into each address: its runs, plus a halt there
        for address in halted_at:
            if address in arrived:
                arrived[address] += 1
        outcomes = _outcomes_from_counts(analysis.branches, count_of, arrived, blocks, exact)
    for site, (taken, not_taken) in zip(analysis.branches, outcomes, strict=True):
        files[site.file].branches.append(
            BranchResult(site.line, site.address, site.target, site.fallthrough, taken, not_taken))
    return [files[p] for p in sorted(files)]


Outcome = tuple[int | None, int | None]


def _outcomes_from_edges(sites: list[BranchSite], count_of: Mapping[int, int], edges: Edges) -> list[Outcome]:
    out: list[Outcome] = []
    for site in sites:
        if not count_of[site.address]:
            out.append((None, None))
            continue
        taken = edges.get((site.address, site.target))
        not_taken = edges.get((site.address, site.fallthrough))
        # 0: taken, count unknown (first-hit edges) -> at least once
        out.append((0 if taken is None else taken or 1, 0 if not_taken is None else not_taken or 1))
    return out


def _outcomes_from_counts(sites: list[BranchSite], count_of: Mapping[int, int], arrived: Mapping[int, int],
                          blocks: Blocks, exact: bool) -> list[Outcome]:
    """Taken/not-taken from execution counts and the control flow (module docstring):
    ``count_of`` how often each address ran, ``arrived`` how often control got there."""
    runs = [count_of[s.address] for s in sites]
    taken: list[int | None] = [None] * len(sites)
    not_taken: list[int | None] = [None] * len(sites)
    index = {s.address: i for i, s in enumerate(sites)}
    if exact:
        for i, site in enumerate(sites):
            if runs[i] and site.fallthrough_only:
                not_taken[i] = min(arrived[site.fallthrough], runs[i])
        changed = True
        while changed:
            changed = False
            for i, site in enumerate(sites):
                if not runs[i]:
                    continue
                if taken[i] is None and (inflow := _inflow(site, count_of, index, not_taken)) is not None:
                    taken[i] = max(0, min(arrived[site.target] - inflow, runs[i]))
                    changed = True
                known_taken, known_not_taken = taken[i], not_taken[i]
                if known_taken is None and known_not_taken is not None:
                    taken[i] = runs[i] - known_not_taken
                    changed = True
                elif known_not_taken is None and known_taken is not None:
                    not_taken[i] = runs[i] - known_taken
                    changed = True
    out: list[Outcome] = []
    for i, site in enumerate(sites):
        if not runs[i]:
            out.append((None, None))
        elif taken[i] is None or not_taken[i] is None:  # not derivable: block entries
            out.append((min(runs[i], _entries(blocks, site.target)), min(runs[i], _entries(blocks, site.fallthrough))))
        else:
            out.append((taken[i], not_taken[i]))
    return out


def _inflow(site: BranchSite, count_of: Mapping[int, int], index: Mapping[int, int],
            not_taken: list[int | None]) -> int | None:
    """What reaches ``site``'s target besides the branch (None: not known)."""
    inflow = site.target_inflow
    if inflow is None:
        return None
    if inflow.kind is InflowKind.NONE:
        return 0
    if inflow.kind is InflowKind.INSTRUCTION:
        return count_of[inflow.address]
    before = index.get(inflow.address)  # a conditional branch that is no site: not known
    return None if before is None else not_taken[before]


def _entries(blocks: Blocks, address: int) -> int:
    block = blocks.get(address)
    return 0 if block is None else block[1] or 1

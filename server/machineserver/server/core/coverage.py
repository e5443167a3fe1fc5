"""Code coverage: collection in sessions (through the driver's ``Coverage`` interface),
stored reports, merging, and the mapping of executed blocks onto source lines,
functions and branches with the program's DWARF line table.

What a driver hands back is a set of executed blocks, ``start -> (size, count)`` (count
0: executed, count unknown). From that and the ELF:

* **Lines**: every ``is_stmt`` row of the line table is one address of a line. An
  address's count is the sum of the counts of the executed blocks that contain it
  (overlapping blocks are different entries into the same code, e.g. a QEMU block that
  starts at a loop header inside a longer one); a line's count is the largest count of
  its addresses, and it is hit when any is. The lines of a file are all lines the line
  table names for it.
* **Functions**: every function symbol whose address starts a line-table row (i.e. has
  debug info). Hit when its entry address was executed; its call count is the count of
  that address (entries by a tail call or a jump back to the entry count too).
* **Branches**: every conditional branch instruction (Thumb ``b<cond>``/``cbz``/``cbnz``;
  RISC-V ``beq``/``bne``/``blt``/``bge``/``bltu``/``bgeu``, their aliases and ``c.beqz``/
  ``c.bnez``) found by disassembling function symbols with capstone (skipping data that
  ARM ``$d`` mapping symbols mark), two outcomes each, attributed to the source line of
  the branch. When the instruction ran N times: *taken* is the count of the block that
  starts at the branch target, *not taken* the count of the block that starts at the
  fall-through address, each capped at N (or the exact edge counts when the driver
  offers ``coverage_edges()``). Both are "-" (never evaluated) when it never ran.

Approximations (documented in the exports' README too):

* Without edges, a target reached by another path as well (another branch, a fall
  through from code that jumps there) counts as "taken" for this branch too; with
  first-hit-only collection (count 0) counts are 1 ("executed at least once").
* A block that stopped in its middle (a fault, a breakpoint) is counted as run whole.
* Conditional execution without a branch (Thumb ``IT`` blocks) is not a branch here.
* Static functions of the same name in two files: the first symbol wins.
* Line-table rows outside executable sections are dropped (the linker's
  ``--gc-sections`` leaves discarded functions' rows at address 0); a discarded
  function's rows that land inside a kept executable section would still count.
"""

from __future__ import annotations

import bisect
import builtins
import io
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import capstone
import structlog
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from machineserver.server.core.errors import FailedPrecondition, InvalidArgument, NotFound
from machineserver.server.core.listing import Page, match_terms, paginate, parse_filter, resource_id
from machineserver.server.core.models import from_row, now, record_row
from machineserver.server.core.programs import ProgramStore
from machineserver.server.core.sessions import LiveSession, SessionManager, driver_errors
from machineserver.server.core.symbols import SymbolTable
from machineserver.server.drivers.base import Arch, Feature, MachineState
from machineserver.server.drivers.base import Coverage as CoverageCapability
from machineserver.server.store.blobs import BlobStore
from machineserver.server.store.db import Database

log = structlog.get_logger(__name__)

TABLE = "coverage_reports"
COLLECTION = "coverageReports"

# block start -> (size in bytes, execution count; 0 = executed, count unknown)
Blocks = dict[int, tuple[int, int]]
# (from, to) -> count: control transfers, when the driver reports them
Edges = dict[tuple[int, int], int]


# --------------------------------------------------------------------------- records


@dataclass
class CoverageReportRecord:
    id: str
    program: str  # program id
    sessions: list[str] = field(default_factory=list)  # session ids
    blocks: list[list[int]] = field(default_factory=list)  # [start, size, count]
    edges: list[list[int]] | None = None  # [from, to, count] when the driver had them
    totals: dict[str, float] = field(default_factory=dict)  # Counts as a dict
    owner: str = ""
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.id}"


def blocks_to_list(blocks: Blocks) -> list[list[int]]:
    return [[start, size, count] for start, (size, count) in sorted(blocks.items())]


def blocks_from_list(rows: Iterable[Iterable[int]]) -> Blocks:
    out: Blocks = {}
    for start, size, count in rows:
        out[int(start)] = (int(size), int(count))
    return out


def merge_blocks(into: Blocks, other: Mapping[int, tuple[int, int]]) -> None:
    """Union; counts summed (0 = unknown stays 0 only when both are unknown)."""
    for start, (size, count) in other.items():
        if start in into:
            old_size, old_count = into[start]
            into[start] = (max(old_size, size), old_count + count)
        else:
            into[start] = (size, count)


def normalize_edges(raw: Any) -> Edges | None:
    """What a driver's optional ``coverage_edges()`` returns, as ``{(from, to): count}``:
    a mapping of pairs to counts, or pairs, or (from, to, count) triples."""
    if raw is None:
        return None
    out: Edges = {}
    items = raw.items() if isinstance(raw, Mapping) else ((e, None) for e in raw)
    for key, value in items:
        key = tuple(key)
        if len(key) == 3 and value is None:
            src, dst, count = key
        else:
            src, dst = key[0], key[1]
            count = 0 if value is None else value
        pair = (int(src), int(dst))
        out[pair] = out.get(pair, 0) + int(count)
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Counts:
    lines_hit: int = 0
    lines_total: int = 0
    functions_hit: int = 0
    functions_total: int = 0
    branches_hit: int = 0
    branches_total: int = 0

    @staticmethod
    def _pct(hit: int, total: int) -> float:
        return round(100.0 * hit / total, 2) if total else 0.0

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


# --------------------------------------------------------------------------- static analysis


@dataclass(frozen=True)
class BranchSite:
    address: int
    target: int
    fallthrough: int
    file: str
    line: int


@dataclass(frozen=True)
class FunctionSite:
    name: str
    address: int
    file: str
    line: int


_ARM_COND_BRANCH = re.compile(r"^b(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le)(\.[nw])?$")
_ARM_CB = {"cbz", "cbnz"}
_RISCV_BRANCHES = {
    "beq", "bne", "blt", "bge", "bltu", "bgeu",  # base
    "beqz", "bnez", "blez", "bgez", "bltz", "bgtz", "bgt", "ble", "bgtu", "bleu",  # aliases
    "c.beqz", "c.bnez",
}
_LAST_INT = re.compile(r"(-?(?:0x[0-9a-fA-F]+|\d+))\s*$")


class ProgramAnalysis:
    """What coverage needs from one program, computed once: line-table rows, functions
    with debug info, and conditional branch sites."""

    def __init__(self, elf: bytes, symbols: SymbolTable, arch: Arch | None) -> None:
        self.code = _code_sections(elf)
        # rows outside executable sections are code the linker discarded (--gc-sections
        # leaves their line sequences at address 0): not lines of this program
        self.entries = [e for e in symbols.lines() if _bytes_at(self.code, e.address, 1) is not None]
        self.entry_addrs = [e.address for e in self.entries]
        self.lines: dict[str, set[int]] = {}
        for e in self.entries:
            self.lines.setdefault(e.file, set()).add(e.line)
        self.functions: list[FunctionSite] = []
        weak = _weak_symbols(elf)
        seen_addresses: set[int] = set()
        # one function per address: aliases (weak handlers aliasing Default_Handler) fold
        # into the strong name
        for sym in sorted(symbols.symbols.values(), key=lambda s: (s.address, s.name in weak, s.name)):
            if sym.kind != "func" or sym.address in seen_addresses:
                continue
            seen_addresses.add(sym.address)
            entry = symbols.line_at(sym.address)
            if entry is None or not symbols.is_line_start(sym.address) or not _bytes_at(self.code, sym.address, 1):
                continue
            self.functions.append(FunctionSite(sym.name, sym.address, entry.file, entry.line))
        self.branches: list[BranchSite] = []
        if arch is not None:
            self._find_branches(elf, symbols, arch)
        self.branches.sort(key=lambda b: b.address)
        self.branch_addrs = [b.address for b in self.branches]

    def _find_branches(self, elf_bytes: bytes, symbols: SymbolTable, arch: Arch) -> None:
        try:
            data_ranges = _data_ranges(ELFFile(io.BytesIO(elf_bytes)))
        except (ELFError, ValueError, KeyError):
            return
        sections = self.code
        if arch is Arch.ARM_CORTEX_M:
            md = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)
        else:
            md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV32 | capstone.CS_MODE_RISCVC)
        seen: set[int] = set()
        for site in self.functions:
            sym = symbols.symbols[site.name]
            code = _bytes_at(sections, sym.address, sym.size)
            if code is None:
                continue
            for insn in _sweep(md, code, sym.address, data_ranges):
                if insn.address in seen:
                    continue
                target = _branch_target(arch, insn)
                if target is None:
                    continue
                seen.add(insn.address)
                entry = symbols.line_at(insn.address)
                if entry is None:
                    continue
                self.branches.append(BranchSite(insn.address, target, insn.address + insn.size, entry.file, entry.line))


def _code_sections(elf_bytes: bytes) -> list[tuple[int, bytes]]:
    """(address, contents) of the ELF's executable sections."""
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        return [
            (s["sh_addr"], s.data()) for s in elf.iter_sections()
            if s["sh_flags"] & 0x4 and s["sh_type"] == "SHT_PROGBITS" and s["sh_size"]  # SHF_EXECINSTR
        ]
    except (ELFError, ValueError, KeyError):
        return []


def _weak_symbols(elf_bytes: bytes) -> set[str]:
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        return {
            sym.name for section in elf.iter_sections() if isinstance(section, SymbolTableSection)
            for sym in section.iter_symbols() if sym["st_info"]["bind"] == "STB_WEAK"
        }
    except (ELFError, ValueError, KeyError):
        return set()


def _data_ranges(elf: ELFFile) -> list[tuple[int, int]]:
    """[start, end) ranges that ARM mapping symbols mark as data ($d up to the next $t/$a/$x)."""
    marks: list[tuple[int, str]] = []
    for section in elf.iter_sections():
        if not isinstance(section, SymbolTableSection):
            continue
        for sym in section.iter_symbols():
            if sym.name.startswith("$") and sym.name[1:2] in ("d", "t", "a", "x"):
                marks.append((sym["st_value"], sym.name[1]))
    marks.sort()
    out: list[tuple[int, int]] = []
    for i, (addr, kind) in enumerate(marks):
        if kind != "d":
            continue
        end = next((a for a, k in marks[i + 1:] if k != "d" and a > addr), 1 << 32)
        out.append((addr, end))
    return out


def _bytes_at(sections: list[tuple[int, bytes]], address: int, size: int) -> bytes | None:
    for base, data in sections:
        if base <= address and address + size <= base + len(data):
            return data[address - base : address - base + size]
    return None


def _sweep(md: capstone.Cs, code: bytes, base: int, data: list[tuple[int, int]]) -> Iterable[Any]:
    """Linear disassembly, skipping data ranges and resuming after undecodable bytes."""
    off = 0
    starts = [d[0] for d in data]
    while off < len(code):
        addr = base + off
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and data[i][0] <= addr < data[i][1]:
            off = data[i][1] - base
            continue
        progressed = False
        for insn in md.disasm(code[off:], addr):
            j = bisect.bisect_right(starts, insn.address) - 1
            if j >= 0 and data[j][0] <= insn.address < data[j][1]:
                break
            progressed = True
            off = insn.address + insn.size - base
            yield insn
        if not progressed:
            off += 2


def _branch_target(arch: Arch, insn: Any) -> int | None:
    m = _LAST_INT.search(insn.op_str)
    if m is None:
        return None
    value = int(m.group(1), 0)
    if arch is Arch.ARM_CORTEX_M:
        if _ARM_COND_BRANCH.match(insn.mnemonic) or insn.mnemonic in _ARM_CB:
            return value & 0xFFFFFFFF
        return None
    if insn.mnemonic in _RISCV_BRANCHES:
        return (insn.address + value) & 0xFFFFFFFF  # capstone prints RISC-V offsets
    return None


def compute(analysis: ProgramAnalysis, blocks: Blocks, edges: Edges | None = None) -> list[FileResult]:
    """Map executed blocks onto the program's lines, functions and branches."""
    # execution count of each line-table row and branch site: the sum over the blocks
    # containing it (count 0 = "executed, count unknown" counts as 1)
    entry_counts = [0] * len(analysis.entries)
    branch_counts = [0] * len(analysis.branches)
    containing: dict[int, list[int]] = {}  # branch index -> starts of blocks containing it
    starts: dict[int, int] = {}
    for start, (size, count) in blocks.items():
        eff = count or 1
        starts[start] = starts.get(start, 0) + eff
        lo = bisect.bisect_left(analysis.entry_addrs, start)
        hi = bisect.bisect_left(analysis.entry_addrs, start + max(size, 1))
        for i in range(lo, hi):
            entry_counts[i] += eff
        lo = bisect.bisect_left(analysis.branch_addrs, start)
        hi = bisect.bisect_left(analysis.branch_addrs, start + max(size, 1))
        for i in range(lo, hi):
            branch_counts[i] += eff
            containing.setdefault(i, []).append(start)

    def address_count(address: int) -> int:
        total = 0
        for start, (size, count) in blocks.items():
            if start <= address < start + max(size, 1):
                total += count or 1
        return total

    files: dict[str, FileResult] = {p: FileResult(p, dict.fromkeys(sorted(lines), 0)) for p, lines in analysis.lines.items()}
    for entry, count in zip(analysis.entries, entry_counts, strict=True):
        lines = files[entry.file].lines
        lines[entry.line] = max(lines[entry.line], count)
    for fn in analysis.functions:
        files[fn.file].functions.append(FunctionResult(fn.name, fn.line, fn.address, address_count(fn.address)))
    for i, site in enumerate(analysis.branches):
        n = branch_counts[i]
        taken: int | None = None
        not_taken: int | None = None
        if n:
            if edges is not None:
                sources = {site.address, *containing.get(i, [])}
                taken = sum(c or 1 for (a, b), c in edges.items() if b == site.target and a in sources)
                not_taken = sum(c or 1 for (a, b), c in edges.items() if b == site.fallthrough and a in sources)
            else:
                taken = min(n, starts.get(site.target, 0))
                not_taken = min(n, starts.get(site.fallthrough, 0))
        files[site.file].branches.append(BranchResult(site.line, site.address, site.target, site.fallthrough, taken, not_taken))
    return [files[p] for p in sorted(files)]


# --------------------------------------------------------------------------- the manager


@dataclass
class SessionCoverage:
    """Coverage state of one live session."""

    collecting: bool = False
    program: str = ""  # program id when collection started
    last_blocks: Blocks | None = None  # what the last StopCoverage stored
    last_edges: Edges | None = None


@dataclass
class Source:
    """Blocks from a session or a stored report, and whose they are."""

    name: str
    program: str
    sessions: list[str]
    blocks: Blocks
    edges: Edges | None


class CoverageManager:
    def __init__(self, db: Database, blobs: BlobStore, sessions: SessionManager, programs: ProgramStore) -> None:
        self._db = db
        self._blobs = blobs
        self._sessions = sessions
        self._programs = programs
        self._state: dict[str, SessionCoverage] = {}
        self._analyses: dict[tuple[str, str], ProgramAnalysis] = {}
        sessions.power_on_hooks.append(self._on_power_on)
        sessions.delete_hooks.append(self._on_delete)

    # ------------------------------------------------------------------ session hooks

    async def _on_power_on(self, live: LiveSession) -> None:
        """A fresh machine: what an earlier one collected is gone; keep collecting."""
        st = self._state.get(live.id)
        if st is None or not st.collecting or live.machine is None:
            return
        try:
            with driver_errors(live):
                await live.machine.capability(CoverageCapability).coverage_start()
        except Exception as exc:  # the session still powers on, just without coverage
            log.warning("coverage_restart_failed", session_id=live.id, error=str(exc))
            st.collecting = False

    def _on_delete(self, live: LiveSession) -> None:
        self._state.pop(live.id, None)

    # ------------------------------------------------------------------ collection

    def _analysis_for(self, program_id: str, arch: Arch | None, field_name: str = "name") -> ProgramAnalysis:
        prog = self._programs.get(program_id, field_name)
        key = (prog.id, arch.value if arch else "")
        hit = self._analyses.get(key)
        if hit is not None:
            return hit
        _, symbols = self._programs.load(prog)
        if symbols is None or not symbols.has_lines:
            raise FailedPrecondition(
                f"program {prog.id} has no DWARF line table; build it with -g for coverage"
            )
        analysis = ProgramAnalysis(self._blobs.get(prog.sha256), symbols, arch)
        self._analyses[key] = analysis
        return analysis

    async def start(self, live: LiveSession) -> None:
        live.feature(Feature.COVERAGE)
        if not live.record.program:
            raise FailedPrecondition(f"session {live.id} has no program loaded; load an ELF with debug info")
        self._analysis_for(live.record.program, live.board.arch)
        async with live.lock:
            machine = live.require_machine("start coverage")
            with driver_errors(live):
                await machine.capability(CoverageCapability).coverage_start()
        st = self._state.setdefault(live.id, SessionCoverage())
        st.collecting = True
        st.program = live.record.program

    def _started(self, live: LiveSession, action: str) -> SessionCoverage:
        st = self._state.get(live.id)
        if st is None or not st.collecting:
            raise FailedPrecondition(
                f"cannot {action}: coverage was not started in session {live.id}",
                state="not collecting", required="collecting",
            )
        return st

    async def _collect(self, live: LiveSession) -> tuple[Blocks, Edges | None]:
        machine = live.require_machine("read coverage")
        with driver_errors(live):
            part = machine.capability(CoverageCapability)
            blocks: Blocks = dict(await part.coverage_blocks())
            edges = normalize_edges(await part.coverage_edges())
        return blocks, edges

    async def stop(self, live: LiveSession, owner: str = "") -> CoverageReportRecord:
        st = self._started(live, "stop coverage")
        async with live.lock:
            machine = live.require_machine("stop coverage")
            with driver_errors(live):
                await machine.capability(CoverageCapability).coverage_stop()
            blocks, edges = await self._collect(live)
        st.collecting = False
        st.last_blocks, st.last_edges = blocks, edges
        program = st.program or live.record.program
        return self._store(program, [live.id], blocks, edges, owner, live.board.arch)

    async def reset(self, live: LiveSession) -> None:
        st = self._state.get(live.id)
        if st is None:
            raise FailedPrecondition(
                f"cannot reset coverage: coverage was never started in session {live.id}",
                state="never started", required="started",
            )
        if live.machine is not None and live.state is not MachineState.OFF:
            async with live.lock:
                machine = live.require_machine("reset coverage")
                with driver_errors(live):
                    await machine.capability(CoverageCapability).coverage_reset()
        st.last_blocks = {} if st.last_blocks is not None else None
        st.last_edges = None

    # ------------------------------------------------------------------ reports

    def _store(
        self, program: str, sessions: list[str], blocks: Blocks, edges: Edges | None, owner: str,
        arch: Arch | None,
    ) -> CoverageReportRecord:
        files = compute(self._analysis_for(program, arch), blocks, edges)
        totals = Counts()
        for f in files:
            totals = totals + f.counts
        rec = CoverageReportRecord(
            id="cov-" + secrets.token_hex(6),
            program=program,
            sessions=sessions,
            blocks=blocks_to_list(blocks),
            edges=None if edges is None else [[a, b, c] for (a, b), c in sorted(edges.items())],
            totals=totals.to_dict(),
            owner=owner,
        )
        self._db.put(TABLE, record_row(rec, program=program))
        log.info("coverage_report_stored", report=rec.id, program=program, blocks=len(blocks))
        return rec

    def get(self, name: str, field_name: str = "name") -> CoverageReportRecord:
        rid = resource_id(name, COLLECTION, field_name)
        row = self._db.get(TABLE, rid)
        if row is None:
            raise NotFound("coverage report", rid)
        return from_row(CoverageReportRecord, row["data"])

    def list(self, page_size: int, page_token: str, filter_text: str) -> Page[CoverageReportRecord]:
        terms = parse_filter(filter_text, ["program", "session"])
        if "program" in terms:
            terms["program"] = terms["program"].removeprefix("programs/")
        if "session" in terms:
            terms["session"] = terms["session"].removeprefix("sessions/")
        getters = {
            "program": lambda r: r.program,
            "session": lambda r: terms["session"] if terms.get("session") in r.sessions else "",
        }
        rows = self._db.rows(TABLE, order_by="create_time DESC, id")
        items = [r for r in (from_row(CoverageReportRecord, x["data"]) for x in rows) if match_terms(terms, getters, r)]
        return paginate(items, page_size, page_token, filter_text)

    async def source(self, name: str, field_name: str = "name") -> tuple[Source, Arch | None]:
        """Blocks named by "sessions/{id}" (live, or its last stopped collection) or by
        "coverageReports/{id}"."""
        if name.startswith("sessions/"):
            live = self._sessions.get(name, field_name)
            st = self._state.get(live.id)
            if st is None:
                raise FailedPrecondition(f"no coverage collected in session {live.id}; start coverage first")
            if st.collecting and live.machine is not None and live.state is not MachineState.OFF:
                blocks, edges = await self._collect(live)
            elif st.last_blocks is not None:
                blocks, edges = st.last_blocks, st.last_edges
            else:
                raise FailedPrecondition(
                    f"no coverage collected in session {live.id}: its machine was powered off"
                )
            return Source(name, st.program or live.record.program, [live.id], blocks, edges), live.board.arch
        if name.startswith(COLLECTION + "/") or "/" not in name:
            rec = self.get(name, field_name)
            return Source(
                rec.name, rec.program, list(rec.sessions), blocks_from_list(rec.blocks),
                None if rec.edges is None else {(a, b): c for a, b, c in rec.edges},
            ), self._arch_of(rec.program)
        raise InvalidArgument(field_name, f"{name!r} is neither sessions/ID nor {COLLECTION}/ID")

    def _arch_of(self, program_id: str) -> Arch | None:
        """The architecture of a stored report's program (for its branch sites): from the
        ELF header."""
        prog = self._programs.get(program_id, "program")
        try:
            machine = ELFFile(io.BytesIO(self._blobs.get(prog.sha256))).header["e_machine"]
        except (ELFError, ValueError, KeyError):
            return None
        return {"EM_ARM": Arch.ARM_CORTEX_M, "EM_RISCV": Arch.RISCV32}.get(machine)

    async def result(self, name: str, field_name: str = "name") -> CoverageResult:
        src, arch = await self.source(name, field_name)
        if not src.program:
            raise FailedPrecondition(f"{name}: no program to map the coverage onto")
        files = compute(self._analysis_for(src.program, arch, field_name), src.blocks, src.edges)
        return CoverageResult(src.program, src.sessions, files, name=src.name)

    async def merge(self, names: builtins.list[str], owner: str = "") -> CoverageReportRecord:
        if not names:
            raise InvalidArgument("names", "name at least one session or coverage report")
        sources: builtins.list[Source] = []
        arch: Arch | None = None
        for i, name in enumerate(names):
            src, a = await self.source(name, f"names[{i}]")
            sources.append(src)
            arch = arch or a
        first = sources[0]
        sha = self._programs.get(first.program, "names").sha256
        for src in sources[1:]:
            if src.program != first.program and self._programs.get(src.program, "names").sha256 != sha:
                raise FailedPrecondition(
                    f"{src.name} covers program {src.program}, {first.name} covers {first.program}; "
                    "only reports of the same program merge"
                )
        blocks: Blocks = {}
        edges: Edges | None = {}
        sessions: builtins.list[str] = []
        for src in sources:
            merge_blocks(blocks, src.blocks)
            if src.edges is None or edges is None:
                edges = None
            else:
                for pair, count in src.edges.items():
                    edges[pair] = edges.get(pair, 0) + count
            sessions.extend(s for s in src.sessions if s not in sessions)
        return self._store(first.program, sessions, blocks, edges, owner, arch)

"""What coverage needs to know about a program, from its ELF alone (pyelftools, capstone),
computed once per program and architecture: :class:`ProgramAnalysis`.

* **Lines**: the ``is_stmt`` rows of the DWARF line table that lie in executable
  sections (the linker's ``--gc-sections`` leaves discarded functions' rows at address
  0: not lines of this program; a discarded function's rows that land inside a kept
  executable section would still count).
* **Functions**: every function symbol whose address starts a line-table row (it has
  debug info); aliases at one address (weak handlers aliasing ``Default_Handler``) fold
  into the strong name; static functions of the same name in two files: the first wins.
* **Instructions**: the functions' code, disassembled linearly with capstone (skipping
  the data that ARM ``$d`` mapping symbols mark) and classified by how control leaves
  each instruction (:class:`Flow`).
* **Branch sites**: every conditional branch (Thumb ``b<cond>``/``cbz``/``cbnz``; RISC-V
  ``beq``/``bne``/``blt``/``bge``/``bltu``/``bgeu``, their aliases and ``c.beqz``/
  ``c.bnez``), with its target and fall-through, attributed to its source line, and what
  the rest of the code says about how its two successors can be reached
  (:class:`BranchSite`): the mapping uses that to derive taken/not-taken counts from
  execution counts where a backend reports no edges. Conditional execution without a
  branch (Thumb ``IT`` blocks) is not a branch here.
"""

from __future__ import annotations

import bisect
import enum
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import capstone
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from machineserver.server.core.symbols import LineEntry, SymbolTable
from machineserver.server.drivers.base import Arch


class Flow(enum.Enum):
    """How control leaves an instruction."""

    NEXT = "next"  # on to the next instruction (everything that is not a transfer)
    CONDITIONAL = "conditional"  # a conditional branch: its target or the next instruction
    JUMP = "jump"  # a direct jump: its target only
    CALL = "call"  # a call: the next instruction when (if) the callee returns
    RETURN = "return"  # a return (from a call or an exception): not the next instruction
    INDIRECT = "indirect"  # an indirect jump (jump table, computed): targets unknown


@dataclass(frozen=True)
class Instruction:
    address: int
    size: int
    flow: Flow
    target: int | None  # a direct transfer's destination

    @property
    def end(self) -> int:
        return self.address + self.size


class InflowKind(enum.Enum):
    NONE = "none"  # the instruction before the target cannot fall through into it
    INSTRUCTION = "instruction"  # ... is not a transfer: it runs on into the target
    BRANCH = "branch"  # ... is another conditional branch, not taken into the target


@dataclass(frozen=True)
class TargetInflow:
    """How a branch target is reached besides this branch (which is its only direct
    transfer): by falling through from the instruction before it, or not at all."""

    kind: InflowKind
    address: int = 0  # the instruction before the target (INSTRUCTION, BRANCH)


@dataclass(frozen=True)
class BranchSite:
    address: int
    target: int
    fallthrough: int
    file: str
    line: int
    # the fall-through address is reached only by not taking this branch (no direct
    # transfer goes there, it is no function entry, the function has no indirect jumps)
    fallthrough_only: bool = False
    # the target is reached only by this branch plus what this says (None: it may be
    # reached in other ways too: other transfers, after a call returns, indirectly)
    target_inflow: TargetInflow | None = None


@dataclass(frozen=True)
class FunctionSite:
    name: str
    address: int
    file: str
    line: int


_ARM_COND_BRANCH = re.compile(r"^b(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le)(\.[nw])?$")
_ARM_CB = frozenset({"cbz", "cbnz"})
_ARM_JUMPS = frozenset({"b", "b.n", "b.w"})
_ARM_CALLS = frozenset({"bl", "blx"})
_RISCV_BRANCHES = frozenset({
    "beq", "bne", "blt", "bge", "bltu", "bgeu",  # base
    "beqz", "bnez", "blez", "bgez", "bltz", "bgtz", "bgt", "ble", "bgtu", "bleu",  # aliases
    "c.beqz", "c.bnez",
})
_RISCV_JUMPS = frozenset({"j", "c.j"})
_RISCV_CALLS = frozenset({"jal", "c.jal", "jalr", "c.jalr"})
_RISCV_RETURNS = frozenset({"ret", "mret", "sret", "uret"})
_LAST_INT = re.compile(r"(-?(?:0x[0-9a-fA-F]+|\d+))\s*$")


def _immediate(op_str: str) -> int | None:
    m = _LAST_INT.search(op_str)
    return None if m is None else int(m.group(1), 0)


def classify(arch: Arch, address: int, size: int, mnemonic: str, op_str: str) -> Instruction:
    """One decoded instruction (capstone's mnemonic and operands) as an :class:`Instruction`."""
    ops = op_str.replace(" ", "")
    if arch is Arch.ARM_CORTEX_M:
        if _ARM_COND_BRANCH.match(mnemonic) or mnemonic in _ARM_CB:
            return _direct(address, size, Flow.CONDITIONAL, _immediate(op_str), 0)
        if mnemonic in _ARM_JUMPS:
            return _direct(address, size, Flow.JUMP, _immediate(op_str), 0)
        if mnemonic in _ARM_CALLS:
            target = _immediate(op_str) if op_str.startswith("#") else None
            return Instruction(address, size, Flow.CALL, None if target is None else target & ~1)
        if mnemonic == "bx":
            return Instruction(address, size, Flow.RETURN if ops == "lr" else Flow.INDIRECT, None)
        if (mnemonic.startswith(("pop", "ldm")) and "pc}" in ops) or (mnemonic.startswith("ldr") and ops.startswith("pc,[sp],")):
            return Instruction(address, size, Flow.RETURN, None)
        if mnemonic in ("tbb", "tbh") or ops.startswith("pc,"):
            return Instruction(address, size, Flow.INDIRECT, None)
        return Instruction(address, size, Flow.NEXT, None)
    # RISC-V: capstone prints the offsets of direct transfers
    if mnemonic in _RISCV_BRANCHES:
        return _direct(address, size, Flow.CONDITIONAL, _immediate(op_str), address)
    if mnemonic in _RISCV_JUMPS:
        return _direct(address, size, Flow.JUMP, _immediate(op_str), address)
    if mnemonic in _RISCV_RETURNS or (mnemonic in ("jr", "c.jr") and ops == "ra"):
        return Instruction(address, size, Flow.RETURN, None)
    if mnemonic in ("jr", "c.jr"):
        return Instruction(address, size, Flow.INDIRECT, None)
    if mnemonic in _RISCV_CALLS:
        direct = mnemonic in ("jal", "c.jal")
        offset = _immediate(op_str) if direct else None
        return Instruction(address, size, Flow.CALL, None if offset is None else (address + offset) & 0xFFFFFFFF)
    return Instruction(address, size, Flow.NEXT, None)


def _direct(address: int, size: int, flow: Flow, value: int | None, base: int) -> Instruction:
    if value is None:  # not the form we know: no known target, no known way on
        return Instruction(address, size, Flow.INDIRECT, None)
    return Instruction(address, size, flow, (base + value) & 0xFFFFFFFF)


class ProgramAnalysis:
    """What coverage needs from one program (see the module docstring)."""

    def __init__(self, elf: bytes, symbols: SymbolTable, arch: Arch | None) -> None:
        self.code = _code_sections(elf)
        self.entries: list[LineEntry] = [
            e for e in symbols.lines() if _bytes_at(self.code, e.address, 1) is not None
        ]
        self.lines: dict[str, set[int]] = {}
        for e in self.entries:
            self.lines.setdefault(e.file, set()).add(e.line)
        self.functions: list[FunctionSite] = []
        weak = _weak_symbols(elf)
        seen_addresses: set[int] = set()
        for sym in sorted(symbols.symbols.values(), key=lambda s: (s.address, s.name in weak, s.name)):
            if sym.kind != "func" or sym.address in seen_addresses:
                continue
            seen_addresses.add(sym.address)
            entry = symbols.line_at(sym.address)
            if entry is None or not symbols.is_line_start(sym.address) or not _bytes_at(self.code, sym.address, 1):
                continue
            self.functions.append(FunctionSite(sym.name, sym.address, entry.file, entry.line))
        # every function symbol's address may be entered indirectly (a pointer, a vector)
        self._entry_points = frozenset(s.address for s in symbols.symbols.values() if s.kind == "func")
        self.branches: list[BranchSite] = []
        if arch is not None:
            self.branches = self._find_branches(elf, symbols, arch)
        self.branches.sort(key=lambda b: b.address)
        self.points = self._points()

    def _find_branches(self, elf_bytes: bytes, symbols: SymbolTable, arch: Arch) -> list[BranchSite]:
        try:
            data_ranges = _data_ranges(ELFFile(io.BytesIO(elf_bytes)))
        except (ELFError, ValueError, KeyError):
            return []
        if arch is Arch.ARM_CORTEX_M:
            md = capstone.Cs(capstone.CS_ARCH_ARM, capstone.CS_MODE_THUMB | capstone.CS_MODE_MCLASS)
        else:
            md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV32 | capstone.CS_MODE_RISCVC)
        by_function: list[list[Instruction]] = []
        seen: set[int] = set()
        for function in self.functions:
            sym = symbols.symbols[function.name]
            code = _bytes_at(self.code, sym.address, sym.size)
            if code is None:
                continue
            insns = [i for i in _sweep(md, arch, code, sym.address, data_ranges) if i.address not in seen]
            seen.update(i.address for i in insns)
            by_function.append(insns)
        targets: dict[int, int] = {}  # address -> direct transfers to it
        for insns in by_function:
            for insn in insns:
                if insn.target is not None:
                    targets[insn.target] = targets.get(insn.target, 0) + 1
        out: list[BranchSite] = []
        for insns in by_function:
            indirect = any(i.flow is Flow.INDIRECT for i in insns)
            ending_at = {i.end: i for i in insns}
            for insn in insns:
                if insn.flow is not Flow.CONDITIONAL or insn.target is None:
                    continue
                entry = symbols.line_at(insn.address)
                if entry is None:
                    continue
                site = BranchSite(insn.address, insn.target, insn.end, entry.file, entry.line)
                if not indirect and insn.target != insn.end:
                    site = BranchSite(
                        site.address, site.target, site.fallthrough, site.file, site.line,
                        fallthrough_only=insn.end not in targets and insn.end not in self._entry_points,
                        target_inflow=self._target_inflow(insn, targets, ending_at),
                    )
                out.append(site)
        return out

    def _target_inflow(self, branch: Instruction, targets: dict[int, int],
                       ending_at: dict[int, Instruction]) -> TargetInflow | None:
        target = branch.target
        if target is None or targets.get(target) != 1 or target in self._entry_points:
            return None
        before = ending_at.get(target)
        if before is None or before.flow in (Flow.JUMP, Flow.RETURN, Flow.INDIRECT):
            return TargetInflow(InflowKind.NONE)
        if before.flow is Flow.NEXT:
            return TargetInflow(InflowKind.INSTRUCTION, before.address)
        if before.flow is Flow.CONDITIONAL and before.target != target:
            return TargetInflow(InflowKind.BRANCH, before.address)
        return None  # after a call: its returns are not counted anywhere

    def _points(self) -> list[int]:
        """Every address whose execution count the mapping reads."""
        points = {e.address for e in self.entries} | {f.address for f in self.functions}
        for b in self.branches:
            points.update((b.address, b.target, b.fallthrough))
            if b.target_inflow is not None and b.target_inflow.kind is not InflowKind.NONE:
                points.add(b.target_inflow.address)
        return sorted(points)


def _code_sections(elf_bytes: bytes) -> list[tuple[int, bytes]]:
    """(address, contents) of the ELF's executable sections."""
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        return [
            (int(s["sh_addr"]), bytes(s.data())) for s in elf.iter_sections()
            if s["sh_flags"] & 0x4 and s["sh_type"] == "SHT_PROGBITS" and s["sh_size"]  # SHF_EXECINSTR
        ]
    except (ELFError, ValueError, KeyError):
        return []


def _weak_symbols(elf_bytes: bytes) -> set[str]:
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        return {
            str(sym.name) for section in elf.iter_sections() if isinstance(section, SymbolTableSection)
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
            name = str(sym.name)
            if name.startswith("$") and name[1:2] in ("d", "t", "a", "x"):
                marks.append((int(sym["st_value"]), name[1]))
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


def _sweep(md: capstone.Cs, arch: Arch, code: bytes, base: int,
           data: list[tuple[int, int]]) -> Iterator[Instruction]:
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
            address, size = int(insn.address), int(insn.size)
            j = bisect.bisect_right(starts, address) - 1
            if j >= 0 and data[j][0] <= address < data[j][1]:
                break
            progressed = True
            off = address + size - base
            yield classify(arch, address, size, str(insn.mnemonic), str(insn.op_str))
        if not progressed:
            off += 2

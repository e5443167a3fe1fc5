"""Call-frame information from an ELF's DWARF (.debug_frame, else .eh_frame), through
pyelftools: for a pc, how to find the caller's frame (the CFA rule and where registers
were saved). Used for backtraces and for stepping out of a function."""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.callframe import FDE, CFARule, RegisterRule
from elftools.elf.elffile import ELFFile


@dataclass(frozen=True)
class FrameRule:
    cfa_register: int
    cfa_offset: int
    saved: dict[int, int]  # DWARF register number -> offset from the CFA where it is saved
    return_register: int


class FrameTable:
    def __init__(self, elf_bytes: bytes) -> None:
        self._starts: list[int] = []
        self._rows: list[tuple[int, int, list[dict[object, object]], int]] = []  # (start, end, table, ra column)
        try:
            elf = ELFFile(io.BytesIO(elf_bytes))
            if not elf.has_dwarf_info():
                return
            dwarf = elf.get_dwarf_info()
            entries = dwarf.CFI_entries() if dwarf.has_CFI() else (dwarf.EH_CFI_entries() if dwarf.has_EH_CFI() else [])
            for entry in entries:
                if not isinstance(entry, FDE):
                    continue
                start = entry.header["initial_location"]
                end = start + entry.header["address_range"]
                if entry.cie is None:
                    continue
                ra = entry.cie.header["return_address_register"]
                self._rows.append((start & ~1, end & ~1, entry.get_decoded().table, ra))
        except (ELFError, DWARFError, ValueError, KeyError, IndexError, AttributeError):
            self._rows = []
        self._rows.sort(key=lambda r: r[0])
        self._starts = [r[0] for r in self._rows]

    @property
    def available(self) -> bool:
        return bool(self._rows)

    def rule_at(self, pc: int) -> FrameRule | None:
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0:
            return None
        start, end, table, ra = self._rows[i]
        if not start <= pc < end or not table:
            return None
        row = None
        for candidate in table:
            line_pc = candidate["pc"]
            if isinstance(line_pc, int) and line_pc & ~1 <= pc:
                row = candidate
            else:
                break
        if row is None:
            return None
        cfa = row["cfa"]
        if not isinstance(cfa, CFARule) or cfa.reg is None:
            return None
        saved = {
            reg: rule.arg
            for reg, rule in row.items()
            # register numbers to offset rules (the row's other keys are "pc" and "cfa")
            if isinstance(reg, int) and isinstance(rule, RegisterRule) and rule.type == RegisterRule.OFFSET
            and isinstance(rule.arg, int)
        }
        return FrameRule(int(cfa.reg), int(cfa.offset or 0), saved, int(ra))

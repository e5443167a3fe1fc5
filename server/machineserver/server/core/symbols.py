"""Symbols and source lines from an ELF (pyelftools): name <-> address, address ->
function/file:line, file:line -> address."""

from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from machineserver.server.core.errors import InvalidArgument, NotFound
from machineserver.server.core.unwind import FrameTable


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    size: int
    kind: str  # "func" | "object"


@dataclass(frozen=True)
class LineEntry:
    address: int
    file: str
    line: int


class SymbolTable:
    def __init__(self, elf_bytes: bytes) -> None:
        self.symbols: dict[str, Symbol] = {}
        self._by_address: list[tuple[int, Symbol]] = []
        self._lines: list[LineEntry] = []  # sorted by address; is_stmt rows only
        try:
            elf = ELFFile(io.BytesIO(elf_bytes))
            self._read_symbols(elf)
            self._read_lines(elf)
        except (ELFError, DWARFError, ValueError, KeyError, IndexError):
            pass  # a stripped or odd ELF just has fewer symbols
        self._line_addrs = [e.address for e in self._lines]
        self.frames = FrameTable(elf_bytes)

    def _read_symbols(self, elf: ELFFile) -> None:
        for section in elf.iter_sections():
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.iter_symbols():
                kind = sym["st_info"]["type"]
                if kind not in ("STT_FUNC", "STT_OBJECT") or not sym.name:
                    continue
                if sym["st_shndx"] == "SHN_UNDEF":
                    continue
                addr = sym["st_value"]
                if kind == "STT_FUNC":
                    addr &= ~1  # Thumb bit
                s = Symbol(sym.name, addr, sym["st_size"], "func" if kind == "STT_FUNC" else "object")
                self.symbols.setdefault(s.name, s)
        self._by_address = sorted(((s.address, s) for s in self.symbols.values()), key=lambda t: (t[0], t[1].name))

    def _read_lines(self, elf: ELFFile) -> None:
        if not elf.has_dwarf_info():
            return
        dwarf = elf.get_dwarf_info()
        for cu in dwarf.iter_CUs():
            lineprog = dwarf.line_program_for_CU(cu)
            if lineprog is None:
                continue
            header = lineprog.header
            version = header["version"]
            files = header["file_entry"]
            dirs = header["include_directory"]
            comp_dir = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
            base_dir = comp_dir.value.decode(errors="replace") if comp_dir else ""
            for entry in lineprog.get_entries():
                st = entry.state
                if st is None or st.end_sequence or not st.is_stmt:
                    continue
                idx = st.file if version >= 5 else st.file - 1
                if not 0 <= idx < len(files):
                    continue
                fe = files[idx]
                name = fe.name.decode(errors="replace")
                d_idx = fe.dir_index if version >= 5 else fe.dir_index - 1
                if not os.path.isabs(name):
                    if 0 <= d_idx < len(dirs):
                        name = os.path.join(dirs[d_idx].decode(errors="replace"), name)
                    if not os.path.isabs(name) and base_dir:
                        name = os.path.join(base_dir, name)
                self._lines.append(LineEntry(st.address, os.path.normpath(name), st.line))
        self._lines.sort(key=lambda e: e.address)

    # ------------------------------------------------------------------ queries

    def lookup(self, name: str) -> Symbol:
        sym = self.symbols.get(name)
        if sym is None:
            raise NotFound("symbol", name)
        return sym

    def symbol_at(self, address: int) -> tuple[Symbol, int] | None:
        """The symbol containing address, and the offset into it."""
        i = bisect.bisect_right(self._by_address, address, key=lambda t: t[0]) - 1
        while i >= 0:
            start, sym = self._by_address[i]
            if address < start + max(sym.size, 1):
                return sym, address - start
            if sym.size:  # sized symbol that ends before address: none contains it
                return None
            i -= 1
        return None

    def function_at(self, address: int) -> Symbol | None:
        hit = self.symbol_at(address)
        return hit[0] if hit and hit[0].kind == "func" else None

    def line_at(self, address: int) -> LineEntry | None:
        i = bisect.bisect_right(self._line_addrs, address) - 1
        if i < 0:
            return None
        entry = self._lines[i]
        func = self.function_at(address)
        if func and not func.address <= entry.address:
            return None
        return entry

    def address_of_line(self, file_line: str) -> int:
        """The lowest address of ``file:line``; the file matches by path suffix."""
        file_part, sep, line_part = file_line.rpartition(":")
        if not sep or not file_part or not line_part.isdigit():
            raise InvalidArgument("file_line", f"{file_line!r} is not FILE:LINE")
        line = int(line_part)
        suffix = os.path.normpath(file_part)
        matches = [
            e.address
            for e in self._lines
            if e.line == line and (e.file == suffix or e.file.endswith(os.sep + suffix))
        ]
        if not matches:
            raise NotFound("source line", file_line)
        return min(matches)

    def is_line_start(self, address: int) -> bool:
        """Whether a source line's code begins exactly at address."""
        i = bisect.bisect_left(self._line_addrs, address)
        return i < len(self._line_addrs) and self._line_addrs[i] == address

    @property
    def has_lines(self) -> bool:
        return bool(self._lines)

    def lines(self) -> list[LineEntry]:
        return list(self._lines)

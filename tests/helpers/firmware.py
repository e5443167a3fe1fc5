"""The test firmware (tests/firmware): images built with the boards' cross compilers by
``make -C tests/firmware`` (on demand, once per board), else the committed prebuilt
samples; and the symbols, functions and code in their ELF files."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers.tools import find_tool, tool_missing

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "tests" / "firmware"
BUILD = FIRMWARE / "build"
PREBUILT = FIRMWARE / "prebuilt"
BOARDS = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")
ARM_BOARDS = BOARDS[:3]
# the cross compiler each board's firmware is built with (tests/firmware/Makefile)
COMPILERS = {board: "arm-none-eabi-gcc" for board in ARM_BOARDS} | {"sifive_e": "riscv64-unknown-elf-gcc"}

_build_lock = threading.Lock()


def ensure_firmware(board: str) -> Path | None:
    """The board's build directory, built with make if its images are missing; None when
    they cannot be built here (no make or no cross compiler)."""
    out = BUILD / board
    if (out / "hello.elf").exists():
        return out
    if find_tool("make") is None or find_tool(COMPILERS.get(board, "")) is None:
        return None
    with _build_lock:
        BUILD.mkdir(parents=True, exist_ok=True)
        # other pytest processes may share this checkout: one make at a time
        with open(BUILD / ".build-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not (out / "hello.elf").exists():
                    subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BOARDS={board}"],
                                   capture_output=True, check=False, timeout=300)
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock, fcntl.LOCK_UN)
    return out if (out / "hello.elf").exists() else None


def firmware(board: str, program: str, ext: str = "elf") -> Path:
    """A test firmware image: from build/ (made on demand), else the committed prebuilt
    sample. Without either, the board's cross compiler is missing: skipped, or failed
    under scripts/test (tools.tool_missing)."""
    built = ensure_firmware(board)
    if built is not None and (built / f"{program}.{ext}").exists():
        return built / f"{program}.{ext}"
    prebuilt = PREBUILT / board / f"{program}.{ext}"
    if prebuilt.exists():
        return prebuilt
    if built is not None:
        pytest.fail(f"firmware {board}/{program}.{ext} is not among what make -C tests/firmware builds "
                    f"(see tests/firmware/boards/{board}/board.mk)", pytrace=False)
    tool_missing(COMPILERS.get(board, "arm-none-eabi-gcc"),
                 f"firmware {board}/{program}.{ext} not built (run make -C tests/firmware)")


def _elf_symbol_entry(elf: Path, name: str) -> Any:
    with elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert symtab is not None, f"{elf} has no symbol table"
        syms = symtab.get_symbol_by_name(name)  # type: ignore[attr-defined]
        assert syms, f"no symbol {name} in {elf}"
        return syms[0]


def elf_symbol_value(elf: Path, name: str) -> int:
    """A symbol's st_value as the ELF has it (a Thumb function's has bit 0 set)."""
    return int(_elf_symbol_entry(elf, name)["st_value"])


def elf_address(elf: Path, name: str) -> int:
    """Where a symbol is: its value with bit 0 (a Thumb function's mode bit) cleared, so
    a function's first instruction (the test firmware's data symbols are word-aligned:
    unchanged)."""
    return elf_symbol_value(elf, name) & ~1


def elf_function(elf: Path, name: str) -> range:
    """The addresses a function's code spans (at least its first byte)."""
    sym = _elf_symbol_entry(elf, name)
    start = int(sym["st_value"]) & ~1
    return range(start, start + max(1, int(sym["st_size"])))


def elf_symbol(board: str, program: str, name: str) -> int:
    """:func:`elf_address` of a symbol in a test firmware (built on demand)."""
    return elf_address(firmware(board, program), name)


def elf_entry(elf: Path) -> int:
    """The ELF header's entry point as it stands (a Thumb entry has bit 0 set)."""
    with elf.open("rb") as f:
        return int(ELFFile(f).header.e_entry)


def code_addresses(elf: Path) -> list[int]:
    """Every halfword of the program's .text: where instructions can start."""
    with elf.open("rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        assert text is not None, f"{elf} has no .text"
        return list(range(int(text["sh_addr"]), int(text["sh_addr"]) + int(text["sh_size"]), 2))

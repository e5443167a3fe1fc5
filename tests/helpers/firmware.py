"""The test firmware (tests/firmware): images built with the boards' cross compilers by
``make -C tests/firmware`` (on demand, once per board), else the committed prebuilt
samples; and the symbols in their ELF files."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import threading
from pathlib import Path

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


def elf_symbol_value(elf: Path, name: str) -> int:
    """A symbol's st_value as the ELF has it (a Thumb function's has bit 0 set)."""
    with elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert symtab is not None, f"{elf} has no symbol table"
        syms = symtab.get_symbol_by_name(name)  # type: ignore[attr-defined]
        assert syms, f"no symbol {name} in {elf}"
        return int(syms[0]["st_value"])


def elf_symbol(board: str, program: str, name: str) -> int:
    """The address of a symbol in a test firmware (Thumb bit cleared: where the code is)."""
    return elf_symbol_value(firmware(board, program), name) & ~1

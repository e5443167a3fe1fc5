"""Program images: ELF (pyelftools), Intel HEX (intelhex) and raw BIN, parsed into
loadable segments, and checked against a board before loading."""

from __future__ import annotations

import enum
import io
import itertools
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from intelhex import HexReaderError, IntelHex

from machineserver.server.core.errors import InvalidArgument
from machineserver.server.drivers.base import Arch, BoardSpec, ProgramImage, Segment

EM_ARM = "EM_ARM"
EM_RISCV = "EM_RISCV"
ADDRESS_SPACE = 1 << 32
# the most memory one loadable segment may claim (its zero-filled .bss included): more than
# any board's memory region, small enough that a crafted p_memsz cannot exhaust the host
MAX_SEGMENT_BYTES = 256 << 20


class ImageFormat(enum.StrEnum):
    ELF = "ELF"
    BIN = "BIN"
    IHEX = "IHEX"


@dataclass(frozen=True)
class ParsedImage:
    image: ProgramImage
    has_symbols: bool = False
    has_debug_info: bool = False


def detect_format(head: bytes) -> ImageFormat | None:
    if head.startswith(b"\x7fELF"):
        return ImageFormat.ELF
    if head.lstrip()[:1] == b":":
        return ImageFormat.IHEX
    return None


def parse_image(data: bytes, fmt: ImageFormat, load_address: int = 0) -> ParsedImage:
    """Parse an image; InvalidArgument says why a bad one is refused."""
    if not data:
        raise InvalidArgument("chunk", "the program is empty")
    if fmt is ImageFormat.ELF:
        return _parse_elf(data)
    if fmt is ImageFormat.IHEX:
        return _parse_ihex(data)
    if load_address < 0 or load_address + len(data) > 1 << 32:
        raise InvalidArgument("metadata.load_address", "the image does not fit in 32 bits")
    return ParsedImage(ProgramImage(segments=(Segment(load_address, data),), entry=None))


def _parse_elf(data: bytes) -> ParsedImage:
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf["e_machine"]
        if elf.elfclass != 32:
            raise InvalidArgument("chunk", f"ELF class {elf.elfclass}: only 32-bit targets are supported")
        if machine == EM_ARM:
            arch = Arch.ARM_CORTEX_M
        elif machine == EM_RISCV:
            arch = Arch.RISCV32
        else:
            raise InvalidArgument("chunk", f"ELF machine {machine} is not ARM or RISC-V")
        segments: list[Segment] = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            filesz, memsz, addr = seg["p_filesz"], seg["p_memsz"], seg["p_paddr"]
            if seg["p_offset"] + filesz > len(data):
                raise InvalidArgument("chunk", "the ELF is truncated: a segment runs past the end")
            if memsz > MAX_SEGMENT_BYTES:
                raise InvalidArgument("chunk", f"a segment claims {memsz} bytes of memory: more than the limit "
                                               f"of {MAX_SEGMENT_BYTES} bytes per segment")
            if filesz > memsz:
                raise InvalidArgument("chunk", f"a segment has more bytes in the file ({filesz}) than in memory "
                                               f"({memsz})")
            if addr + filesz > ADDRESS_SPACE or seg["p_vaddr"] + memsz > ADDRESS_SPACE:
                raise InvalidArgument("chunk", f"segment 0x{addr:x} ({memsz} bytes) does not fit in 32 bits")
            body = seg.data()[:filesz]
            if body:
                segments.append(Segment(addr, body))
            if memsz > filesz:
                segments.append(Segment(seg["p_vaddr"] + filesz, bytes(memsz - filesz)))
        if not segments:
            raise InvalidArgument("chunk", "the ELF has no loadable segments")
        _refuse_overlaps(segments)
        symtab = elf.get_section_by_name(".symtab")
        return ParsedImage(
            ProgramImage(segments=tuple(segments), entry=elf["e_entry"], arch=arch),
            has_symbols=isinstance(symtab, SymbolTableSection) and symtab.num_symbols() > 0,
            has_debug_info=elf.get_section_by_name(".debug_line") is not None,
        )
    except ELFError as exc:
        raise InvalidArgument("chunk", f"not a valid ELF file: {exc}") from None
    except (ValueError, KeyError, IndexError) as exc:
        raise InvalidArgument("chunk", f"malformed ELF file: {exc}") from None


def _refuse_overlaps(segments: list[Segment]) -> None:
    """Two loadable segments that claim the same bytes: which one wins is anyone's guess."""
    ordered = sorted(segments, key=lambda s: s.address)
    for before, after in itertools.pairwise(ordered):
        if after.address < before.address + len(before.data):
            raise InvalidArgument(
                "chunk", f"the ELF's segments overlap: 0x{before.address:08x}-0x{before.address + len(before.data):08x} "
                         f"and 0x{after.address:08x}-0x{after.address + len(after.data):08x}")


def _parse_ihex(data: bytes) -> ParsedImage:
    ih = IntelHex()
    try:
        ih.loadhex(io.StringIO(data.decode("ascii")))
    except (HexReaderError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument("chunk", f"not a valid Intel HEX file: {exc}") from None
    segments = tuple(
        Segment(start, ih.tobinstr(start=start, size=end - start)) for start, end in ih.segments()
    )
    if not segments:
        raise InvalidArgument("chunk", "the Intel HEX file has no data records")
    start = ih.start_addr or {}
    entry = start.get("EIP")
    if entry is None and "CS" in start:
        entry = start["CS"] * 16 + start["IP"]
    return ParsedImage(ProgramImage(segments=segments, entry=entry))


def check_fits(image: ProgramImage, board: BoardSpec, field: str = "program") -> None:
    """Refuse an image for the wrong architecture or with bytes outside the board's memory."""
    if image.arch is not None and image.arch != board.arch:
        raise InvalidArgument(
            field, f"the program is built for {image.arch}, board {board.name} is {board.arch}"
        )
    for seg in image.segments:
        if board.region_at(seg.address, len(seg.data)) is None:
            raise InvalidArgument(
                field,
                f"segment 0x{seg.address:08x}-0x{seg.address + len(seg.data):08x} lies outside "
                f"the memory of board {board.name}",
            )

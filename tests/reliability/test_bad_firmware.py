"""R6: bad firmware is refused with INVALID_ARGUMENT saying why, at UploadProgram (what the
bytes are) and at LoadProgram / CreateSession (whether they fit the board): truncated,
wrong architecture, overlapping segments, oversized, Intel HEX with bad checksums, zero
bytes. Nothing is stored for a refused upload."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from google.rpc import error_details_pb2

from machineserver.sdk import AsyncClient, errors
from tests.helpers.firmware import firmware

PT_LOAD = 1
EM_386 = 3


def hello() -> bytes:
    return firmware("lm3s6965evb", "hello").read_bytes()


def program_headers(elf: bytes) -> list[int]:
    """Offsets of an ELF32's program header entries."""
    phoff, = struct.unpack_from("<I", elf, 0x1C)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x2A)
    return [phoff + i * phentsize for i in range(phnum)]


def patched(elf: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(elf)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def load_headers(elf: bytes) -> list[int]:
    return [o for o in program_headers(elf) if struct.unpack_from("<I", elf, o)[0] == PT_LOAD]


def overlapping(elf: bytes) -> bytes:
    """The second PT_LOAD made to carry 0x100 bytes of the file placed inside the first's
    addresses."""
    first, second = load_headers(elf)[:2]
    _, offset, _, paddr, filesz, _ = struct.unpack_from("<6I", elf, first)
    assert filesz > 0x180, "the first segment is too small to overlap"
    return patched(elf, second + 4, "<5I", offset, 0x20000000, paddr + 0x80, 0x100, 0x100)


def huge_bss(elf: bytes) -> bytes:
    """The .bss segment claiming 0xfff00000 bytes of memory (4 GiB of zeros if believed)."""
    second = load_headers(elf)[1]
    return patched(elf, second + 20, "<I", 0xFFF00000)


def bad_hex_checksum(text: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    record = lines[1].rstrip()
    checksum = int(record[-2:], 16)
    lines[1] = record[:-2] + f"{(checksum + 1) & 0xFF:02X}".encode() + b"\n"
    return b"".join(lines)


# (id, the bytes, words the reason must hold)
def bad_uploads() -> list[tuple[str, bytes, tuple[str, ...]]]:
    elf = hello()
    hex_text = firmware("lm3s6965evb", "hello", "hex").read_bytes()
    return [
        ("zero-bytes", b"", ("no bytes",)),
        ("elf-header-only", elf[:52], ("ELF",)),
        ("truncated-half", elf[: len(elf) // 2], ("ELF",)),
        ("truncated-in-segment", elf[: 0x1000 + 0x80], ("truncated",)),
        ("wrong-arch-x86-64", Path("/bin/true").read_bytes(), ("ELF class 64", "32-bit")),
        ("wrong-arch-i386", patched(elf, 0x12, "<H", EM_386), ("EM_386", "not ARM or RISC-V")),
        ("overlapping-segments", overlapping(elf), ("overlap",)),
        ("oversized-bss", huge_bss(elf), ("limit",)),
        ("phnum-past-end", patched(elf, 0x2C, "<H", 0xFFFF), ("ELF",)),
        ("hex-bad-checksum", bad_hex_checksum(hex_text), ("Intel HEX", "checksum")),
        ("hex-not-hex", b":zz\n", ("Intel HEX",)),
        ("not-firmware", b"hello world\n" * 10, ("not an ELF or Intel HEX",)),
    ]


CASES = bad_uploads()


@pytest.mark.parametrize(("data", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_a_bad_upload_is_refused_saying_why(client: AsyncClient, data: bytes, words: tuple[str, ...]) -> None:
    before = len((await client.sessions.list_programs()).programs)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.upload_program(data)
    message = exc.value.message
    assert all(w in message for w in words), f"{message!r} does not say {words}"
    bad = exc.value.detail(error_details_pb2.BadRequest)
    assert bad is not None and bad.field_violations[0].field in ("chunk", "metadata.format"), bad
    assert len((await client.sessions.list_programs()).programs) == before, "a refused upload was stored"


async def test_firmware_that_does_not_fit_the_board_is_refused_at_load(client: AsyncClient) -> None:
    """Uploads that parse but cannot run on the session's board: another architecture (a
    RISC-V ELF on an ARM board) and an image larger than the board's flash."""
    riscv = (await client.upload_program(firmware("sifive_e", "hello"))).program.name
    oversized = (await client.upload_program(b"\x00" * (300 << 10), format="bin")).program.name
    session = (await client.sessions.create_session(board_template="lm3s6965evb", power_on=True)).session.name
    for program, words in ((riscv, ("riscv32", "lm3s6965evb")), (oversized, ("outside the memory",))):
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.sessions.load_program(name=session, program=program)
        assert all(w in exc.value.message for w in words), exc.value.message
        with pytest.raises(errors.InvalidArgument) as created:
            await client.sessions.create_session(board_template="lm3s6965evb", program=program)
        assert all(w in created.value.message for w in words), created.value.message
    # the session keeps running what it had: a good program still loads
    good = (await client.upload_program(firmware("lm3s6965evb", "hello"))).program.name
    await client.sessions.load_program(name=session, program=good)

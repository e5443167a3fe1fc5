"""Programs: chunked upload of ELF / BIN / Intel HEX, checksums, dedup, limits, and the
bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.config import ServerConfig
from machineserver.server.core.engine import Limits
from machineserver.v1 import session_pb2 as pb
from tests.helpers.firmware import firmware
from tests.helpers.server import serving


def _requests(data: bytes, chunk: int = 1000, **meta: object):  # type: ignore[no-untyped-def]
    yield pb.UploadProgramRequest(metadata=pb.ProgramMetadata(**meta))  # type: ignore[arg-type]
    for i in range(0, len(data), chunk):
        yield pb.UploadProgramRequest(chunk=data[i:i + chunk])


async def test_upload_elf_records_segments_entry_and_symbols(client: AsyncClient) -> None:
    path = firmware("lm3s6965evb", "hello")
    data = path.read_bytes()
    resp = await client.sessions.upload_program(_requests(data, sha256=hashlib.sha256(data).hexdigest(), display_name="hello.elf"))
    prog = resp.program
    assert not resp.deduplicated
    assert prog.format == pb.PROGRAM_FORMAT_ELF and prog.arch == "arm-cortex-m"
    assert prog.sha256 == hashlib.sha256(data).hexdigest() and prog.size_bytes == len(data)
    assert prog.has_symbols and prog.has_debug_info and prog.HasField("entry_point")
    assert prog.segments and prog.segments[0].address == 0
    again = await client.upload_program(path)
    assert again.deduplicated and again.program.name == prog.name
    listed = await client.sessions.list_programs()
    assert [p.name for p in listed.programs] == [prog.name]
    assert (await client.sessions.get_program(name=prog.name)).program.sha256 == prog.sha256


async def test_upload_hex_and_bin(client: AsyncClient) -> None:
    hexfile = firmware("lm3s6965evb", "hello", "hex")
    binfile = firmware("lm3s6965evb", "hello", "bin")
    h = (await client.upload_program(hexfile)).program
    assert h.format == pb.PROGRAM_FORMAT_IHEX and h.segments[0].address == 0
    b = (await client.upload_program(binfile, format="bin", load_address=0)).program
    assert b.format == pb.PROGRAM_FORMAT_BIN and b.segments[0].size == binfile.stat().st_size
    # same bytes at another address is another program
    b2 = (await client.upload_program(binfile, format="bin", load_address=0x1000)).program
    assert b2.name != b.name and b2.sha256 == b.sha256


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        (lambda: iter([pb.UploadProgramRequest(chunk=b"\x7fELF")]), "metadata"),
        (lambda: iter([]), "metadata"),
        (lambda: _requests(b"\x00" * 64), "metadata.format"),  # not ELF/HEX and no format
        (lambda: _requests(b"\x7fELF" + b"\x00" * 40), "chunk"),  # truncated ELF
        (lambda: _requests(b":zz\n", format=pb.PROGRAM_FORMAT_IHEX), "chunk"),
        (lambda: _requests(b"abc", sha256="0" * 64), "metadata.sha256"),
        (lambda: _requests(b"abc", sha256="xyz"), "metadata.sha256"),
        (lambda: _requests(b"", format=pb.PROGRAM_FORMAT_BIN), "chunk"),
        (lambda: _requests(b"abc", format=9), "metadata.format"),
    ],
)
async def test_bad_uploads_are_refused_with_the_field(client: AsyncClient, requests, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.upload_program(requests())
    assert exc.value.field_violations[0][0] == field, exc.value
    assert not (await client.sessions.list_programs()).programs


async def test_riscv_elf_is_refused_for_an_arm_board(client: AsyncClient) -> None:
    prog = (await client.upload_program(firmware("sifive_e", "hello"))).program
    assert prog.arch == "riscv32"
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="lm3s6965evb", program=prog.name)
    assert "riscv32" in exc.value.message


async def test_segment_outside_memory_is_refused(client: AsyncClient) -> None:
    prog = (await client.upload_program(b"\x01" * 64, format="bin", load_address=0x90000000)).program
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.create_session(board_template="lm3s6965evb", program=prog.name)
    assert "0x90000000" in exc.value.message


async def test_program_size_limit(tmp_path: Path) -> None:
    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path, limits=Limits(max_program_bytes=4096))
    async with serving(config) as (_, c):
        with pytest.raises(errors.ResourceExhausted):
            await c.upload_program(b"\x00" * 5000, format="bin")
        assert not (await c.sessions.list_programs()).programs
        assert not list((tmp_path / "blobs").glob(".incoming-*"))


async def test_delete_program_in_use_needs_force(client: AsyncClient) -> None:
    prog = (await client.upload_program(firmware("lm3s6965evb", "hello"))).program
    await client.sessions.create_session(board_template="lm3s6965evb", program=prog.name)
    with pytest.raises(errors.FailedPrecondition):
        await client.sessions.delete_program(name=prog.name)
    await client.sessions.delete_program(name=prog.name, force=True)
    with pytest.raises(errors.NotFound):
        await client.sessions.get_program(name=prog.name)

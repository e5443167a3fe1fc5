"""Snapshots through the API, with the emulation in worker processes (the default) and in
the server's own process: restore gives the same next console bytes, registers and
memory; export and import as streams; identical states share one blob; the bad inputs."""

from __future__ import annotations

import dataclasses

import pytest

from machineserver.sdk import AsyncClient, errors
from machineserver.server.config import ServerConfig
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import session_pb2 as pb
from tests.helpers.api import upload, wait_state


@pytest.fixture(params=[-1, 0], ids=["workers", "in-process"])
def server_config(request: pytest.FixtureRequest, server_config: ServerConfig) -> ServerConfig:
    return dataclasses.replace(server_config, workers=request.param)


async def run_to_exit_console(client: AsyncClient, name: str, offset: int) -> bytes:
    await client.debug.continue_(name=name, wait=True)
    await wait_state(client, name, cpb.SESSION_STATE_EXITED)
    return b"".join([m.data async for m in client.sessions.stream_console(name=name, offset=offset, follow=False)])


async def test_restore_replays_exactly(client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "systick")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    await client.debug.set_breakpoint(name=s.name, location={"symbol": "SysTick_Handler"})
    for _ in range(3):
        await client.debug.continue_(name=s.name, wait=True)
    regs_at_snap = (await client.debug.read_registers(name=s.name)).registers
    snap = (await client.sessions.create_snapshot(name=s.name, display_name="3 ticks")).snapshot
    assert snap.name.startswith("snapshots/") and snap.size_bytes > 0 and snap.board == "mps2-an385"
    offset = (await client.telemetry.get_session_metrics(name=s.name)).metrics.console_bytes
    bps = (await client.debug.list_breakpoints(name=s.name)).breakpoints
    await client.debug.clear_breakpoint(name=s.name, id=bps[0].id)
    first = await run_to_exit_console(client, s.name, offset)
    assert first == b"ticks=10\n"

    restored = (await client.sessions.restore_snapshot(name=s.name, snapshot=snap.name)).session
    assert restored.state == cpb.SESSION_STATE_HALTED
    assert (await client.debug.read_registers(name=s.name)).registers == regs_at_snap
    end = (await client.telemetry.get_session_metrics(name=s.name)).metrics.console_bytes
    assert await run_to_exit_console(client, s.name, end) == first

    listed = await client.sessions.list_snapshots(filter=f"session={s.name}")
    assert [x.name for x in listed.snapshots] == [snap.name]


async def test_export_import_into_another_session(client: AsyncClient) -> None:
    prog = await upload(client, "lm3s6965evb", "crc32")
    a = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog, power_on=True)).session
    await client.debug.step(name=a.name, count=5000)
    snap = (await client.sessions.create_snapshot(name=a.name)).snapshot
    parts = [m async for m in client.sessions.export_snapshot(name=snap.name)]
    assert parts[0].snapshot.name == snap.name
    blob = b"".join(p.chunk for p in parts[1:])
    assert len(blob) == snap.size_bytes

    def requests():  # type: ignore[no-untyped-def]
        yield pb.ImportSnapshotRequest(metadata=pb.SnapshotMetadata(
            display_name="imported", board=snap.board, backend=snap.backend, sha256=snap.sha256))
        for i in range(0, len(blob), 50_000):
            yield pb.ImportSnapshotRequest(chunk=blob[i:i + 50_000])

    imported = (await client.sessions.import_snapshot(requests())).snapshot
    assert imported.sha256 == snap.sha256 and imported.name != snap.name
    b = (await client.sessions.create_session(board_template="lm3s6965evb", program=prog)).session
    await client.sessions.restore_snapshot(name=b.name, snapshot=imported.name)
    ra = (await client.debug.read_registers(name=a.name)).registers
    rb = (await client.debug.read_registers(name=b.name)).registers
    assert ra == rb
    await client.sessions.delete_snapshot(name=snap.name)
    with pytest.raises(errors.NotFound):
        await client.sessions.get_snapshot(name=snap.name)
    # the imported copy shares the blob and still restores
    await client.sessions.restore_snapshot(name=b.name, snapshot=imported.name)


async def test_snapshot_bad_inputs(client: AsyncClient) -> None:
    s = (await client.sessions.create_session(board_template="lm3s6965evb")).session
    with pytest.raises(errors.FailedPrecondition):
        await client.sessions.create_snapshot(name=s.name)  # powered off
    other = (await client.sessions.create_session(board_template="mps2-an385", power_on=True)).session
    snap = (await client.sessions.create_snapshot(name=other.name)).snapshot
    with pytest.raises(errors.FailedPrecondition) as exc:
        await client.sessions.restore_snapshot(name=s.name, snapshot=snap.name)
    assert "mps2-an385" in exc.value.message
    with pytest.raises(errors.NotFound):
        await client.sessions.restore_snapshot(name=s.name, snapshot="snapshots/nope")

    def garbage():  # type: ignore[no-untyped-def]
        yield pb.ImportSnapshotRequest(metadata=pb.SnapshotMetadata(board="lm3s6965evb", backend="unicorn"))
        yield pb.ImportSnapshotRequest(chunk=b"not a snapshot")

    with pytest.raises(errors.InvalidArgument):  # checked at import (tests/holes/test_snapshot_import.py)
        await client.sessions.import_snapshot(garbage())

    def wrong_sum():  # type: ignore[no-untyped-def]
        yield pb.ImportSnapshotRequest(metadata=pb.SnapshotMetadata(board="lm3s6965evb", backend="unicorn", sha256="0" * 64))
        yield pb.ImportSnapshotRequest(chunk=b"abc")

    with pytest.raises(errors.InvalidArgument):
        await client.sessions.import_snapshot(wrong_sum())

    def no_backend():  # type: ignore[no-untyped-def]
        yield pb.ImportSnapshotRequest(metadata=pb.SnapshotMetadata(board="lm3s6965evb"))

    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.import_snapshot(no_backend())
    assert exc.value.field_violations[0][0] == "metadata.backend"


async def test_restore_undoes_guest_and_debugger_writes(client: AsyncClient) -> None:
    """Memory written after a snapshot, by the guest and through the debugger (RAM and
    the code region, a page that was all zero), reads back as it was once restored, and
    the session runs to the same end."""
    prog = await upload(client, "mps2-an385", "crc32")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=20_000)
    spots = [(0x100, 64), (0x20000000, 4096), (0x20200000, 16), (0x203FFFF0, 16)]
    before = [(await client.debug.read_memory(name=s.name, address=a, size=n)).data for a, n in spots]
    regs = (await client.debug.read_registers(name=s.name)).registers
    snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
    await client.debug.step(name=s.name, count=20_000)
    for address, size in spots[1:]:
        await client.debug.write_memory(name=s.name, address=address, data=b"\xa5" * size)
    await client.sessions.restore_snapshot(name=s.name, snapshot=snap.name)
    assert [(await client.debug.read_memory(name=s.name, address=a, size=n)).data for a, n in spots] == before
    assert (await client.debug.read_registers(name=s.name)).registers == regs
    assert await run_to_exit_console(client, s.name, 0) == b"crc32=0x80f45f04\n"


async def test_identical_states_share_one_blob(client: AsyncClient) -> None:
    prog = await upload(client, "mps2-an385", "hello")
    s = (await client.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
    await client.debug.step(name=s.name, count=50)
    a = (await client.sessions.create_snapshot(name=s.name, display_name="a")).snapshot
    b = (await client.sessions.create_snapshot(name=s.name, display_name="b")).snapshot
    assert a.name != b.name and a.sha256 == b.sha256 and a.size_bytes == b.size_bytes
    await client.debug.step(name=s.name, count=1)
    c = (await client.sessions.create_snapshot(name=s.name)).snapshot
    assert c.sha256 != a.sha256
    await client.sessions.delete_snapshot(name=a.name)  # b still holds the blob
    await client.sessions.restore_snapshot(name=s.name, snapshot=b.name)
    blob = b"".join([m.chunk async for m in client.sessions.export_snapshot(name=b.name)])
    assert len(blob) == b.size_bytes
    assert await run_to_exit_console(client, s.name, 0) == b"Hello from mps2-an385!\n"

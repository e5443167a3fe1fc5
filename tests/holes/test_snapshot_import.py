"""ImportSnapshot refuses what a restore could not take (issue 14, "ImportSnapshot accepts
any bytes"), through a real server: random bytes, truncated blobs, crafted headers with
huge sizes or wrong types, another board, another version, compressed bombs (the server's
RSS watched while it reads one) are INVALID_ARGUMENT naming why, and nothing is stored;
the same for a co-simulation snapshot with a bad member state; a good export/import
round trip still restores and runs to the same end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import yaml

from machineserver.sdk import AsyncClient, errors
from machineserver.server.core.cosim import artifact
from machineserver.server.drivers.gdbremote import snapshots as remote_snap
from machineserver.server.drivers.qemu import snapshots as qemu_snap
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import cosim_pb2 as cosim_pb
from machineserver.v1 import session_pb2 as pb
from tests.cosim.test_cosim import pingpong
from tests.helpers.backends import require_backend
from tests.helpers.firmware import firmware

BOARD = "mps2-an385"
PREFIX = struct.Struct("<8sHI")


def chunks(blob: bytes, board: str = BOARD, backend: str = "unicorn") -> Iterator[pb.ImportSnapshotRequest]:
    yield pb.ImportSnapshotRequest(metadata=pb.SnapshotMetadata(board=board, backend=backend, display_name="x"))
    for off in range(0, len(blob), 64 * 1024):
        yield pb.ImportSnapshotRequest(chunk=blob[off:off + 64 * 1024])


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, hlen = PREFIX.unpack_from(blob, 0)
    return json.loads(blob[PREFIX.size:PREFIX.size + hlen]), blob[PREFIX.size + hlen:]


def join(header: dict[str, Any], rest: bytes, version: int = fmt.VERSION) -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(fmt.MAGIC, version, len(head)) + head + rest


async def good_blob(client: AsyncClient) -> tuple[str, bytes]:
    """A session of hello, powered on (halted at reset), and its exported snapshot."""
    prog = (await client.upload_program(firmware(BOARD, "hello"))).program.name
    s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
    snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
    data = b"".join([m.chunk async for m in client.sessions.export_snapshot(name=snap.name) if m.chunk])
    return str(s.name), data


async def refused(client: AsyncClient, blob: bytes, why: str, board: str = BOARD, backend: str = "unicorn") -> str:
    before = len((await client.sessions.list_snapshots()).snapshots)
    with pytest.raises(errors.InvalidArgument) as exc:
        await client.sessions.import_snapshot(chunks(blob, board, backend))
    assert exc.value.code.name == "INVALID_ARGUMENT"
    assert why.lower() in exc.value.message.lower(), exc.value.message
    assert len((await client.sessions.list_snapshots()).snapshots) == before  # nothing stored
    return str(exc.value.message)


async def test_random_truncated_and_garbage_blobs(client: AsyncClient) -> None:
    _, blob = await good_blob(client)
    await refused(client, os.urandom(512 * 1024), "not a Unicorn machine snapshot")
    await refused(client, blob[: len(blob) // 2], "corrupt snapshot")
    await refused(client, blob[:10], "corrupt snapshot")
    await refused(client, blob + b"\0" * 100, "after the last segment")
    header, rest = split(blob)
    await refused(client, join(header, rest[:-1]), "corrupt snapshot")


async def test_crafted_headers(client: AsyncClient) -> None:
    _, blob = await good_blob(client)
    header, rest = split(blob)
    big = 1 << 40
    stored = sum(seg[2] for seg in header["image"]["segments"])  # the image's bytes, claimed by one segment
    cases: list[tuple[dict[str, Any], str]] = [
        ({**header, "pages": [big, big]}, "pages in region"),
        ({**header, "regions": [["ssram1", 0, big], ["ssram23", 0x20000000, big]]}, "memory map"),
        ({**header, "page_size": "4096"}, "page size"),
        ({**header, "regs": {**header["regs"], "pc": "0x100"}}, "register pc"),
        ({**header, "regs": {k: v for k, v in header["regs"].items() if k != "sp" and k != "msp"}}, "missing"),
        ({**header, "instructions": 1.5}, "instructions"),
        ({**header, "exact": "yes"}, "exact"),
        ({**header, "core": {"scs": "nonsense"}}, "core.scs"),
        ({**header, "core": {**header["core"], "scs": {**header["core"]["scs"], "prio": "zz"}}}, "prio"),
        ({**header, "uarts": {"uart0": {"regs": {"feed": 1}}}}, "uart0"),
        ({**header, "uarts": {"systick": {"regs": {}}}}, "not a UART"),
        ({**header, "uarts": {"uart0": {"regs": {}, "rx": "f" * 99}}}, "rx"),
        ({**header, "image": {**header["image"], "segments": [[0, big, stored]]}}, "outside the board's memory"),
        ({k: v for k, v in header.items() if k != "regs"}, "corrupt snapshot"),
        ([1, 2, 3], "corrupt snapshot"),  # type: ignore[list-item]
    ]
    for crafted, why in cases:
        await refused(client, join(crafted, rest), why)
    # a header length past the blob, and one over the format's bound
    await refused(client, PREFIX.pack(fmt.MAGIC, 2, 1 << 31) + b"{}", "header")
    # deep JSON: no RecursionError escapes
    await refused(client, join({}, b"").replace(b"{}", b"[" * 100_000 + b"]" * 100_000), "corrupt snapshot")


async def test_other_board_and_version(client: AsyncClient) -> None:
    _, blob = await good_blob(client)
    msg = await refused(client, blob, "is of board mps2-an385", board="lm3s6965evb")
    assert "lm3s6965evb" in msg
    header, rest = split(blob)
    await refused(client, join(header, rest, version=9), "version 9")
    with pytest.raises(errors.NotFound):
        await client.sessions.import_snapshot(chunks(blob, board="no-such-board"))
    with pytest.raises(errors.InvalidArgument):
        await client.sessions.import_snapshot(chunks(blob, backend="no-such-backend"))


async def test_compressed_bombs(client: AsyncClient) -> None:
    _, blob = await good_blob(client)
    header, _ = split(blob)
    # a stored page (codec zlib) that inflates to 64 MiB: one page is 4 KiB
    bomb_page = bytes((fmt.ZLIB,)) + zlib.compress(b"\0" * (64 << 20), 9)[: fmt.PAGE + 1]
    table = struct.pack("<II", 0, len(bomb_page))
    bomb = {**header, "pages": [1, 0], "image": None}
    await refused(client, join(bomb, table + bomb_page), "corrupt snapshot")


def _peak_rss_while(stop: threading.Event, peak: list[int]) -> None:
    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        stop.wait(0.002)


async def test_version1_bomb_does_not_balloon_rss(client: AsyncClient) -> None:
    """A 0.5 MB-ish version-1 blob (one zlib stream) that inflates to far more than its
    board holds, for a board with 196 MiB of RAM: refused, and the server's RSS (this
    process: the server runs in it) stays far below what inflating it would take."""
    big = {
        "name": "big-ram-probe", "description": "probe", "arch": "arm-cortex-m", "cpu": "cortex-m3", "cpu_mhz": 25,
        "vector_table": 0,
        "memory": [{"name": "ram", "base": 0, "size": 196 << 20, "kind": "ram"}],
        "peripherals": [{"name": "nvic", "model": "nvic", "base": 0xE000E100, "size": 0xC00,
                         "properties": {"num_irq": 32, "prio_bits": 3}}],
        "backends": {"unicorn": "big-ram-probe"},
    }
    await client.capabilities.create_board_template(config=yaml.safe_dump(big))
    header = {"version": 1, "board": "big-ram-probe", "arch": "arm-cortex-m", "regions": [["ram", 0, 196 << 20]],
              "image": None, "regs": {}, "core": {}, "uarts": {}, "instructions": 0, "cycles": 0, "exact": True}
    head = json.dumps(header).encode()
    squeezer = zlib.compressobj(9)
    parts = [squeezer.compress(struct.pack("<I", len(head)) + head)]
    zeros = b"\0" * (16 << 20)
    for _ in range(40):  # 640 MiB where the board holds 196
        parts.append(squeezer.compress(zeros))
    parts.append(squeezer.flush())
    blob = fmt.MAGIC + struct.pack("<H", 1) + b"".join(parts)
    assert len(blob) < 1 << 20
    baseline = psutil.Process().memory_info().rss
    stop, peak = threading.Event(), [baseline]
    watcher = threading.Thread(target=_peak_rss_while, args=(stop, peak), daemon=True)
    watcher.start()
    try:
        await refused(client, blob, "more data than the header declares", board="big-ram-probe")
    finally:
        stop.set()
        watcher.join()
    grown = peak[0] - baseline
    assert grown < 150 << 20, f"RSS grew by {grown >> 20} MiB reading a {len(blob)} byte blob"


async def test_round_trip_still_restores(client: AsyncClient) -> None:
    _, blob = await good_blob(client)
    imported = (await client.sessions.import_snapshot(chunks(blob))).snapshot
    assert imported.size_bytes == len(blob) and imported.board == BOARD
    other = (await client.sessions.create_session(board_template=BOARD)).session
    await client.sessions.restore_snapshot(name=other.name, snapshot=imported.name)
    stop = (await client.debug.continue_(name=other.name, wait=True, timeout=60)).stop
    assert stop.reason == cpb.STOP_REASON_EXIT and stop.exit_code == 0
    console = b"".join([c async for c in client.console(other.name, follow=False)])
    assert b"Hello from mps2-an385!" in console


async def test_qemu_header(client: AsyncClient) -> None:
    """The QEMU backend's format: checked at import too."""
    require_backend("qemu", BOARD)
    good = {"machine": BOARD, "board": BOARD, "icount_shift": None, "pc": 0, "instructions": 0,
            "virtual_ns": 0, "vclock": 0, "traps": []}
    stream = qemu_snap.MIGRATION_MAGIC + b"\0" * 64
    await refused(client, qemu_snap.encode({**good, "machine": "virt"}, stream), "not mps2-an385", backend="qemu")
    await refused(client, qemu_snap.encode({**good, "instructions": "1"}, stream), "instructions", backend="qemu")
    await refused(client, qemu_snap.encode({**good, "traps": list(range(70000))}, stream), "traps",
                  backend="qemu")
    await refused(client, qemu_snap.encode(good, b"garbage" * 10), "migration stream", backend="qemu")
    await refused(client, qemu_snap.MAGIC + (1 << 30).to_bytes(4, "little") + b"{}", "header", backend="qemu")
    # a real QEMU snapshot still goes in (its migration stream starts as checked)
    prog = (await client.upload_program(firmware(BOARD, "hello"))).program.name
    s = (await client.sessions.create_session(board_template=BOARD, program=prog, backend="qemu",
                                              power_on=True)).session
    snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
    data = b"".join([m.chunk async for m in client.sessions.export_snapshot(name=snap.name) if m.chunk])
    imported = (await client.sessions.import_snapshot(chunks(data, backend="qemu"))).snapshot
    await client.sessions.restore_snapshot(name=s.name, snapshot=imported.name)


async def test_gdbremote_header(client: AsyncClient) -> None:
    head = json.dumps({"board": BOARD, "registers": {"pc": 1},
                       "regions": [{"name": "ssram1", "base": 0, "size": 1 << 40}]}).encode()
    blob = remote_snap.MAGIC + struct.pack(">I", len(head)) + head
    await refused(client, blob, "writable RAM", backend="gdbremote")
    await refused(client, remote_snap.MAGIC + struct.pack(">I", 5) + b"[1,2]", "header", backend="gdbremote")


async def test_cosim_import_checks_member_states(client: AsyncClient) -> None:
    """A co-simulation artifact whose manifest and sha256s are right but whose member
    state is not a snapshot of its board: INVALID_ARGUMENT naming the member."""
    cosim = await pingpong(client)
    await client.cosim.step_co_simulation(name=cosim.name, count=5)
    snap = (await client.cosim.create_co_sim_snapshot(parent=cosim.name)).snapshot
    data = b"".join([m.chunk async for m in client.cosim.export_co_sim_snapshot(name=snap.name)])
    art = artifact.decode(data)

    def requests(blob: bytes) -> Iterator[cosim_pb.ImportCoSimSnapshotRequest]:
        yield cosim_pb.ImportCoSimSnapshotRequest(metadata=cosim_pb.CoSimSnapshotHeader(parent=cosim.name))
        yield cosim_pb.ImportCoSimSnapshotRequest(chunk=blob)

    header, rest = split(art.blobs[0])
    bad_members = {
        "truncated": art.blobs[0][:-10],
        "bad register": join({**header, "regs": {**header["regs"], "pc": -1}}, rest),
        "bad link state": None,
    }
    for why, member0 in bad_members.items():
        link_state = {"shared": {"0": "zz"}} if member0 is None else art.link_state
        crafted = artifact.encode(dataclasses.replace(
            art, blobs=(member0 or art.blobs[0], art.blobs[1]), link_state=link_state))
        with pytest.raises(errors.InvalidArgument) as exc:
            await client.cosim.import_co_sim_snapshot(requests(crafted))
        expected = "unreadable manifest" if member0 is None else "member 0"
        assert expected in exc.value.message, (why, exc.value.message)
    listed = (await client.cosim.list_co_sim_snapshots(parent=cosim.name)).snapshots
    assert [s.name for s in listed] == [snap.name]
    good = (await client.cosim.import_co_sim_snapshot(requests(data))).snapshot
    await client.cosim.restore_co_sim_snapshot(name=good.name)

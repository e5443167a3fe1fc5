"""Unicorn snapshots: exact and deterministic on every board, incremental (a save packs
only the pages written since, a restore writes only the pages that differ) without ever
missing a write, self-contained blobs, bounded and validated decoding (a crafted blob is
BadRequest and leaves the machine as it was), and the version 1 format still read."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
import tracemalloc
import zlib

import pytest

from machineserver.server.drivers.base import (
    Arch,
    BadRequest,
    Machine,
    MachineOptions,
    MachineState,
    ProgramImage,
    Segment,
)
from machineserver.server.drivers.unicorn import UnicornBackend
from machineserver.server.drivers.unicorn import snapshot_format as fmt
from machineserver.server.drivers.unicorn.snapshot_pages import PageTracker, pack_changes
from tests.drivers.unicorn_helpers import start
from tests.helpers.events import Recorder
from tests.helpers.firmware import BOARDS
from tests.helpers.machines import Parts, board

PAGE = fmt.PAGE


async def memory_of(p: Parts, board_name: str) -> list[str]:
    """A digest of every memory region, read through the debugger's path (uc.mem_read),
    not through the mapping the snapshot code compares."""
    return [hashlib.sha256(await p.mem.read_memory(r.base, r.size)).hexdigest()
            for r in board(board_name).memory]


async def run_some(m: Machine, p: Parts, count: int) -> None:
    """Step the guest unless it stopped for good (random writes may have broken it)."""
    if m.state == MachineState.HALTED:
        await p.run.step(count)


async def fresh(board_name: str) -> tuple[Machine, Parts, Recorder]:
    rec = Recorder()
    m = UnicornBackend().create_machine(board(board_name), MachineOptions(), rec)
    await m.power_on()
    return m, Parts(m), rec


# --------------------------------------------------------------------------- whole machines


@pytest.mark.parametrize("board_name", BOARDS)
@pytest.mark.parametrize("program", ["crc32", "timer-or-systick"])
async def test_snapshot_restore_is_deterministic(board_name, program):
    if program != "crc32":
        program = "timer" if board_name == "sifive_e" else "systick"
    m, p, rec = await start(board_name, program)
    await p.run.step(200 if program != "crc32" else 300000)
    blob = await p.snap.save_state()
    assert isinstance(blob, bytes) and blob.startswith(b"MSUCSNAP")
    mark = len(rec.console)
    await p.run.run()
    await rec.wait_stop()
    first = (bytes(rec.console[mark:]), await p.regs.read_registers(), m.counters())
    await p.snap.restore_state(blob)
    assert m.state == MachineState.HALTED
    mark = len(rec.console)
    await p.run.run()
    await rec.wait_stop(2)
    second = (bytes(rec.console[mark:]), await p.regs.read_registers(), m.counters())
    assert first[0] and first[0] == second[0]
    assert first[1] == second[1]
    # into a freshly powered-on machine of the same board
    m3, p3, rec3 = await fresh(board_name)
    await p3.snap.restore_state(blob)
    await p3.run.run()
    await rec3.wait_stop()
    assert bytes(rec3.console) == first[0]
    assert await p3.regs.read_registers() == first[1]
    await m3.reset()  # the image came with the snapshot
    await p3.run.run()
    await rec3.wait_stop(2)
    await m.power_off()
    await m3.power_off()


@pytest.mark.parametrize("board_name", BOARDS)
async def test_incremental_snapshots_restore_exactly_in_any_order(board_name):
    """Snapshots taken between guest execution and debugger writes (anywhere: every
    region, its first and last bytes, zeros over data, data over zeros) restore to
    exactly their memory and registers, in any order, on the machine that took them and
    on a fresh one: no write is missed, no page is stale."""
    rng = random.Random(f"snap-{board_name}")
    regions = board(board_name).memory
    m, p, _ = await start(board_name, "crc32")
    taken: list[tuple[bytes, list[str], dict[str, int]]] = []
    for i in range(6):
        await run_some(m, p, rng.randrange(1, 50_000))
        for _ in range(rng.randrange(1, 6)):
            r = rng.choice(regions)
            where = rng.choice([r.base, r.base + r.size - 8, r.base + rng.randrange(r.size - 8)])
            data = bytes(8) if rng.random() < 0.3 else rng.randbytes(8)
            await p.mem.write_memory(where, data)
        if i == 3:  # a whole page that had data becomes zero again
            await p.mem.write_memory(regions[-1].base, bytes(PAGE))
        taken.append((await p.snap.save_state(), await memory_of(p, board_name), await p.regs.read_registers()))
    assert await p.snap.save_state() == taken[-1][0]  # the same state gives the same bytes
    order = list(range(len(taken))) * 2
    rng.shuffle(order)
    for k in order:
        blob, memory, regs = taken[k]
        await run_some(m, p, rng.randrange(1, 5_000))
        await p.mem.write_memory(regions[0].base + PAGE, rng.randbytes(16))
        await p.snap.restore_state(blob)
        assert await memory_of(p, board_name) == memory, k
        assert await p.regs.read_registers() == regs, k
        assert await p.snap.save_state() == blob, k  # all of it restored: it saves the same
    m2, p2, _ = await fresh(board_name)
    for blob, memory, regs in taken:
        await p2.snap.restore_state(blob)
        assert await memory_of(p2, board_name) == memory
        assert await p2.regs.read_registers() == regs
    await m.power_off()
    await m2.power_off()


async def test_snapshots_across_a_power_cycle():
    """A machine powered on again (a new engine, memory zero) restores and saves exactly:
    what the snapshot part knew of the old engine's memory is not trusted."""
    m, p, rec = await start("mps2-an385", "crc32")
    await p.run.step(20_000)
    blob = await p.snap.save_state()
    memory = await memory_of(p, "mps2-an385")
    await m.power_off()
    await m.power_on()
    await p.snap.restore_state(blob)
    assert await memory_of(p, "mps2-an385") == memory
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    await m.power_off()
    await m.power_on()  # zero memory, nothing loaded: saves what is there, no stale page
    empty = await p.snap.save_state()
    m2, p2, _ = await fresh("mps2-an385")
    await p2.snap.restore_state(blob)
    await p2.snap.restore_state(empty)
    assert await memory_of(p2, "mps2-an385") == await memory_of(p, "mps2-an385")
    await m.power_off()
    await m2.power_off()


async def test_blob_is_sparse_and_self_contained():
    """An 8 MiB board with a small program stores only its non-zero pages; a second
    snapshot after a little execution holds every page again (not a delta)."""
    m, p, _ = await start("mps2-an385", "crc32")
    await p.run.step(10_000)
    first = fmt.decode(await p.snap.save_state(), board("mps2-an385"))
    await p.run.step(10_000)
    second_blob = await p.snap.save_state()
    second = fmt.decode(second_blob, board("mps2-an385"))
    stored = sum(len(pages) for pages in second.pages)
    assert 0 < stored < 16 and len(second_blob) < 64 * 1024
    assert set(second.pages[0]) == set(first.pages[0])  # the program's pages, in both
    await m.power_off()


# --------------------------------------------------------------------------- the page tracker


def test_page_tracker_packs_and_writes_only_what_changed():
    sizes = (5 * PAGE + 100, 3 * PAGE)  # a region whose last page is short
    ram = [memoryview(bytearray(size)) for size in sizes]
    tracker = PageTracker(sizes)
    assert tracker.capture(ram) == ({}, {})  # all zero: nothing stored
    ram[0][PAGE + 5] = 1
    ram[0][5 * PAGE + 99] = 2  # the short last page
    ram[1][0] = 3
    first = tracker.capture(ram)
    assert sorted(first[0]) == [1, 5] and sorted(first[1]) == [0]
    ram[0][3 * PAGE] = 4
    collected = tracker.collect(ram)
    assert collected.changes == [{3: bytes(ram[0][3 * PAGE:4 * PAGE])}, {}]  # copies only that page
    second = tracker.commit(collected, pack_changes(collected.changes))
    assert sorted(second[0]) == [1, 3, 5]
    assert second[0][1] is first[0][1] and second[1] is first[1]  # unchanged: reused as is
    assert first[0].keys() == {1, 5}  # an image handed out is never modified
    # back to the first image: page 3 differs from the baseline; page 2 was dirtied behind
    # the tracker's back (its data comes from the baseline: zeros), nothing else is touched
    ram[0][2 * PAGE] = 9
    assert tracker.differing(first) == [[3], []]
    prepared = tracker.prepare(first)
    assert prepared[1] == [{3: None}, {}]
    assert tracker.apply(ram, first, prepared) == 2
    assert bytes(ram[0][2 * PAGE:4 * PAGE]) == bytes(2 * PAGE)
    assert ram[0][PAGE + 5] == 1 and ram[0][5 * PAGE + 99] == 2
    assert tracker.differing(first) == [[], []] and tracker.dirty(0, ram[0]) == []
    # the second image again: only page 3 comes back, unpacked from its packed bytes
    prepared = tracker.prepare(second)
    assert list(prepared[1][0]) == [3]
    assert tracker.apply(ram, second, prepared) == 1
    assert ram[0][3 * PAGE] == 4
    # a page changed after prepare, or a baseline replaced since: still exact
    stale = tracker.prepare(first)
    ram[1][PAGE] = 7
    tracker.forget()
    # against an all-zero baseline every non-zero page is rewritten: 1, 3, 5 and 0, 1
    assert tracker.apply(ram, first, stale) == 5
    assert ram[0][3 * PAGE] == 0 and ram[1][PAGE] == 0 and ram[1][0] == 3
    assert ram[0][PAGE + 5] == 1 and ram[0][5 * PAGE + 99] == 2


def test_a_corrupt_page_is_refused_before_anything_is_written():
    sizes = (4 * PAGE,)
    ram = [memoryview(bytearray(PAGE * 4))]
    tracker = PageTracker(sizes)
    ram[0][0] = 1
    good = tracker.capture(ram)
    ram[0][PAGE] = 2  # dirty: would be written back
    for bad in ({0: good[0][0], 2: bytes((fmt.ZLIB,)) + zlib.compress(b"x" * (PAGE + 1))},
                {1: bytes((fmt.RAW,)) + b"short"}):
        with pytest.raises(fmt.Corrupt):
            tracker.prepare((bad,))
        with pytest.raises(fmt.Corrupt):  # a stale preparation is redone, and refused the same
            tracker.apply(ram, (bad,), (tracker.generation - 1, [{}]))
    assert bytes(ram[0]) == b"\x01" + bytes(PAGE - 1) + b"\x02" + bytes(3 * PAGE - 1)


def test_unpack_is_bounded():
    bomb = bytes((fmt.ZLIB,)) + zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    tracemalloc.start()
    try:
        with pytest.raises(fmt.Corrupt):
            fmt.unpack(bomb, PAGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    for bad in (b"", b"\x07abc", bytes((fmt.ZLIB,)) + b"not zlib",
                bytes((fmt.ZLIB,)) + zlib.compress(bytes(PAGE)) + b"trailing"):
        with pytest.raises(fmt.Corrupt):
            fmt.unpack(bad, PAGE)
    assert fmt.unpack(fmt.pack(b"abc" * 100), 300) == b"abc" * 100
    noise = random.Random(1).randbytes(PAGE)
    assert fmt.pack(noise)[0] == fmt.RAW and fmt.unpack(fmt.pack(noise), PAGE) == noise


# --------------------------------------------------------------------------- crafted blobs


def split(blob: bytes) -> tuple[dict, bytes]:
    """(header, everything after it) of a version 2 blob."""
    (hlen,) = struct.unpack_from("<I", blob, 10)
    return json.loads(blob[14:14 + hlen]), blob[14 + hlen:]


def join(header: dict, rest: bytes, version: int = fmt.VERSION) -> bytes:
    hjson = json.dumps(header, separators=(",", ":")).encode()
    return fmt.MAGIC + struct.pack("<HI", version, len(hjson)) + hjson + rest


async def test_crafted_blobs_are_refused_and_change_nothing():
    m, p, rec = await start("mps2-an385", "hello")
    await p.run.step(100)
    blob = await p.snap.save_state()
    header, rest = split(blob)
    assert join(header, rest) == blob
    pages = sum(header["pages"])
    table, data = rest[:8 * pages], rest[8 * pages:]
    first_n, first_len = struct.unpack_from("<II", table, 0)

    def with_header(**changes: object) -> bytes:
        return join({**header, **changes}, rest)

    def with_pair(n: int, stored: int) -> bytes:
        return join(header, struct.pack("<II", n, stored) + table[8:] + data)

    big = board("mps2-an385").memory[0].size // PAGE
    bad = {
        "empty": b"",
        "garbage": b"garbage",
        "truncated": blob[: len(blob) // 2],
        "one byte short": blob[:-1],
        "one byte more": blob + b"\0",
        "other version": fmt.MAGIC + struct.pack("<H", 99) + blob[10:],
        "header not json": join(header, rest)[:14] + b"x" + join(header, rest)[15:],
        "header missing a key": join({k: v for k, v in header.items() if k != "regs"}, rest),
        "huge header length": fmt.MAGIC + struct.pack("<HI", 2, 1 << 31) + blob[14:],
        "other board": with_header(board="lm3s6965evb"),
        "bigger region": with_header(regions=[[n, b, s * 256] for n, b, s in header["regions"]]),
        "more pages than the region": with_header(pages=[big + 1, *header["pages"][1:]]),
        "page outside its region": with_pair(big, first_len),
        "page stored too long": with_pair(first_n, PAGE + 2),
        "page table past the end": with_header(pages=[big, big]),
        "other page size": with_header(page_size=1024),
        "image segment outside memory": with_header(image={
            **header["image"], "segments": [[0x90000000, *header["image"]["segments"][0][1:]]]}),
        "deep json": fmt.MAGIC + struct.pack("<HI", 2, 100_000) + b"[" * 100_000,
    }
    regs_before = await p.regs.read_registers()
    memory_before = await memory_of(p, "mps2-an385")
    for why, blob_bad in bad.items():
        with pytest.raises(BadRequest, match="snapshot") as err:
            await p.snap.restore_state(blob_bad)
        assert err.value.field == "snapshot", why
    # a page that is well-formed in the table but does not unpack: refused at restore
    # time, before a byte of memory is written (the zeroed page 1 of ssram1 would be)
    await p.mem.write_memory(PAGE, b"\x55" * 64)
    memory_before = await memory_of(p, "mps2-an385")
    forged = bytearray(blob)
    at = len(blob) - len(data)  # the first stored page's data: its codec byte
    forged[at] = 7
    with pytest.raises(BadRequest, match="corrupt snapshot"):
        await p.snap.restore_state(bytes(forged))
    assert await p.regs.read_registers() == regs_before  # untouched by the refused blobs
    assert await memory_of(p, "mps2-an385") == memory_before
    await p.snap.restore_state(blob)
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    await m.power_off()


async def test_bad_peripheral_state_resets_with_the_snapshots_memory():
    m, p, rec = await start("mps2-an385", "hello")
    blob = await p.snap.save_state()
    header, rest = split(blob)
    with pytest.raises(BadRequest, match="corrupt snapshot"):  # refused before anything is written
        await p.snap.restore_state(join({**header, "core": {"nvic": "nonsense"}}, rest))
    assert m.state == MachineState.HALTED
    await p.run.run()
    assert (await rec.wait_stop()).exit_code == 0
    assert bytes(rec.console) == b"Hello from mps2-an385!\n"
    await m.power_off()


async def test_snapshot_rejects_other_board_and_garbage():
    m, p, _ = await start("lm3s6965evb", "hello")
    blob = await p.snap.save_state()
    other, other_p, _ = await start("mps2-an385", "hello")
    with pytest.raises(BadRequest, match="lm3s6965evb"):
        await other_p.snap.restore_state(blob)
    with pytest.raises(BadRequest):
        await p.snap.restore_state(b"garbage")
    await m.power_off()
    await other.power_off()


# --------------------------------------------------------------------------- version 1


def encode_v1(snap: fmt.MachineSnapshot, memory: list[bytes], image: list[tuple[int, bytes]]) -> bytes:
    """A blob as servers before version 2 wrote it (one zlib stream)."""
    header = {
        "version": 1, "board": snap.board, "arch": snap.arch, "regs": snap.regs, "core": snap.core,
        "uarts": snap.uarts, "instructions": snap.instructions, "cycles": snap.cycles,
        "exact": snap.exact, "regions": [list(r) for r in snap.regions],
        "image": {"entry": snap.image.entry if snap.image else None, "arch": "arm-cortex-m",
                  "segments": [[a, len(d)] for a, d in image]},
    }
    hjson = json.dumps(header).encode()
    payload = struct.pack("<I", len(hjson)) + hjson + b"".join(memory) + b"".join(d for _, d in image)
    return fmt.MAGIC + struct.pack("<H", 1) + zlib.compress(payload, 1)


async def test_version_1_blobs_still_restore():
    name = "lm3s6965evb"
    m, p, _ = await start(name, "crc32")
    await p.run.step(30_000)
    snap = fmt.decode(await p.snap.save_state(), board(name))
    memory = await memory_of(p, name)
    regs = await p.regs.read_registers()
    assert snap.image is not None
    image = [(s.address, fmt.unpack(s.packed, s.length)) for s in snap.image.segments]
    old = encode_v1(snap, [await p.mem.read_memory(r.base, r.size) for r in board(name).memory], image)
    m2, p2, rec2 = await fresh(name)
    await p2.snap.restore_state(old)
    assert await memory_of(p2, name) == memory
    assert await p2.regs.read_registers() == regs
    await m2.reset()  # its image came along
    await p2.run.run()
    assert (await rec2.wait_stop()).exit_code == 0
    assert bytes(rec2.console) == b"crc32=0x80f45f04\n"
    # a version 1 bomb is bounded by the board: refused, never inflated past it
    bomb = fmt.MAGIC + struct.pack("<H", 1) + zlib.compress(bytes(64 << 20), 9)
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="corrupt snapshot"):
            fmt.decode(bomb, board(name))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = fmt.MAX_HEADER + 2 * sum(r.size for r in board(name).memory)  # what the board allows
    assert peak < 2 * bound + (1 << 20)  # inflated output and its final copy, never 64 MiB
    await m.power_off()
    await m2.power_off()


# --------------------------------------------------------------------------- big changes, concurrency


async def test_many_pages_and_a_big_image_take_the_threaded_path(monkeypatch):
    """Past the inline limits (pages to pack or unpack, a program image to pack) the work
    moves to a thread; the result is the same."""
    import machineserver.server.drivers.unicorn.snapshots as snapshots

    threaded: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        threaded.append(getattr(fn, "__name__", ""))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(snapshots.asyncio, "to_thread", spy)
    name = "mps2-an385"
    rng = random.Random(7)
    code = bytearray(rng.randbytes(3 * snapshots.INLINE_IMAGE))
    code[0:8] = struct.pack("<II", 0x20001000, 0x101)  # initial sp, reset vector
    m, p, _ = await fresh(name)
    await m.load(ProgramImage((Segment(0, bytes(code)),), entry=0x101, arch=Arch.ARM_CORTEX_M))
    ram = board(name).memory[1]
    pages = 4 * snapshots.INLINE_PAGES
    for i in range(pages):
        await p.mem.write_memory(ram.base + i * 2 * PAGE, rng.randbytes(64))
    blob = await p.snap.save_state()
    memory = await memory_of(p, name)
    assert len(fmt.decode(blob, board(name)).pages[1]) == pages
    for i in range(pages):
        await p.mem.write_memory(ram.base + i * 2 * PAGE + PAGE, rng.randbytes(64))
    await p.snap.restore_state(blob)
    assert await memory_of(p, name) == memory
    m2, p2, _ = await fresh(name)
    await p2.snap.restore_state(blob)
    assert await memory_of(p2, name) == memory
    assert await p2.snap.save_state() == blob  # the image came along, packed the same
    # packing the first save, decoding the two big blobs and unpacking into the fresh
    # machine; restoring on the machine that saved unpacks nothing (the dirtied pages come
    # back from its baseline) and the last save packs nothing (all of it is the baseline)
    assert threaded == ["_encode", "decode", "decode", "_prepare"]
    await m.power_off()
    await m2.power_off()


async def test_concurrent_saves_and_restores_take_turns():
    m, p, _ = await start("netduinoplus2", "crc32")
    await p.run.step(10_000)
    a = await p.snap.save_state()
    await p.run.step(10_000)
    b = await p.snap.save_state()
    results = await asyncio.gather(p.snap.restore_state(a), p.snap.save_state(),
                                   p.snap.restore_state(b), p.snap.save_state())
    assert results[1] == a and results[3] == b  # each save saw the restore before it
    await m.power_off()


async def test_cancelled_saves_and_restores_leave_snapshots_exact():
    """A save or restore cancelled anywhere (before, during or after its work on a thread)
    leaves the machine saving and restoring exactly."""
    name = "mps2-an385"
    rng = random.Random(3)
    m, p, _ = await start(name, "crc32")
    ram = board(name).memory[1]

    async def scribble() -> None:
        for i in range(40):  # past the inline limit: packing and unpacking go to a thread
            await p.mem.write_memory(ram.base + i * PAGE, rng.randbytes(32))

    await scribble()
    b = await p.snap.save_state()
    memory_b = await memory_of(p, name)
    for delay in (0, 0.0001, 0.0005, 0.001, 0.003):
        await scribble()
        for call in (p.snap.save_state, lambda: p.snap.restore_state(b)):
            task = asyncio.ensure_future(call())
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await scribble()
        await p.snap.restore_state(b)
        assert await memory_of(p, name) == memory_b, delay
        assert await p.snap.save_state() == b, delay
    await m.power_off()

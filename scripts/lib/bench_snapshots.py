"""Snapshots: save and restore through the SDK, and snapshot sizes per board (issue 11).

* Unicorn, mps2-an385 (8 MiB of RAM, crc32 loaded): CreateSnapshot and RestoreSnapshot
  p50 on a halted session that ran 1,000 instructions since the last snapshot (a few
  pages changed), on this run's server (emulation in worker processes) and on a second
  server with ``--workers 0`` (in-process). Peer: GetSession on the same session in the
  same rounds (a unary RPC that does nothing: the floor any RPC pays here). Target:
  <= 5 ms each, with workers.
* The same on the QEMU backend (same board, same rounds): QEMU's own snapshot (migration
  stream; a restore starts a new QEMU) as the peer of Unicorn's.
* The driver alone, in this process (no RPC, no blob store): a Unicorn machine's
  save_state/restore_state vs raw Unicorn copying the same board's state the naive way
  (context_save plus mem_read of every region; context_restore plus mem_write).
* Snapshot size on every board, Unicorn and QEMU (where QEMU 7.2 can restore it), after
  the same 20,000 instructions of crc32, next to the board's memory size.

Rounds interleave ours and the peer's; figures are medians over all rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import Server, firmware, line, single

BOARD = "mps2-an385"
ROUNDS = 5
CYCLES = 10  # save + restore cycles per round and server (unicorn)
QEMU_CYCLES = 2
STEP = 1_000  # instructions between two snapshots
SIZE_STEP = 20_000
BOARDS = ("lm3s6965evb", "mps2-an385", "netduinoplus2", "sifive_e")


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = await call()
    return (time.perf_counter() - t) * 1000, result


class Rig:
    """One session on one server and backend, halted, with the program loaded."""

    def __init__(self, client: Any, name: str) -> None:
        self.c, self.name = client, name
        self.save: list[float] = []
        self.restore: list[float] = []
        self.get: list[float] = []

    @classmethod
    async def open(cls, client: Any, backend: str) -> Rig:
        prog = (await client.upload_program(firmware(BOARD, "crc32"))).program.name
        s = (await client.sessions.create_session(board_template=BOARD, program=prog, power_on=True,
                                                  backend=backend)).session
        await client.debug.step(name=s.name, count=SIZE_STEP)
        return cls(client, s.name)

    async def cycles(self, n: int) -> None:
        c, name = self.c, self.name
        for _ in range(n):
            await c.debug.step(name=name, count=STEP)
            get, _ = await _timed(lambda: c.sessions.get_session(name=name))
            save, resp = await _timed(lambda: c.sessions.create_snapshot(name=name))
            snapshot = resp.snapshot.name
            await c.debug.step(name=name, count=STEP)
            restore, _ = await _timed(lambda s=snapshot: c.sessions.restore_snapshot(name=name, snapshot=s))
            await c.sessions.delete_snapshot(name=snapshot)
            self.get.append(get)
            self.save.append(save)
            self.restore.append(restore)


def _raw_unicorn_copy(rounds: int) -> tuple[list[float], list[float]]:
    """Raw Unicorn on mps2-an385's memory map with crc32 part run: the naive snapshot
    (context_save + mem_read of every region) and restore (context_restore + mem_write)."""
    from unicorn import UC_ARCH_ARM, UC_MODE_MCLASS, UC_MODE_THUMB, Uc, UcError
    from unicorn.arm_const import UC_ARM_REG_SP, UC_CPU_ARM_CORTEX_M3

    from machineserver.server.core.boards import load_shipped_boards
    from machineserver.server.core.images import ImageFormat, parse_image

    regions = [(r.base, r.size) for r in load_shipped_boards()[BOARD].memory]
    uc = Uc(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
    uc.ctl_set_cpu_model(UC_CPU_ARM_CORTEX_M3)
    for base, size in regions:
        uc.mem_map(base, size)
    image = parse_image(firmware(BOARD, "crc32").read_bytes(), ImageFormat.ELF).image
    for seg in image.segments:
        uc.mem_write(seg.address, seg.data)
    uc.reg_write(UC_ARM_REG_SP, int.from_bytes(uc.mem_read(0, 4), "little"))
    with contextlib.suppress(UcError):  # an MMIO access (unmapped here) ends the run: the state is what counts
        uc.emu_start(int.from_bytes(uc.mem_read(4, 4), "little") | 1, 0xFFFFFFFF, count=SIZE_STEP)
    saves, restores = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        ctx = uc.context_save()
        memory = [bytes(uc.mem_read(base, size)) for base, size in regions]
        saves.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        uc.context_restore(ctx)
        for (base, _), data in zip(regions, memory, strict=True):
            uc.mem_write(base, data)
        restores.append((time.perf_counter() - t) * 1000)
    return saves, restores


async def _driver_alone(rounds: int) -> tuple[list[float], list[float]]:
    """Our Unicorn driver in this process: save_state and restore_state, nothing else."""
    from machineserver.server.core.boards import load_shipped_boards
    from machineserver.server.core.images import ImageFormat, parse_image
    from machineserver.server.drivers.base import MachineOptions, RunControl, Snapshots, StopInfo
    from machineserver.server.drivers.unicorn import UnicornBackend

    class Quiet:
        def console_output(self, data: bytes) -> None: ...
        def stopped(self, info: StopInfo) -> None: ...
        def failed(self, reason: str) -> None: ...

    m = UnicornBackend().create_machine(load_shipped_boards()[BOARD], MachineOptions(), Quiet())
    await m.power_on()
    try:
        await m.load(parse_image(firmware(BOARD, "crc32").read_bytes(), ImageFormat.ELF).image)
        run, snap = m.capability(RunControl), m.capability(Snapshots)
        await run.step(SIZE_STEP)
        saves, restores = [], []
        for _ in range(rounds):
            await run.step(STEP)
            took, blob = await _timed(snap.save_state)
            saves.append(took)
            await run.step(STEP)
            took, _ = await _timed(lambda b=blob: snap.restore_state(b))
            restores.append(took)
        return saves, restores
    finally:
        await m.power_off()


async def _size(client: Any, board: str, backend: str) -> int:
    prog = (await client.upload_program(firmware(board, "crc32"))).program.name
    s = (await client.sessions.create_session(board_template=board, program=prog, power_on=True,
                                              backend=backend)).session
    try:
        await client.debug.step(name=s.name, count=SIZE_STEP)
        snap = (await client.sessions.create_snapshot(name=s.name)).snapshot
        await client.sessions.delete_snapshot(name=snap.name)
        return int(snap.size_bytes)
    finally:
        await client.sessions.delete_session(name=s.name)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def bench_snapshots(server: Server) -> None:
    import shutil

    from machineserver.sdk import AsyncClient
    from machineserver.sdk import errors as sdk_errors
    from machineserver.server.core.boards import load_shipped_boards

    print(f"snapshots ({BOARD}, crc32, {STEP} instructions between snapshots; medians of "
          f"{ROUNDS} interleaved rounds)")
    qemu = bool(shutil.which("qemu-system-arm"))
    inproc = Server(extra=["--workers", "0"])
    try:
        async with await AsyncClient.connect(server.target, timeout=60) as c, \
                await AsyncClient.connect(inproc.target, timeout=60) as ci:
            rigs = {"workers": await Rig.open(c, "unicorn"), "in-process": await Rig.open(ci, "unicorn")}
            q = await Rig.open(c, "qemu") if qemu else None
            for rig in rigs.values():
                await rig.cycles(2)  # warm up (workers forked, threads started)
            driver_save: list[float] = []
            driver_restore: list[float] = []
            raw_save: list[float] = []
            raw_restore: list[float] = []
            for rig in rigs.values():
                rig.save.clear()
                rig.restore.clear()
                rig.get.clear()
            for _ in range(ROUNDS):
                for rig in rigs.values():
                    await rig.cycles(CYCLES)
                if q is not None:
                    await q.cycles(QEMU_CYCLES)
                s, r = await _driver_alone(CYCLES)
                driver_save += s
                driver_restore += r
                s, r = await asyncio.to_thread(_raw_unicorn_copy, CYCLES)
                raw_save += s
                raw_restore += r
            for mode, rig in rigs.items():
                floor = _median(rig.get)
                line(f"unicorn save p50 ({mode}) vs GetSession", _median(rig.save), floor, "ms",
                     "target <= 5 ms" if mode == "workers" else "")
                line(f"unicorn restore p50 ({mode}) vs GetSession", _median(rig.restore), floor, "ms",
                     "target <= 5 ms" if mode == "workers" else "")
            w = rigs["workers"]
            single("unicorn save p90 (workers)", sorted(w.save)[int(0.9 * len(w.save))], "ms", "")
            single("unicorn restore p90 (workers)", sorted(w.restore)[int(0.9 * len(w.restore))], "ms", "")
            if q is not None:
                line("save p50, unicorn vs qemu (workers)", _median(w.save), _median(q.save), "ms", "speed",
                     speed=True)
                line("restore p50, unicorn vs qemu (workers)", _median(w.restore), _median(q.restore), "ms",
                     "speed", speed=True)
            line("driver save_state vs raw Unicorn full copy", _median(driver_save), _median(raw_save), "ms",
                 "in this process, no RPC")
            line("driver restore_state vs raw Unicorn full copy", _median(driver_restore), _median(raw_restore),
                 "ms", "in this process, no RPC")

            boards = load_shipped_boards()
            print(f"snapshot size after {SIZE_STEP} instructions of crc32 vs the board's memory")
            for board in BOARDS:
                memory_kib = sum(r.size for r in boards[board].memory) / 1024
                for backend in ("unicorn", "qemu"):
                    if backend == "qemu" and not qemu:
                        continue
                    try:
                        size = await _size(c, board, backend)
                    except (sdk_errors.Unimplemented, sdk_errors.FailedPrecondition) as exc:
                        print(f"  {board} {backend}: no snapshot ({exc.message[:90]})")
                        continue
                    line(f"{board} {backend} size vs board memory", size / 1024, memory_kib, "KiB",
                         "size ratio")
    finally:
        inproc.stop()

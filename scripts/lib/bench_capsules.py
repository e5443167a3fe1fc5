"""Failure capsules and machine-time waits (issue 16).

* A capsule (CreateCapsule + ExportCapsule: snapshot, registers, backtrace, console, trace
  tail, LCOV, telemetry, program, manifest, zipped) of a session halted in the assert
  firmware with coverage on, next to its peer, the snapshot alone (CreateSnapshot +
  ExportSnapshot) of the same session: time (median of rounds) and bytes. Unicorn and QEMU
  (mps2-an385). Target: a capsule under 1 MB, and within 3x of the snapshot's time.
* ExpectConsole with a virtual-time budget (the pytest plugin's expect) until the firmware's
  first line, next to the peer a client would write without it, StreamConsole followed until
  the same bytes: each on a fresh running session (creation not counted), median.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench import Server, firmware, line

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb

BOARD = "mps2-an385"
ROUNDS = 7


async def _halted_in_assert(client: AsyncClient, backend: str, program: str) -> str:
    name = (await client.sessions.create_session(board_template=BOARD, backend=backend, program=program,
                                                 power_on=True, options={"coverage": True})).session.name
    await client.coverage.start_coverage(name=name)
    await client.debug.set_breakpoint(name=name, location={"symbol": "check_balance"})
    await client.debug.continue_(name=name, wait=True)
    return str(name)


async def _capsule(client: AsyncClient, session: str) -> int:
    cap = (await client.capsules.create_capsule(name=session, reason="bench")).capsule
    size = len(b"".join([m.chunk async for m in client.capsules.export_capsule(name=cap.name)]))
    await client.capsules.delete_capsule(name=cap.name)
    return size


async def _snapshot(client: AsyncClient, session: str) -> int:
    snap = (await client.sessions.create_snapshot(name=session)).snapshot
    size = len(b"".join([m.chunk async for m in client.sessions.export_snapshot(name=snap.name)]))
    await client.sessions.delete_snapshot(name=snap.name)
    return size


async def _timed(call, *args) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    size = await call(*args)
    return (time.perf_counter() - t) * 1000, size


async def bench_capsules(server: Server) -> None:
    print("capsules: a failure capsule vs the snapshot alone (same halted session); ExpectConsole vs StreamConsole")
    async with await AsyncClient.connect(server.target, timeout=120) as client:
        elf = firmware(BOARD, "assert")
        program = (await client.upload_program(Path(elf))).program.name
        hello = (await client.upload_program(Path(firmware(BOARD, "hello")))).program.name
        for backend in ("unicorn", "qemu"):
            caps: list[float] = []
            snaps: list[float] = []
            cap_size = snap_size = 0
            for _ in range(ROUNDS):
                # a fresh session per round: a QEMU capture right after a snapshot of an
                # unchanged machine would reuse the snapshot's stream
                session = await _halted_in_assert(client, backend, program)
                ms, snap_size = await _timed(_snapshot, client, session)
                snaps.append(ms)
                await client.debug.step(name=session, count=1)
                ms, cap_size = await _timed(_capsule, client, session)
                caps.append(ms)
                await client.sessions.delete_session(name=session)
            line(f"{backend}: capsule vs snapshot alone, create+export", statistics.median(caps),
                 statistics.median(snaps), "ms", "target <= 3x")
            line(f"{backend}: capsule vs snapshot alone, bytes", cap_size / 1024, snap_size / 1024, "KiB",
                 "target: capsule < 1 MB")
            expects: list[float] = []
            streams: list[float] = []
            for _ in range(ROUNDS):
                name = (await client.sessions.create_session(board_template=BOARD, backend=backend, program=hello,
                                                             run=True)).session.name
                t = time.perf_counter()
                r = await client.sessions.expect_console(name=name, pattern="Hello from",
                                                         budget=cpb.Budget(virtual_time_ns=50_000_000))
                expects.append((time.perf_counter() - t) * 1000)
                assert r.outcome == cpb.WAIT_OUTCOME_MATCHED, r
                await client.sessions.delete_session(name=name)
                name = (await client.sessions.create_session(board_template=BOARD, backend=backend, program=hello,
                                                             run=True)).session.name
                t = time.perf_counter()
                seen = b""
                async for msg in client.sessions.stream_console(name=name, follow=True):
                    seen += msg.data
                    if b"Hello from" in seen:
                        break
                streams.append((time.perf_counter() - t) * 1000)
                await client.sessions.delete_session(name=name)
            line(f"{backend}: ExpectConsole (virtual budget) vs StreamConsole", statistics.median(expects),
                 statistics.median(streams), "ms", "first line of hello; target <= 2x")

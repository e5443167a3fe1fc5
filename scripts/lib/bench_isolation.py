"""Isolation: does one busy firmware slow every caller? (issue 11's load probe)

The same scenario on two servers started by this run: emulation in worker processes (the
default) and in the server's own process (``--workers 0``, the peer):

* 10 halted sessions (stopped at a breakpoint) and, for the busy phase, 50 sessions
  running firmware that busy-polls its UART (echo, waiting for input: a Python MMIO hook
  per poll, the worst case for the GIL);
* 10 concurrent clients calling GetSession and ReadRegisters on the halted sessions for a
  few seconds, idle first, then with the 50 busy sessions running;
* aggregate emulation throughput: 50 sessions running crc32 to its exit at once, wall
  time on each server.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from bench import CRC32_INSTRUCTIONS, Server, firmware, line, pct, single

CLIENTS = 10
SECONDS = 3.0
BUSY = 50
HALTED = 10
BOARD = "lm3s6965evb"


async def _load(calls: list[Callable[[], Awaitable[object]]], seconds: float) -> tuple[list[float], float]:
    """CLIENTS callers going round the calls for ``seconds``: latencies (ms), calls/s."""
    lat: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await calls[n % len(calls)]()
            lat.append((time.perf_counter() - t) * 1000)
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(CLIENTS)))
    return lat, len(lat) / (time.perf_counter() - t0)


async def _scenario(server: Server) -> dict[str, float]:
    from machineserver.sdk import AsyncClient

    out: dict[str, float] = {}
    async with await AsyncClient.connect(server.target, timeout=120) as c:
        hello = (await c.upload_program(str(firmware(BOARD, "hello")))).program.name
        echo = (await c.upload_program(str(firmware(BOARD, "echo")))).program.name
        crc = (await c.upload_program(str(firmware(BOARD, "crc32")))).program.name
        halted = []
        for _ in range(HALTED):
            s = (await c.sessions.create_session(board_template=BOARD, program=hello, power_on=True)).session
            await c.debug.set_breakpoint(name=s.name, location={"symbol": "main"})
            await c.debug.continue_(name=s.name, wait=True)
            halted.append(s.name)

        def get(name: str) -> Callable[[], Awaitable[object]]:
            return lambda: c.sessions.get_session(name=name)

        def regs(name: str) -> Callable[[], Awaitable[object]]:
            return lambda: c.debug.read_registers(name=name, names=["pc", "sp"])

        gets = [get(n) for n in halted]
        reads = [regs(n) for n in halted]
        for phase in ("idle", "busy"):
            if phase == "busy":
                busy = [(await c.sessions.create_session(board_template=BOARD, program=echo, run=True)).session.name
                        for _ in range(BUSY)]
                await asyncio.sleep(1.0)  # let them all reach their polling loop
            lat_get, rate_get = await _load(gets, SECONDS)
            lat_read, rate_read = await _load(reads, SECONDS)
            out[f"{phase}.get.p50"], out[f"{phase}.get.p99"] = pct(lat_get, 0.5), pct(lat_get, 0.99)
            out[f"{phase}.read.p50"], out[f"{phase}.read.p99"] = pct(lat_read, 0.5), pct(lat_read, 0.99)
            out[f"{phase}.get.rate"], out[f"{phase}.read.rate"] = rate_get, rate_read
        for name in busy:
            await c.sessions.delete_session(name=name)

        # aggregate throughput: BUSY sessions run crc32 to the end at once
        names = [(await c.sessions.create_session(board_template=BOARD, program=crc, power_on=True)).session.name
                 for _ in range(BUSY)]
        t0 = time.perf_counter()
        await asyncio.gather(*(c.debug.continue_(name=n, wait=True) for n in names))
        out["crc32.wall"] = time.perf_counter() - t0
        for name in names + halted:
            await c.sessions.delete_session(name=name)
    return out


async def bench_isolation(server: Server) -> None:
    print(f"isolation: {BUSY} sessions busy-polling a UART, {CLIENTS} clients reading {HALTED} halted sessions "
          "(workers vs the same in the server's process)")
    inproc = Server(extra=["--workers", "0"])
    try:
        ours_runs, peer_runs = [], []
        for _ in range(2):  # interleaved, so background noise falls on both alike
            ours_runs.append(await _scenario(server))
            peer_runs.append(await _scenario(inproc))
    finally:
        inproc.stop()

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    line("GetSession p99 while busy", med(ours_runs, "busy.get.p99"), med(peer_runs, "busy.get.p99"), "ms",
         "target < 20 ms with workers")
    line("GetSession calls/s while busy", med(ours_runs, "busy.get.rate"), med(peer_runs, "busy.get.rate"),
         "call/s", "speed")
    line("ReadRegisters (halted) p50, busy vs idle", med(ours_runs, "busy.read.p50"),
         med(ours_runs, "idle.read.p50"), "ms", "workers; target <= 1.5x")
    line("ReadRegisters (halted) p50, busy vs idle, in-process", med(peer_runs, "busy.read.p50"),
         med(peer_runs, "idle.read.p50"), "ms", "the peer, for scale")
    line("ReadRegisters (halted) p99 while busy", med(ours_runs, "busy.read.p99"), med(peer_runs, "busy.read.p99"),
         "ms", "workers vs in-process")
    total = BUSY * CRC32_INSTRUCTIONS / 1e6
    line(f"aggregate throughput, {BUSY} x crc32 to exit", total / med(ours_runs, "crc32.wall"),
         total / med(peer_runs, "crc32.wall"), "MIPS", "speed, target >= 0.9x")
    single("GetSession p50 while busy (workers)", med(ours_runs, "busy.get.p50"), "ms", "")
    single("GetSession p50 idle (workers)", med(ours_runs, "idle.get.p50"), "ms", "")

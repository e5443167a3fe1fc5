"""Scale and real time: many live sessions on one server, and how fast virtual time runs.

* 200 live Unicorn sessions halted at a breakpoint: memory per session (the server's and
  the workers' own pages, USS, before vs after) and GetSession p99 with them, next to the
  same server holding one session (the peer);
* the real-time factor of a 100 MHz Cortex-M (mps2-an385 with cpu_mhz 100): virtual
  seconds per host second running crc32 (compute) and mmio (200000 UART status polls),
  Unicorn next to QEMU (with -icount, so its virtual time is instruction-exact) on the
  same firmware in the same run. Unicorn's virtual time is exact instructions over the
  clock: the instruction count comes from a run with the icount option (counted slices),
  the host time from a run without (the default). For scale: Renode's published figures
  are 0.1-1x.
"""

from __future__ import annotations

import statistics
import time

import psutil
from bench import Server, firmware, line, pct, single

SESSIONS = 200
BOARD = "mps2-an385"
MHZ = 100


def _uss(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            continue
    return total


def _family(server: Server) -> list[int]:
    """The server and its descendants (zygote, workers, QEMUs)."""
    root = psutil.Process(server.proc.pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


async def _get_latency(client: object, name: str, n: int = 600) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await client.sessions.get_session(name=name)  # type: ignore[attr-defined]
        out.append((time.perf_counter() - t) * 1000)
    return out[100:]


async def _many_halted(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    async with await AsyncClient.connect(server.target, timeout=120) as c:
        prog = (await c.upload_program(str(firmware(BOARD, "crc32")))).program.name

        async def halted_at_main() -> str:
            s = (await c.sessions.create_session(board_template=BOARD, program=prog, power_on=True)).session
            await c.debug.set_breakpoint(name=s.name, location={"symbol": "main"})
            await c.debug.continue_(name=s.name, wait=True)
            return str(s.name)

        first = await halted_at_main()
        one = await _get_latency(c, first)
        before = _uss(_family(server))
        names = [first]
        t0 = time.perf_counter()
        for _ in range(SESSIONS - 1):
            names.append(await halted_at_main())
        took = time.perf_counter() - t0
        after = _uss(_family(server))
        many = await _get_latency(c, names[len(names) // 2])
        for name in names:
            await c.sessions.delete_session(name=name)
    per = (after - before) / (SESSIONS - 1) / 2**20
    single(f"{SESSIONS} halted Unicorn sessions: memory per session (USS)", per, "MiB", "server + workers")
    single(f"{SESSIONS} halted Unicorn sessions: created and halted per second", (SESSIONS - 1) / took, "1/s", "")
    line(f"GetSession p99 with {SESSIONS} live sessions vs with 1", pct(many, 0.99), pct(one, 0.99), "ms", "cost")
    line(f"GetSession p50 with {SESSIONS} live sessions vs with 1", pct(many, 0.5), pct(one, 0.5), "ms", "cost")


async def _board_100mhz(client: object) -> str:
    config = (await client.capabilities.get_board_template(name=f"boardTemplates/{BOARD}")).board_template.config  # type: ignore[attr-defined]
    return str(config).replace("cpu_mhz: 25", f"cpu_mhz: {MHZ}").replace(f"name: {BOARD}", "name: mps2-an385-100mhz")


async def _run(client: object, config: str, prog: str, backend: str, icount: bool) -> tuple[float, int, int]:
    """(host seconds from continue to exit, instructions, virtual ns) of one run."""
    c = client
    s = (await c.sessions.create_session(board_config=config, program=prog, backend=backend,  # type: ignore[attr-defined]
                                         options={"icount": icount}, power_on=True)).session
    t = time.perf_counter()
    await c.debug.continue_(name=s.name, wait=True)  # type: ignore[attr-defined]
    host = time.perf_counter() - t
    m = (await c.telemetry.get_session_metrics(name=s.name)).metrics  # type: ignore[attr-defined]
    await c.sessions.delete_session(name=s.name)  # type: ignore[attr-defined]
    return host, int(m.instructions), int(m.virtual_time_ns)


async def _real_time(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    async with await AsyncClient.connect(server.target, timeout=120) as c:
        config = await _board_100mhz(c)
        for program in ("crc32", "mmio"):
            prog = (await c.upload_program(str(firmware(BOARD, program)))).program.name
            _, exact, _ = await _run(c, config, prog, "unicorn", icount=True)
            virtual_s = exact / (MHZ * 1e6)
            ours, peer = [], []
            for _ in range(5):  # interleaved
                host, _, _ = await _run(c, config, prog, "unicorn", icount=False)
                ours.append(virtual_s / host)
                qhost, _, qvirtual = await _run(c, config, prog, "qemu", icount=True)
                peer.append(qvirtual / 1e9 / qhost)
            line(f"real-time factor, {MHZ} MHz Cortex-M, {program} (unicorn vs qemu -icount)",
                 statistics.median(ours), statistics.median(peer), "x", f"virtual s per host s; {exact} instr")


async def bench_scale(server: Server) -> None:
    print(f"scale: {SESSIONS} halted sessions; real-time factor of a {MHZ} MHz Cortex-M")
    await _many_halted(server)
    await _real_time(server)

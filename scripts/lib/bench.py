"""MachineServer benchmarks: every figure next to a peer measured in the same run.

Sections (pick with --only NAME[,NAME]):
  control   unary GetCapabilities vs a bare grpc.aio echo server (p50/p99, 16 callers);
            ListBoardTemplates with 3,893 user templates; p99 beside a slow list
            (scripts/lib/bench_control_plane.py)
  unicorn   crc32 instructions/s through MachineServer vs raw Unicorn with the same
            MMIO hooks; create-to-first-console-byte p50; step round trip over the SDK
  debug     single step over the Attach stream (unicorn) vs gdb-multiarch stepping the
            same firmware through our GDB bridge, and through QEMU's own gdbstub
  coverage  crc32 with coverage collection on vs off, same backend (unicorn, qemu); the trace
            tail's ring on vs off with coverage on (driver level: crc32 on unicorn, cosim_spin
            alone, ~400 M instructions, on qemu)
  qemu      crc32 through the QEMU backend vs the same QEMU command line by hand (with
            the board's warm spare, and on a server without spares); create-to-first-
            console-byte p50; our RSP client vs gdb-multiarch (pygdbmi) stepping on the
            same QEMU gdbstub
  qemu_scale  256 QEMU sessions powered on (halted): memory per session and in total
            against a bare QEMU started by hand (scripts/lib/bench_qemu_scale.py)
  isolation 50 sessions busy-polling a UART next to 10 clients reading halted sessions:
            emulation in worker processes vs in the server's process (bench_isolation.py)
  snapshots Unicorn save/restore through the SDK vs GetSession (workers and in-process),
            vs QEMU's snapshots, driver vs raw Unicorn; sizes per board (bench_snapshots.py)
  cosim     2 Unicorn nodes in lock-step (1k/10k/100k quanta) vs 1 alone with icount;
            mixed Unicorn/QEMU; the exact cross-node halt (bench_cosim.py)
  gdbremote single step and 64-byte read over gdbremote vs gdb-multiarch, same QEMU (bench_gdbremote.py)
  jobs      200 crc32 runs on Ray (2 local workers) vs one by one in-process; per-run overhead;
            a run forked from a snapshot vs a cold boot of boot_heavy (bench_jobs.py)
  trust     unary calls with auth on (API key) vs off vs a bare echo server; a write with its audit rows
            (bench_trust.py)
  counts    exact instruction counting: raw Unicorn with no hook vs the native counting block hook,
            crc32 (tight loop) and mmio (UART polling); bare QEMU vs QEMU with our plugin's
            instruction total (count=block, as the driver loads it; count=insn too), crc32 and
            hello (bench_counts.py)
  capsules  a failure capsule vs the snapshot alone of the same halted session (time, bytes), unicorn
            and qemu; ExpectConsole with a virtual budget vs StreamConsole (bench_capsules.py)
Shared 2-core machines are noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FW = ROOT / "tests" / "firmware"
VENV_BIN = Path(sys.executable).parent
CRC32_INSTRUCTIONS = 55_326_126  # lm3s6965evb crc32.elf, counted exactly (Unicorn count= and a QEMU plugin agree)

def firmware(board: str, prog: str) -> Path:
    for base in (FW / "build", FW / "prebuilt"):
        p = base / board / f"{prog}.elf"
        if p.exists():
            return p
    raise SystemExit(f"bench: {board}/{prog}.elf missing: run make -C tests/firmware")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def line(name: str, ours: float, peer: float, unit: str, target: str, *, speed: bool = False) -> None:
    """The ratio is ours/peer: a cost ratio for times, a speed ratio for rates. With
    speed=True on a time, it is peer/ours instead: how many times faster we are."""
    ratio = (ours / peer if peer else float("nan"))
    if speed and unit in ("ms", "s"):
        ratio = peer / ours if ours else float("nan")
    print(f"  {name:<50} ours {ours:10.3f} {unit:<6} peer {peer:10.3f} {unit:<6} ratio {ratio:6.2f}x  ({target})")


def single(name: str, value: float, unit: str, target: str) -> None:
    print(f"  {name:<46} {value:10.3f} {unit:<6} ({target})")


class Server:
    """MachineServer as a child process on a free port."""

    def __init__(self, extra: list[str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="ms-bench-")
        port_file = Path(self.tmp) / "port"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "machineserver"), "--listen", "127.0.0.1:0", "--data-dir", f"{self.tmp}/data",
             "--port-file", str(port_file), "--log-level", "warning", "--max-sessions", "10000", *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("bench: server did not start")
            time.sleep(0.02)
        self.target = f"127.0.0.1:{port_file.read_text()}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.tmp, ignore_errors=True)


async def latency(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def throughput(call: Callable[[], Awaitable[object]], callers: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(callers)))
    return done / (time.perf_counter() - t)


# ---------------------------------------------------------------------- unicorn


def raw_unicorn_crc32(elf: Path, counting: bool = False) -> tuple[float, int, bytes]:
    """Raw Unicorn on the same ELF with the same hooks the driver needs: the PL011 UART
    as MMIO, the SCS as MMIO, and the semihosting interrupt hook; nothing else. With
    ``counting``, also the driver's native block counter (drivers/unicorn/blockcount.py).
    Seconds to the exit, instructions counted (0 without the counter), console bytes."""
    from elftools.elf.elffile import ELFFile
    from unicorn import UC_ARCH_ARM, UC_HOOK_INTR, UC_MODE_MCLASS, UC_MODE_THUMB, Uc
    from unicorn.arm_const import (
        UC_ARM_REG_PC,
        UC_ARM_REG_R0,
        UC_ARM_REG_R1,
        UC_ARM_REG_SP,
        UC_CPU_ARM_CORTEX_M3,
    )

    from machineserver.server.drivers.unicorn.blockcount import BlockCounter

    uc = Uc(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
    uc.ctl_set_cpu_model(UC_CPU_ARM_CORTEX_M3)
    uc.mem_map(0, 0x40000)
    uc.mem_map(0x20000000, 0x10000)
    out = bytearray()
    uc.mmio_map(0x4000C000, 0x1000, lambda u, off, size, ud: 0, None,
                lambda u, off, size, value, ud: out.append(value & 0xFF) if off == 0 else None, None)
    uc.mmio_map(0xE000E000, 0x1000, lambda u, off, size, ud: 0, None, lambda u, off, size, value, ud: None, None)
    with elf.open("rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                uc.mem_write(seg["p_paddr"], seg.data()[: seg["p_filesz"]])
    uc.reg_write(UC_ARM_REG_SP, int.from_bytes(uc.mem_read(0, 4), "little"))
    pc = int.from_bytes(uc.mem_read(4, 4), "little")
    counter = BlockCounter.attach(uc, thumb=True) if counting else None
    if counting and counter is None:
        raise SystemExit("bench: the native block counter did not build (no C compiler?)")
    done = False

    def intr(u: Uc, intno: int, ud: object) -> None:
        nonlocal done
        op = u.reg_read(UC_ARM_REG_R0)
        if op in (0x18, 0x20):
            done = True
            u.emu_stop()
            return
        if op == 0x03:
            out.append(u.mem_read(u.reg_read(UC_ARM_REG_R1), 1)[0])
        u.reg_write(UC_ARM_REG_PC, (u.reg_read(UC_ARM_REG_PC) + 2) | 1)

    uc.hook_add(UC_HOOK_INTR, intr)
    t = time.perf_counter()
    start = pc
    while not done:
        uc.emu_start(start | 1, 0xFFFFFFFF, timeout=10_000)
        start = uc.reg_read(UC_ARM_REG_PC)
        if counter is not None:
            counter.slice_ended(start & ~1)
    return time.perf_counter() - t, counter.instructions if counter else 0, bytes(out)


async def run_to_exit(client: object, board: str, program: str, backend: str) -> tuple[float, str]:
    """Create a session running the program; seconds until its EXITED event."""
    from machineserver.v1 import common_pb2

    c = client  # AsyncClient
    sid = f"b{time.monotonic_ns()}"
    name = f"sessions/{sid}"
    events = c.sessions.stream_session_events(name="")  # type: ignore[attr-defined]
    ready = asyncio.Event()

    async def wait_exit() -> float:
        async for ev in events:
            if not ready.is_set():
                continue
            if ev.session == name and ev.state == common_pb2.SESSION_STATE_EXITED:
                return time.perf_counter()
        return float("nan")

    waiter = asyncio.create_task(wait_exit())
    await asyncio.sleep(0.05)
    ready.set()
    t = time.perf_counter()
    await c.sessions.create_session(board_template=board, program=program, run=True, session_id=sid, backend=backend)  # type: ignore[attr-defined]
    end = await asyncio.wait_for(waiter, 120)
    await c.sessions.delete_session(name=name)  # type: ignore[attr-defined]
    return end - t, name


async def first_byte(client: object, board: str, program: str, backend: str) -> float:
    c = client
    t = time.perf_counter()
    s = (await c.sessions.create_session(board_template=board, program=program, run=True, backend=backend)).session  # type: ignore[attr-defined]
    async for _ in c.sessions.stream_console(name=s.name, follow=True):  # type: ignore[attr-defined]
        break
    took = time.perf_counter() - t
    await c.sessions.delete_session(name=s.name)  # type: ignore[attr-defined]
    return took * 1000


async def bench_unicorn(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    print("unicorn backend (lm3s6965evb)")
    elf = firmware("lm3s6965evb", "crc32")
    async with await AsyncClient.connect(server.target) as c:
        crc = (await c.upload_program(elf)).program.name
        hello = (await c.upload_program(firmware("lm3s6965evb", "hello"))).program.name
        ours, peer = [], []
        for _ in range(5):
            raw_s, _, out = raw_unicorn_crc32(elf)
            assert out == b"crc32=0x80f45f04\n", out
            peer.append(CRC32_INSTRUCTIONS / raw_s / 1e6)
            s, _ = await run_to_exit(c, "lm3s6965evb", crc, "unicorn")
            ours.append(CRC32_INSTRUCTIONS / s / 1e6)
        line("crc32 M instr/s, create -> exit, best of 5", max(ours), max(peer), "MIPS", "speed, target >= 0.8x")
        fb = [await first_byte(c, "lm3s6965evb", hello, "unicorn") for _ in range(30)]
        single("create -> first console byte p50", pct(fb, 0.5), "ms", "target <= 50 ms")
        s = (await c.sessions.create_session(board_template="lm3s6965evb", program=crc, power_on=True)).session
        steps = await latency(lambda: c.debug.step(name=s.name), 500)
        single("single step over the SDK p50", pct(steps, 0.5), "ms", "target <= 1 ms")
        single("single step over the SDK p99", pct(steps, 0.99), "ms", "")
        await c.sessions.delete_session(name=s.name)


# ---------------------------------------------------------------------- qemu


def qemu_by_hand(elf: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["qemu-system-arm", "-M", "mps2-an385", "-nographic", "-monitor", "none", "-nodefaults",
                    "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=True)
    return time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gdb_stepi(elf: Path, port: int, steps: int) -> list[float]:
    """gdb-multiarch through pygdbmi with the settings that make it fast (PLATFORM.md)."""
    from pygdbmi.gdbcontroller import GdbController

    gdb = GdbController(["gdb-multiarch", "--nx", "--quiet", "--interpreter=mi3", str(elf)],
                        time_to_check_for_additional_output_sec=1e-4)
    for cmd in ("set confirm off", "set trust-readonly-sections on", "set print frame-arguments none",
                f"target remote 127.0.0.1:{port}"):
        gdb.write(cmd, timeout_sec=10)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        gdb.write("-exec-step-instruction", read_response=False)
        while True:
            resp = gdb.get_gdb_response(timeout_sec=5, raise_error_on_timeout=True)
            if any(r.get("message") == "stopped" for r in resp):
                break
        out.append((time.perf_counter() - t) * 1000)
    gdb.exit()
    return out


async def bench_debug(server: Server) -> None:
    from machineserver.sdk import AsyncClient
    from machineserver.v1 import debug_pb2 as dpb

    print("debugging (mps2-an385, crc32 loop)")
    elf = firmware("mps2-an385", "crc32")
    async with await AsyncClient.connect(server.target) as c:
        prog = (await c.upload_program(elf)).program.name
        s = (await c.sessions.create_session(board_template="mps2-an385", program=prog, power_on=True)).session
        requests: asyncio.Queue[dpb.AttachRequest | None] = asyncio.Queue()

        async def reqs():  # type: ignore[no-untyped-def]
            yield dpb.AttachRequest(open=dpb.AttachOpen(name=s.name, control=True))
            while (r := await requests.get()) is not None:
                yield r

        stream = c.debug.attach(reqs())
        await stream.__anext__()
        attach: list[float] = []
        for tag in range(1, 1001):
            t = time.perf_counter()
            await requests.put(dpb.AttachRequest(command=dpb.DebugCommand(tag=tag, step=dpb.StepRequest(count=1))))
            async for msg in stream:
                if msg.WhichOneof("response") == "result" and msg.result.tag == tag:
                    break
            attach.append((time.perf_counter() - t) * 1000)
        await requests.put(None)
        async for _ in stream:
            pass
        gdb = (await c.debug.start_gdb_server(name=s.name)).gdb_server
        bridge = await asyncio.to_thread(gdb_stepi, elf, gdb.port, 300)
        await c.debug.stop_gdb_server(name=s.name)
        await c.sessions.delete_session(name=s.name)
    single("Attach stream step p50 (unicorn)", pct(attach[100:], 0.5), "ms", "target <= 0.5 ms")
    single("Attach stream step p99 (unicorn)", pct(attach[100:], 0.99), "ms", "")
    line("step p50, Attach vs gdb through our bridge", pct(attach[100:], 0.5), pct(bridge, 0.5), "ms",
         "speed", speed=True)
    if shutil.which("qemu-system-arm"):
        _, on_gdbstub = await rsp_vs_gdb(elf)
        line("step p50, Attach vs gdb on QEMU's gdbstub", pct(attach[100:], 0.5), pct(on_gdbstub, 0.5), "ms",
             "speed", speed=True)


async def rsp_vs_gdb(elf: Path, steps: int = 300) -> tuple[list[float], list[float]]:
    from machineserver.server.rsp import RspClient, RspClosed, RspTimeout

    port = free_port()
    command = ["qemu-system-arm", "-M", "mps2-an385", "-nographic", "-monitor", "none", "-S",
               "-semihosting-config", "enable=on,target=native", "-gdb", f"tcp:127.0.0.1:{port}",
               "-kernel", str(elf)]
    qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: ASYNC220 - set-up
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:  # QEMU opens its gdbstub port a moment after it starts
            try:
                rsp = await RspClient.connect_tcp("127.0.0.1", port, xml_registers="arm")
                break
            except (RspClosed, RspTimeout):
                if time.monotonic() > deadline or qemu.poll() is not None:
                    qemu.kill()
                    err = qemu.communicate()[1].decode(errors="replace")
                    raise SystemExit(f"bench: QEMU's gdbstub did not answer: {err.strip()}") from None
                await asyncio.sleep(0.05)
        ours = await latency(lambda: rsp.step(), steps)
        await rsp.close()
        peer = await asyncio.to_thread(gdb_stepi, elf, port, steps)
        return ours, peer
    finally:
        qemu.kill()
        qemu.wait()


QEMU_ROUNDS = 9
QEMU_SPARES_ENV = "MS_QEMU_SPARES"  # drivers/qemu/backend.py


def server_without_spares() -> Server:
    """A second server whose QEMU backend keeps no warm spares: every session starts its
    QEMU on demand (the cold path)."""
    before = os.environ.get(QEMU_SPARES_ENV)
    os.environ[QEMU_SPARES_ENV] = "0"
    try:
        return Server()
    finally:
        if before is None:
            del os.environ[QEMU_SPARES_ENV]
        else:
            os.environ[QEMU_SPARES_ENV] = before


async def bench_qemu(server: Server) -> None:
    """crc32 create -> exit against the same QEMU command line by hand, interleaved round
    by round, medians: with the board's warm spare (the default once a board is in
    demand: the first rounds, untimed, put it there) and on a server without spares (every
    QEMU started on demand)."""
    from machineserver.sdk import AsyncClient

    if not shutil.which("qemu-system-arm"):
        print("qemu backend: skipped (qemu-system-arm not installed)")
        return
    print("qemu backend (mps2-an385)")
    elf = firmware("mps2-an385", "crc32")
    cold_server = server_without_spares()
    try:
        async with await AsyncClient.connect(server.target) as c, \
                await AsyncClient.connect(cold_server.target) as cold:
            crc = (await c.upload_program(elf)).program.name
            cold_crc = (await cold.upload_program(elf)).program.name
            hello = (await c.upload_program(firmware("mps2-an385", "hello"))).program.name
            for _ in range(3):  # untimed: workers started, the board in demand (a spare kept)
                qemu_by_hand(elf)
                await run_to_exit(c, "mps2-an385", crc, "qemu")
                await run_to_exit(cold, "mps2-an385", cold_crc, "qemu")
            warm, cold_ms, peer = [], [], []
            for _ in range(QEMU_ROUNDS):
                peer.append(qemu_by_hand(elf) * 1000)
                warm.append((await run_to_exit(c, "mps2-an385", crc, "qemu"))[0] * 1000)
                cold_ms.append((await run_to_exit(cold, "mps2-an385", cold_crc, "qemu"))[0] * 1000)
            fb = [await first_byte(c, "mps2-an385", hello, "qemu") for _ in range(10)]
    finally:
        cold_server.stop()
    by_hand = statistics.median(peer)
    line(f"crc32 create -> exit, warm spare, median of {QEMU_ROUNDS}", statistics.median(warm), by_hand, "ms",
         "speed = by-hand time / our time, target >= 0.97x", speed=True)
    line("crc32 create -> exit, QEMU started on demand", statistics.median(cold_ms), by_hand, "ms",
         "speed; no spares (MS_QEMU_SPARES=0)", speed=True)
    single("create -> first console byte p50 (warm spare)", pct(fb, 0.5), "ms", "target <= 300 ms")
    ours_steps, gdb_steps = await rsp_vs_gdb(elf)
    line("stepi p50, our RSP client vs gdb-multiarch", pct(ours_steps, 0.5), pct(gdb_steps, 0.5), "ms",
         "speed, target >= 3x", speed=True)


async def timed_run(c: object, board: str, program: str, backend: str, coverage: bool) -> float:
    """Seconds from RunSession to the EXITED event of a powered-on session (collecting
    coverage from before the run when asked)."""
    from machineserver.v1 import common_pb2

    s = (await c.sessions.create_session(board_template=board, program=program, power_on=True,  # type: ignore[attr-defined]
                                         backend=backend, options={"coverage": coverage})).session
    if coverage:
        await c.coverage.start_coverage(name=s.name)  # type: ignore[attr-defined]
    events = c.sessions.stream_session_events(name=s.name)  # type: ignore[attr-defined]
    ready = asyncio.Event()

    async def wait_exit() -> float:
        ready.set()
        async for ev in events:
            if ev.state == common_pb2.SESSION_STATE_EXITED:
                return time.perf_counter()
        return float("nan")

    waiter = asyncio.create_task(wait_exit())
    await ready.wait()
    await asyncio.sleep(0.05)
    t = time.perf_counter()
    await c.sessions.run_session(name=s.name)  # type: ignore[attr-defined]
    end = await asyncio.wait_for(waiter, 120)
    if coverage:
        blocks = await c.coverage.get_coverage_summary(name=s.name)  # type: ignore[attr-defined]
        assert blocks.totals.lines_hit > 0
    await c.sessions.delete_session(name=s.name)  # type: ignore[attr-defined]
    return end - t


async def bench_coverage(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    print("coverage overhead (crc32, run -> exit, median of 5, on vs off in the same run)")
    async with await AsyncClient.connect(server.target) as c:
        for backend, board, target in (("unicorn", "mps2-an385", "<= 3x"), ("qemu", "mps2-an385", "<= 1.5x")):
            if backend == "qemu" and not shutil.which("qemu-system-arm"):
                print("  qemu: skipped (qemu-system-arm not installed)")
                continue
            prog = (await c.upload_program(firmware(board, "crc32"))).program.name
            off, on = [], []
            for _ in range(5):
                off.append(await timed_run(c, board, prog, backend, False) * 1000)
                on.append(await timed_run(c, board, prog, backend, True) * 1000)
            line(f"{backend}: coverage on vs off (cost)", statistics.median(on), statistics.median(off), "ms",
                 f"target {target}")
    await bench_trace_ring()


async def traced_run_ms(backend_name: str, board_name: str, program: str, trace: bool) -> float:
    """Milliseconds from run to the exit of a driver-level machine collecting coverage, with
    the trace tail's ring (the default) or without it (extra coverage_trace=off)."""
    import threading

    from machineserver.server.core.boards import load_shipped_boards
    from machineserver.server.core.images import ImageFormat, parse_image
    from machineserver.server.drivers.base import MachineOptions, RunControl, StopInfo
    from machineserver.server.drivers.qemu import QemuBackend
    from machineserver.server.drivers.unicorn import UnicornBackend

    stopped = threading.Event()

    class Events:
        def console_output(self, data: bytes) -> None:
            pass

        def stopped(self, info: StopInfo) -> None:
            stopped.set()

        def failed(self, reason: str) -> None:
            stopped.set()

    backend = QemuBackend() if backend_name == "qemu" else UnicornBackend()
    extra = {"coverage": "1"} if trace else {"coverage": "1", "coverage_trace": "off"}
    m = backend.create_machine(load_shipped_boards()[board_name], MachineOptions(extra=extra), Events())
    try:
        await m.power_on()
        await m.load(parse_image(firmware(board_name, program).read_bytes(), ImageFormat.ELF).image)
        t = time.perf_counter()
        await m.capability(RunControl).run()
        await asyncio.to_thread(stopped.wait, 300)
        return (time.perf_counter() - t) * 1000
    finally:
        await m.power_off()
        await backend.aclose()


async def bench_trace_ring() -> None:
    print("trace tail ring cost (run -> exit with coverage on, ring on vs off, median of 5)")
    for backend, program, target in (("unicorn", "crc32", "<= 1.1x"), ("qemu", "cosim_spin", "<= 1.5x")):
        if backend == "qemu" and not shutil.which("qemu-system-arm"):
            print("  qemu: skipped (qemu-system-arm not installed)")
            continue
        on, off = [], []
        for _ in range(5):
            off.append(await traced_run_ms(backend, "mps2-an385", program, False))
            on.append(await traced_run_ms(backend, "mps2-an385", program, True))
        line(f"{backend}: trace ring on vs off, coverage on ({program})", statistics.median(on),
             statistics.median(off), "ms", f"target {target}")


SECTIONS = {"unicorn": bench_unicorn, "debug": bench_debug, "coverage": bench_coverage,
            "qemu": bench_qemu}


def _more_sections() -> None:
    """Sections in modules of their own (they import this one, so they load after it)."""
    from bench_capsules import bench_capsules
    from bench_control_plane import bench_control_plane
    from bench_cosim import bench_cosim
    from bench_counts import bench_counts
    from bench_gdbremote import bench_gdbremote
    from bench_isolation import bench_isolation
    from bench_jobs import bench_jobs
    from bench_qemu_scale import bench_qemu_scale
    from bench_scale import bench_scale
    from bench_snapshots import bench_snapshots
    from bench_trust import bench_trust

    SECTIONS["control"] = bench_control_plane
    SECTIONS["isolation"] = bench_isolation
    SECTIONS["snapshots"] = bench_snapshots
    SECTIONS["qemu_scale"] = bench_qemu_scale
    SECTIONS["scale"] = bench_scale
    SECTIONS["cosim"] = bench_cosim
    SECTIONS["gdbremote"] = bench_gdbremote
    SECTIONS["trust"] = bench_trust
    SECTIONS["jobs"] = bench_jobs
    SECTIONS["capsules"] = bench_capsules
    SECTIONS["counts"] = bench_counts



async def main() -> None:
    _more_sections()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args()
    server = Server()
    try:
        for name in args.only.split(","):
            await SECTIONS[name](server)
    finally:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(main())

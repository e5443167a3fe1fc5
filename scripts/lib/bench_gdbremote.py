"""Benchmark section "gdbremote": a single step and a 64-byte memory read over the gdbremote
backend (through the SDK: Step count=1, ReadMemory size=64) against the same operations
from gdb-multiarch (MI through pygdbmi, configured as PLATFORM.md says: trust-readonly-
sections, no frame arguments) to the same QEMU (mps2-an385 behind ``-gdb tcp:...``) in the
same run. QEMU's gdbstub takes one debugger at a time, so the two take turns: interleaved
rounds, the gdbremote session powered off (disconnected) while gdb holds the stub."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from typing import Any

from bench import Server, firmware, free_port, line

BOARD = "mps2-an385"
ROUNDS = 5
PER_ROUND = 200
RAM = 0x2000_8000


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


class MiGdb:
    """gdb-multiarch over MI, connected to a gdbstub."""

    def __init__(self, elf: str, port: int) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.gdb = GdbController(["gdb-multiarch", "--nx", "--quiet", "--interpreter=mi3", elf],
                                 time_to_check_for_additional_output_sec=1e-4)
        for cmd in ("-gdb-set confirm off", "-gdb-set trust-readonly-sections on",
                    "-gdb-set print frame-arguments none"):
            self.until(cmd, "done")
        self.until(f"-target-select remote 127.0.0.1:{port}", "connected")

    def until(self, command: str, message: str, record: str = "result") -> list[dict[str, Any]]:
        self.gdb.write(command, read_response=False)
        out: list[dict[str, Any]] = []
        while True:
            resp = self.gdb.get_gdb_response(timeout_sec=10, raise_error_on_timeout=True)
            out += resp
            if any(r.get("type") == "result" and r.get("message") == "error" for r in resp):
                raise RuntimeError(f"gdb: {command}: {resp}")
            if any(r.get("type") == record and r.get("message") == message for r in resp):
                return out

    def step(self) -> None:
        self.until("-exec-step-instruction", "stopped", "notify")

    def read64(self) -> None:
        self.until(f"-data-read-memory-bytes {RAM:#x} 64", "done")

    def close(self) -> None:
        self.until("-target-disconnect", "done")
        self.gdb.exit()


def start_qemu(port: int) -> subprocess.Popen[bytes]:
    """A halted QEMU without a program, its gdbstub on 127.0.0.1:``port``."""
    return subprocess.Popen(["qemu-system-arm", "-M", BOARD, "-nographic", "-nodefaults", "-monitor", "none",
                             "-nic", "none", "-S", "-gdb", f"tcp:127.0.0.1:{port},server=on,wait=off",
                             "-semihosting-config", "enable=on,target=native"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def bench_gdbremote(server: Server) -> None:
    from machineserver.sdk import AsyncClient

    print("gdbremote (mps2-an385 QEMU behind -gdb; SDK -> server -> RSP vs gdb-multiarch MI, same QEMU)")
    elf = firmware(BOARD, "echo")  # polls its UART forever: nothing runs away between turns
    port = free_port()
    qemu = start_qemu(port)
    try:
        await asyncio.sleep(0.3)
        ours: dict[str, list[float]] = {"step": [], "read": []}
        theirs: dict[str, list[float]] = {"step": [], "read": []}
        async with await AsyncClient.connect(server.target) as c:
            prog = (await c.upload_program(elf)).program.name
            name = (await c.sessions.create_session(
                board_template=BOARD, program=prog, backend="gdbremote",
                options={"remote": {"address": f"127.0.0.1:{port}"}})).session.name
            for _ in range(ROUNDS):
                await c.sessions.power_on_session(name=name)
                await c.debug.step(name=name, count=20)  # into the program, warm
                for _ in range(PER_ROUND):
                    t = time.perf_counter()
                    await c.debug.step(name=name, count=1)
                    ours["step"].append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    await c.debug.read_memory(name=name, address=RAM, size=64)
                    ours["read"].append((time.perf_counter() - t) * 1000)
                await c.sessions.power_off_session(name=name)
                gdb = await asyncio.to_thread(MiGdb, str(elf), port)
                try:
                    for _ in range(PER_ROUND):
                        t = time.perf_counter()
                        await asyncio.to_thread(gdb.step)
                        theirs["step"].append((time.perf_counter() - t) * 1000)
                        t = time.perf_counter()
                        await asyncio.to_thread(gdb.read64)
                        theirs["read"].append((time.perf_counter() - t) * 1000)
                finally:
                    await asyncio.to_thread(gdb.close)
            await c.sessions.delete_session(name=name)
        for what, label in (("step", "single step"), ("read", "64-byte memory read")):
            line(f"gdbremote {label} p50 vs gdb-multiarch", statistics.median(ours[what]),
                 statistics.median(theirs[what]), "ms", "SDK round trip on top of RSP")
            line(f"gdbremote {label} p99 vs gdb-multiarch", p99(ours[what]), p99(theirs[what]), "ms",
                 f"{ROUNDS} interleaved rounds of {PER_ROUND}")
    finally:
        qemu.kill()
        qemu.wait()

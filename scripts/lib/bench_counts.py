"""scripts/bench counts: the cost of exact instruction counting on Unicorn.

Raw Unicorn (the same ELF, the same MMIO and semihosting hooks as bench.py's peer) with no
block hook vs with the native counting hook (drivers/unicorn/blockcount.py), in the same
run, on two loads: crc32 (a tight CRC loop: short blocks, the worst case for a per-block
hook) and mmio (200,000 UART status polls, each a Python MMIO callback: the busy-polling
session of issue 17). The count the hook reads is printed next to the exact count.

QEMU (:func:`bench_counts_qemu`, in the same section): a bare QEMU (no plugin) vs the same
command line with our TCG plugin loaded as the driver loads it (its gate, and its
instruction total counted per translated block: count=block), and with count=insn (an
inline add per instruction, the alternative), alternating in the same run, on crc32 and
hello (lm3s6965evb, semihosting exit, whole process). crc32 minus hello is the CRC loop
alone (QEMU's start-up, ~25 ms, taken away). The plugin's total is printed next to the
exact count.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from bench import CRC32_INSTRUCTIONS, firmware, line, raw_unicorn_crc32

RUNS = 5


QEMU_MODES = ("bare", "block", "insn")
GATE_TOTAL_OFFSET = 3840 + 248  # drivers/qemu/gate_channel.py TOTAL


def qemu_run(elf: Path, plugin: str, mode: str) -> tuple[float, int | None]:
    """Seconds from QEMU's start to its exit, and the plugin's total (None when bare)."""
    args = ["qemu-system-arm", "-M", "lm3s6965evb", "-nographic", "-monitor", "none",
            "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    with tempfile.TemporaryDirectory() as d:
        if mode != "bare":
            for fifo in ("notify", "release", "command"):
                os.mkfifo(f"{d}/{fifo}")
            args += ["-plugin", f"file={plugin},gate={d}/ctl,notify={d}/notify,release={d}/release,"
                                f"command={d}/command,count={mode}"]
        t = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, timeout=60)
        seconds = time.perf_counter() - t
        if mode == "bare":
            return seconds, None
        with open(f"{d}/ctl", "rb") as f:
            page = f.read()
    return seconds, struct.unpack_from("<Q", page, GATE_TOTAL_OFFSET)[0]


def bench_counts_qemu() -> None:
    from machineserver.server.drivers.qemu.plugin import plugin_status

    plugin = plugin_status().path
    if plugin is None:
        print(f"  qemu: no plugin ({plugin_status().reason}): skipped")
        return
    runs = 2 * RUNS + 1
    print(f"QEMU instruction total, plugin vs bare QEMU (lm3s6965evb, start -> exit, median of {runs}, "
          "alternating in the same run)")
    times: dict[tuple[str, str], float] = {}
    totals: dict[str, int | None] = {}
    for program in ("crc32", "hello"):
        elf = firmware("lm3s6965evb", program)
        got: dict[str, list[float]] = {mode: [] for mode in QEMU_MODES}
        for _ in range(runs):
            for mode in QEMU_MODES:
                seconds, total = qemu_run(elf, plugin, mode)
                got[mode].append(seconds)
                if program == "crc32":
                    totals[mode] = total
        for mode in QEMU_MODES:
            times[program, mode] = statistics.median(got[mode])
    for program in ("crc32", "hello"):
        for mode in ("block", "insn"):
            line(f"qemu {program}: plugin count={mode} vs bare", times[program, mode] * 1e3,
                 times[program, "bare"] * 1e3, "ms", "<= 1.25x" if mode == "block" else "the alternative")
    for mode in ("block", "insn"):
        loop = times["crc32", mode] - times["hello", mode]
        bare = times["crc32", "bare"] - times["hello", "bare"]
        line(f"qemu crc32 loop (minus hello): count={mode} vs bare", loop * 1e3, bare * 1e3, "ms",
             "<= 1.25x" if mode == "block" else "the alternative")
    print(f"  crc32: plugin total {totals['block']:,} (count=block), {totals['insn']:,} (count=insn); "
          f"exact {CRC32_INSTRUCTIONS:,} + the exit trap QEMU runs here (the driver stops before it)")


async def bench_counts(server: object) -> None:
    bench_counts_qemu()
    print(f"exact instruction counting on raw Unicorn (lm3s6965evb, run -> exit, median of {RUNS}, "
          "hook vs no hook alternating in the same run)")
    for program in ("crc32", "mmio"):
        elf = firmware("lm3s6965evb", program)
        raw_unicorn_crc32(elf, True)  # build the library, warm caches
        off: list[float] = []
        on: list[float] = []
        counted = 0
        for _ in range(RUNS):
            off.append(raw_unicorn_crc32(elf, False)[0])
            seconds, counted, _out = raw_unicorn_crc32(elf, True)
            on.append(seconds)
        line(f"raw unicorn {program}: counting block hook vs no hook", statistics.median(on) * 1e3,
             statistics.median(off) * 1e3, "ms", "<= 1.10x")
        exact = f" (exact: {CRC32_INSTRUCTIONS:,})" if program == "crc32" else ""
        print(f"  {program}: {counted:,} instructions counted by the hook{exact}; "
              f"{counted / statistics.median(on) / 1e6:.0f} M instr/s with it")

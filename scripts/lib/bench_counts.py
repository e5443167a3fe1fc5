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

from bench import CRC32_INSTRUCTIONS, firmware, line

RUNS = 5


def raw_run(elf: Path, counting: bool) -> tuple[float, int, bytes]:
    """Seconds to the exit, instructions counted (0 without the hook), console bytes."""
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
        raise SystemExit("bench counts: the native block counter did not build (no C compiler?)")
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
        raw_run(elf, True)  # build the library, warm caches
        off: list[float] = []
        on: list[float] = []
        counted = 0
        for _ in range(RUNS):
            off.append(raw_run(elf, False)[0])
            seconds, counted, _out = raw_run(elf, True)
            on.append(seconds)
        line(f"raw unicorn {program}: counting block hook vs no hook", statistics.median(on) * 1e3,
             statistics.median(off) * 1e3, "ms", "<= 1.10x")
        exact = f" (exact: {CRC32_INSTRUCTIONS:,})" if program == "crc32" else ""
        print(f"  {program}: {counted:,} instructions counted by the hook{exact}; "
              f"{counted / statistics.median(on) / 1e6:.0f} M instr/s with it")

"""The real gdb-multiarch (batch mode) through the GDB bridge, on the unicorn and the qemu
backend: Cortex-M (mps2-an385) and RISC-V (sifive_e)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from tests.helpers.firmware import elf_symbol_value
from tests.helpers.gdb import Attach, run_gdb, wait_for_clients

pytestmark = pytest.mark.usefixtures("gdb_multiarch")


def symbol(elf: Path, name: str) -> int:
    return elf_symbol_value(elf, name) & ~1


def reg_value(out: str, name: str) -> int:
    m = re.search(rf"^{name}\s+(0x[0-9a-f]+)", out, re.M)
    assert m, f"no {name} in:\n{out}"
    return int(m.group(1), 16)


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_cortex_m_session(gdb_target: Attach, client: AsyncClient, backend: str) -> None:
    # halt_on_detach: the session stays halted between the gdb runs below (tests/gdb/test_detach.py
    # checks the default, a detach that resumes)
    t = await gdb_target("mps2-an385", "systick", backend, halt_on_detach=True)
    main = symbol(t.elf, "main")
    ticks = symbol(t.elf, "ticks")
    out = await run_gdb(
        t,
        "break main", "continue", "bt", "info registers", "x/8xw $sp", "stepi",
        "watch ticks", "continue", "set var ticks = 7", "print ticks", "print/x $pc",
        "monitor reset", "maintenance flush register-cache", "info registers pc",
        "detach",
    )
    assert re.search(rf"Breakpoint 1 at 0x{main:x}: file src/systick.c", out), out
    assert "Breakpoint 1, main () at src/systick.c" in out, out
    assert re.search(r"^#0\s+main \(\) at src/systick.c:\d+", out, re.M), out
    # info registers: the m-profile core set (unicorn adds the m-system registers)
    names = re.findall(r"^(r\d+|sp|lr|pc|xpsr|msp|psp|primask|basepri|faultmask|control)\s+0x", out, re.M)
    assert {*(f"r{i}" for i in range(13)), "sp", "lr", "pc", "xpsr"} <= set(names), out
    if backend == "unicorn":
        assert {"msp", "psp", "primask", "control"} <= set(names), out
    sp = reg_value(out, "sp")
    assert 0x20000000 <= sp < 0x20400000
    assert f"0x{sp:x}:\t0x" in out, out  # x/8xw $sp printed the words at sp
    assert re.search(rf"^0x0*{main + 2:x}\s+\d+\s", out, re.M), out  # stepi: next instruction
    assert "Hardware watchpoint 2: ticks" in out, out
    assert re.search(r"Old value = 0\s+New value = 1", out), out
    assert "$1 = 7" in out, out
    assert "reset, halted" in out, out  # monitor output (O packets)
    reset_pc = reg_value(out.split("reset, halted", 1)[1], "pc")
    assert reset_pc == symbol(t.elf, "Reset_Handler"), out
    assert "[Inferior 1 (Remote target) detached]" in out, out
    assert "Remote communication error" not in out and "Remote failure" not in out, out

    # detach (halt_on_detach) left the session as it was (halted) and removed gdb's points
    await wait_for_clients(t.gdbserver, 0)
    s = (await client.sessions.get_session(name=t.name)).session
    assert s.state == cpb.SESSION_STATE_HALTED
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints

    # attach again (the session is halted after the reset): set var writes the session's memory
    out = await run_gdb(t, "set var ticks = 9", "print ticks", "detach")
    assert "$1 = 9" in out, out
    await wait_for_clients(t.gdbserver, 0)
    mem = (await client.debug.read_memory(name=t.name, address=ticks, size=4)).data
    assert mem == (9).to_bytes(4, "little")

    # attach again: gdb lets the firmware run to its end and sees the exit code
    out = await run_gdb(t, "break main", "continue", "delete", "continue")
    assert "Breakpoint 1, main ()" in out, out
    assert "[Inferior 1 (Remote target) exited normally]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    s = (await client.sessions.get_session(name=t.name)).session
    assert s.state == cpb.SESSION_STATE_EXITED


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_cortex_m_exit_code_and_kill(gdb_target: Attach, client: AsyncClient, backend: str) -> None:
    t = await gdb_target("mps2-an385", "fault", backend)
    out = await run_gdb(t, "continue")
    assert "[Inferior 1 (Remote target) exited with code 03]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    # a reset session, then kill: the session stays (kill never deletes it)
    await client.sessions.reset_session(name=t.name)
    out = await run_gdb(t, "hbreak main", "continue", "info breakpoints", "kill")
    assert "Breakpoint 1, main () at src/fault.c" in out, out
    assert re.search(r"^1\s+hw breakpoint\s+keep y.*in main at src/fault.c", out, re.M), out
    assert "[Inferior 1 (Remote target) killed]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    s = (await client.sessions.get_session(name=t.name)).session
    assert s.state == cpb.SESSION_STATE_HALTED
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints


@pytest.mark.parametrize("backend", ["unicorn", "qemu"])
async def test_riscv_session(gdb_target: Attach, client: AsyncClient, backend: str) -> None:
    t = await gdb_target("sifive_e", "timer", backend)
    main = symbol(t.elf, "main")
    out = await run_gdb(
        t, "break main", "continue", "info registers", "stepi", "watch ticks", "continue",
        "info registers mcause", "detach",
    )
    assert "Breakpoint 1, main () at src/timer.c" in out, out
    names = re.findall(r"^(\w+)\s+0x[0-9a-f]+", out, re.M)
    assert {"ra", "sp", "gp", "a0", "t6", "pc"} <= set(names), out
    assert reg_value(out, "pc") == main
    assert re.search(rf"^0x{main + 2:x}\s+\d+\s", out, re.M) or re.search(
        rf"^0x{main + 4:x}\s+\d+\s", out, re.M), out
    assert re.search(r"Old value = 0\s+New value = 1", out), out
    assert reg_value(out, "mcause") == 0x80000007  # in the machine timer interrupt
    assert "[Inferior 1 (Remote target) detached]" in out, out
    await wait_for_clients(t.gdbserver, 0)
    assert not (await client.debug.list_breakpoints(name=t.name)).breakpoints

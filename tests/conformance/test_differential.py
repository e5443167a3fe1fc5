"""Differential: the same firmware on both backends, on the same board, must print the
same console bytes, exit with the same code, and hold the same core registers at
deterministic points (a breakpoint on `main`, N instructions later, a watchpoint hit)."""

from __future__ import annotations

import pytest

from machineserver.sdk import AsyncClient
from machineserver.v1 import common_pb2 as cpb
from machineserver.v1 import debug_pb2 as dpb
from tests.helpers.backends import BOARD_ARCH, require_backend
from tests.helpers.conformance import BOARDS, CORE_REGISTERS, Conf

PROGRAMS = {
    "lm3s6965evb": ("hello", "crc32", "systick", "coverage", "fault"),
    "mps2-an385": ("hello", "crc32", "systick", "coverage", "fault"),
    "sifive_e": ("hello", "crc32", "timer", "coverage", "fault"),
}


@pytest.fixture
def both(client: AsyncClient, request: pytest.FixtureRequest) -> tuple[Conf, Conf]:
    board = request.node.callspec.params.get("board", "lm3s6965evb")
    require_backend("qemu", board)
    return Conf(client, "unicorn"), Conf(client, "qemu")


async def core_registers(conf: Conf, name: str, board: str) -> dict[str, int]:
    return await conf.registers(name, CORE_REGISTERS[BOARD_ARCH[board]])


def diff(a: dict[str, int], b: dict[str, int]) -> str:
    return ", ".join(f"{k}: unicorn 0x{a[k]:08x} qemu 0x{b[k]:08x}" for k in a if a[k] != b.get(k))


@pytest.mark.parametrize("board", BOARDS)
async def test_same_console_and_exit_code(both: tuple[Conf, Conf], board: str) -> None:
    results: dict[str, list[tuple[str, bytes, int]]] = {}
    for conf in both:
        names = [(p, await conf.session(board, p, run=True)) for p in PROGRAMS[board]]
        out = []
        for program, name in names:
            done = await conf.wait_state(name, cpb.SESSION_STATE_EXITED)
            out.append((program, await conf.console(name), done.exit_code))  # type: ignore[attr-defined]
        results[conf.backend] = out
    assert results["unicorn"] == results["qemu"]
    assert all(out for _, out, _ in results["qemu"])


@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("program", ["crc32", "coverage"])
async def test_same_registers_at_main_and_after_steps(both: tuple[Conf, Conf], board: str, program: str) -> None:
    names = [await conf.halted_at(board, program) for conf in both]
    for steps in (0, 1, 10, 97, 200):  # coverage has ~630 instructions in all
        if steps:
            stops = [(await conf.client.debug.step(name=n, count=steps)).stop for conf, n in zip(both, names, strict=True)]
            assert all(s.reason == cpb.STOP_REASON_STEP for s in stops), stops
        regs = [await core_registers(conf, n, board) for conf, n in zip(both, names, strict=True)]
        assert regs[0] == regs[1], f"after {steps} more steps: {diff(*regs)}"
    # and both finish the same way from there
    for conf, n in zip(both, names, strict=True):
        await conf.run_to_exit(n)
    outs = [await conf.console(n) for conf, n in zip(both, names, strict=True)]
    assert outs[0] == outs[1] != b""


@pytest.mark.parametrize(("board", "program"), [("lm3s6965evb", "systick"), ("mps2-an385", "systick"),
                                                ("sifive_e", "timer")])
async def test_same_stop_at_a_watchpoint(both: tuple[Conf, Conf], board: str, program: str) -> None:
    """The first write to `ticks` after main: the same pc (just after the store, in the
    interrupt handler), the same value, the same registers (exception entry included)."""
    names = [await conf.halted_at(board, program) for conf in both]
    stops = []
    for conf, n in zip(both, names, strict=True):
        ticks = await conf.client.debug.resolve_symbol(name=n, symbol="ticks")
        await conf.client.debug.set_breakpoint(name=n, location={"address": ticks.address},
                                               kind=dpb.BREAKPOINT_KIND_WATCH_WRITE, size=4)
        stops.append((await conf.client.debug.continue_(name=n, wait=True)).stop)
    assert [s.reason for s in stops] == [cpb.STOP_REASON_WATCHPOINT] * 2
    assert (stops[0].pc, stops[0].watch_value) == (stops[1].pc, stops[1].watch_value), stops
    keep = CORE_REGISTERS[BOARD_ARCH[board]]
    if BOARD_ARCH[board] == "riscv32":
        # the interrupted point in main's wfi loop depends on host timing on QEMU
        # (mtime runs on the host clock without icount): compare what the handler set up
        keep = ["x0", "x2", "x3", "x14", "x15", "pc"]
    regs = [await conf.registers(n, keep) for conf, n in zip(both, names, strict=True)]
    assert regs[0] == regs[1], diff(*regs)

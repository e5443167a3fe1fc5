"""Each test firmware's documented behaviour, on both backends and two boards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from machineserver.testing import ExpectTimeout, Instructions, Machine, MachineStopped, Virtual
from tests.firmware_suite.conftest import BOTH_BACKENDS

pytestmark = [BOTH_BACKENDS, pytest.mark.board("mps2-an385")]
BOARDS = pytest.mark.parametrize("machine", [{"board": "mps2-an385"}, {"board": "lm3s6965evb"}],
                                 indirect=True, ids=["mps2-an385", "lm3s6965evb"])

Firmware = Callable[[str], Path]


@BOARDS
def test_hello_greets_with_the_board_name(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("hello"))
    m = machine.console.expect(r"Hello from (\S+)!\n", timeout=Virtual(ms=50))
    assert m.group(1) == machine.board
    assert machine.wait_exit(timeout=Virtual(ms=50)) == 0
    assert machine.console.text == f"Hello from {machine.board}!\n"


@BOARDS
def test_crc32_matches_zlib(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("crc32"))
    m = machine.console.expect(r"crc32=0x([0-9a-f]{8})\n", timeout=Instructions(200_000_000))
    assert m.groups() == ("80f45f04",)
    assert machine.wait_exit() == 0


def test_systick_counts_ten_ticks(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("systick"))
    machine.console.expect(r"ticks=10\n", timeout=Virtual(ms=500))
    assert machine.wait_exit() == 0


def test_fault_reaches_the_hardfault_handler(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("fault"))
    machine.console.expect(r"about to fault\n", timeout=Virtual(ms=50))
    machine.console.expect(r"hardfault\n", timeout=Virtual(ms=50))
    assert machine.wait_exit() == 3


def test_echo_answers_what_it_is_sent(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("echo"))
    machine.console.expect(r"echo ready\n", timeout=Virtual(ms=50))
    machine.console.send("hi there\n")
    machine.console.expect(r"hi there\n", timeout=Virtual(ms=50))
    machine.console.send("q")
    machine.console.expect(r"bye\n", timeout=Virtual(ms=50))
    assert machine.wait_exit() == 0
    assert machine.console.text == "echo ready\nhi there\nbye\n"


def test_echo_without_input_never_says_bye(machine: Machine, fw: Firmware) -> None:
    """A wait for text that never comes ends on its instruction budget, quickly, and says why."""
    machine.load(fw("echo"))
    machine.console.expect(r"echo ready\n", timeout=Virtual(ms=50))
    with pytest.raises(ExpectTimeout) as err:
        machine.console.expect(r"bye", timeout=Instructions(200_000))
    assert "timeout ran out" in str(err.value) and "echo ready" in str(err.value)
    assert err.value.response.instructions >= 200_000


@BOARDS
def test_coverage_program_finishes(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("coverage"))
    machine.console.expect(r"coverage done\n", timeout=Virtual(ms=50))
    assert machine.wait_exit() == 0


def test_mmio_status_polls(machine: Machine, fw: Firmware) -> None:
    machine.load(fw("mmio"))
    machine.console.expect(r"mmio=0x656c62a1\n", timeout=Instructions(100_000_000))
    assert machine.wait_exit() == 0


def test_systick_handler_by_symbol(machine: Machine, fw: Firmware) -> None:
    """run_until a function, memory and registers by symbol: the tick counter is 0 at the
    first SysTick, 1 at the second; set to 9 it makes the program finish a tick later."""
    machine.load(fw("systick"), run=False)
    stop = machine.run_until("SysTick_Handler", timeout=Virtual(ms=100))
    assert stop.pc == machine.symbol("SysTick_Handler") & ~1 == machine.pc
    assert stop.location.function == "SysTick_Handler"
    assert machine.read_u32("ticks") == 0
    machine.run_until("SysTick_Handler", timeout=Virtual(ms=100))
    assert machine.read_u32("ticks") == 1
    machine.write("ticks", (9).to_bytes(4, "little"))
    assert machine.read("ticks") == b"\x09\x00\x00\x00"
    machine.registers["r0"] = 0x1234
    assert machine.registers["r0"] == 0x1234
    machine.resume()
    machine.console.expect(r"ticks=10\n", timeout=Virtual(ms=100))
    assert machine.wait_exit() == 0


def test_run_until_a_source_line(machine: Machine, fw: Firmware) -> None:
    """file:line breakpoints: the line that prints the crc (crc32.c's fw_puts call)."""
    elf = fw("crc32")
    line = next(i for i, text in enumerate((elf.parents[2] / "src" / "crc32.c").read_text().splitlines(), 1)
                if 'fw_puts("crc32=0x")' in text)
    machine.load(elf, run=False)
    stop = machine.run_until(f"crc32.c:{line}", timeout=Instructions(200_000_000))
    assert stop.location.line == line and stop.location.file.endswith("crc32.c")
    assert machine.console.text == ""  # nothing printed yet
    assert machine.wait_exit() == 0


def test_wait_exit_of_a_program_that_never_exits(machine: Machine, fw: Firmware) -> None:
    """A program that never exits: wait_exit ends on its budget with the machine's state."""
    machine.load(fw("echo"))
    with pytest.raises(MachineStopped) as err:
        machine.wait_exit(timeout=Instructions(100_000))
    assert "did not exit" in str(err.value)

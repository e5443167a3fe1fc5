"""What only the QEMU driver tests (tests/drivers/test_qemu_*.py) share: a QEMU machine
with its parts and its process at hand (:class:`Qm`), machines booted with a test
firmware or halted in one of its functions, a machine failed as it should be, and the
instruction gate. The ``machines``
fixture that makes them lives in tests/drivers/conftest.py; everything not QEMU's own
is in tests/helpers (firmware, machines, events, backends)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from machineserver.server.drivers.base import MachineState, StopReason, WrongState
from machineserver.server.drivers.qemu import QemuMachine
from machineserver.server.drivers.qemu.gate import InstructionGate
from machineserver.server.drivers.qemu.process import QemuProcess
from tests.helpers.backends import reaped, require_qemu_plugin
from tests.helpers.events import Recorder
from tests.helpers.firmware import elf_address, firmware
from tests.helpers.machines import Parts, elf_image


class Qm(Parts):
    """A QEMU machine with its parts at hand (``m.run`` is its RunControl part, and so
    on: :class:`tests.helpers.machines.Parts`) and its QEMU process."""

    machine: QemuMachine

    def __init__(self, machine: QemuMachine) -> None:
        super().__init__(machine)

    @property
    def process(self) -> QemuProcess:
        return self.machine.target.process

    @property
    def qemu_pid(self) -> int:
        pids = self.process.pids()
        assert pids, "no QEMU runs"
        return pids[0]


# machines(board_name, *, icount=False, extra_args=(), **extra) -> (Qm, Recorder): a
# machine (OFF); ``extra``: MachineOptions.extra; ``extra_args``: appended to QEMU's
# command line (a QemuMachine knob the API never reaches)
MachineFactory = Callable[..., tuple[Qm, Recorder]]


async def boot(make: MachineFactory, board_name: str, program: str,
               **kw: Any) -> tuple[Qm, Recorder, Path]:
    """A powered-on machine with a test firmware loaded, halted at its entry; its ELF."""
    m, ev = make(board_name, **kw)
    await m.power_on()
    path = firmware(board_name, program)
    await m.load(elf_image(path))
    return m, ev, path


async def halted_at(make: MachineFactory, board_name: str, program: str, function: str,
                    **kw: Any) -> tuple[Qm, Recorder, Path]:
    """A machine halted at the start of ``function`` (reached through a breakpoint, which
    is cleared again)."""
    m, ev, path = await boot(make, board_name, program, **kw)
    address = elf_address(path, function)
    await m.bp.set_breakpoint(address)
    await m.run.run()
    stop = await ev.next_stop()
    assert (stop.reason, stop.pc) == (StopReason.BREAKPOINT, address), stop
    await m.bp.clear_breakpoint(address)
    return m, ev, path


async def failed_once(m: Qm, ev: Recorder, pid: int, reason: str) -> None:
    """The machine FAILED with ``reason``, reported once, its QEMU (``pid``) killed and
    reaped; a later call is refused as such (no second report); a power cycle brings it
    back on a fresh QEMU."""
    assert m.state is MachineState.FAILED
    assert len(ev.failures) == 1 and reason in ev.failures[0], ev.failures
    await ev.until(lambda: reaped(pid), 5.0)
    with pytest.raises(WrongState, match="failed"):
        await m.regs.read_registers(["pc"])
    assert len(ev.failures) == 1
    await m.power_off()
    await m.power_on()
    assert m.state is MachineState.HALTED and m.qemu_pid != pid


def usable_gate(m: Qm) -> InstructionGate:
    """The machine's instruction gate (the plugin's); skipped, or failed under
    scripts/test, where the plugin cannot be built."""
    require_qemu_plugin()
    gate = m.process.gate
    assert gate is not None and gate.usable, "the plugin is built, but this QEMU's instruction gate is unusable"
    return gate
